"""`compute-swarm tray`: the seller's system-tray app. One instance per user; it owns the window, the
tray icon and the settings, and reaches the node agent only through `AgentBridge`.
"""

from __future__ import annotations

import datetime
import getpass
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, QTimer, Signal
from PySide6.QtGui import QAction
from PySide6.QtNetwork import QLocalServer, QLocalSocket
from PySide6.QtWidgets import QApplication, QMenu, QSystemTrayIcon

from compute_swarm.desktop import autostart, first_run, token_store
from compute_swarm.desktop.agent_status import AgentStatus
from compute_swarm.desktop.payouts_cli import payout_lines
from compute_swarm.desktop.runtime import this_machine
from compute_swarm.desktop.runtime.fetch import SITE_PACKAGES, Runtimes
from compute_swarm.desktop.runtime.pins import LockError
from compute_swarm.desktop.settings import Settings, SettingsError, SettingsStore, normalize_invite_code
from compute_swarm.desktop.tray import economy, state
from compute_swarm.desktop.tray.bridge import AgentBridge
from compute_swarm.desktop.tray.economy_view import PayoutDialog, ReceiptDialog
from compute_swarm.desktop.tray.runtime_fetch import RuntimeFetch
from compute_swarm.desktop.tray.widgets import state_icon
from compute_swarm.desktop.tray.window import STYLE_SHEET, MainWindow, SettingsDialog
from compute_swarm.engine import child_process
from compute_swarm.market import MarketFigures
from compute_swarm.protocol import format_credits

logger = logging.getLogger(__name__)

EARNINGS_REFRESH_MILLISECONDS = 60_000
MARKET_REFRESH_MILLISECONDS = 10 * 60_000  # the coordinator recomputes its figures once a minute at most
IDLE_PROBE_MILLISECONDS = 5_000  # the GPUs are read this often while not earning and the window is open
QUIT_WAIT_SECONDS = 100.0  # a running job gets this long to checkpoint when the seller quits


class SingleInstance(QObject):
    """The first launch listens on a per-user local socket; a later one tells it to show its window."""

    activated = Signal()

    def __init__(self, key: str, parent: QObject | None = None):
        super().__init__(parent)
        digest = hashlib.sha256(f"{getpass.getuser()}:{key}".encode()).hexdigest()[:16]
        self.name = f"compute-swarm-tray-{digest}"
        self._server: QLocalServer | None = None

    def claim(self) -> bool:
        """True if this is the first instance (now listening); False after asking the first to show."""
        socket = QLocalSocket()
        socket.connectToServer(self.name)
        if socket.waitForConnected(500):
            socket.write(b"show\n")
            socket.waitForBytesWritten(500)
            socket.disconnectFromServer()
            return False
        QLocalServer.removeServer(self.name)  # left behind by an instance that crashed
        self._server = QLocalServer(self)
        self._server.setSocketOptions(QLocalServer.SocketOption.UserAccessOption)
        if not self._server.listen(self.name):
            logger.warning("cannot listen for other launches: %s", self._server.errorString())
        self._server.newConnection.connect(self._on_connection)
        return True

    def _on_connection(self) -> None:
        assert self._server is not None
        while (connection := self._server.nextPendingConnection()) is not None:
            connection.readyRead.connect(connection.readAll)
            connection.disconnected.connect(connection.deleteLater)
            self.activated.emit()


class TrayApp(QObject):
    """Ties the window, the tray icon, the settings and the agent together."""

    def __init__(
        self,
        store: SettingsStore,
        data_dir: Path,
        *,
        agent_options: dict[str, Any] | None = None,
        manage_autostart: bool = True,  # tests leave the real login items alone
        engine_runtime: Callable[[Settings], Runtimes | None] | None = None,
    ):
        super().__init__()
        # What the engine needs fetched before the first job (a packaged app's runtime), if anything.
        self._engine_runtime = engine_runtime or (
            lambda settings: this_machine.runtime_this_app_needs(
                settings.runtime_sources, settings.coordinator
            )
        )
        self._runtime_fetch: RuntimeFetch | None = None
        self._runtime_checked = False
        self.store = store
        self.manage_autostart = manage_autostart
        problem = None
        try:
            loaded = store.load()
            self.settings, problem = loaded.settings, loaded.problem
            self.settings_writable = True
        except SettingsError as error:
            self.settings, problem, self.settings_writable = Settings(), str(error), False
        self.activity = state.RunState()
        self.status: AgentStatus | None = None
        self.telemetry = None  # the latest reading, from the agent or (while it is stopped) a probe
        self.summary: state.EarningsSummary | None = None
        self.market: MarketFigures | None = None
        self.temperatures = state.TemperatureHistory()
        self.bridge = AgentBridge(data_dir, agent_options=agent_options, parent=self)
        self.window = MainWindow(self.settings)
        self.tray = QSystemTrayIcon(state_icon("offline"), self)
        self._build_tray_menu()
        self._connect()
        self._update_view()
        self._earnings_timer = QTimer(self, interval=EARNINGS_REFRESH_MILLISECONDS)
        self._earnings_timer.timeout.connect(self.bridge.request_earnings_history)
        self._probe_timer = QTimer(self, interval=IDLE_PROBE_MILLISECONDS)
        self._probe_timer.timeout.connect(self._probe_while_idle)
        self._probe_timer.start()
        self._market_timer = QTimer(self, interval=MARKET_REFRESH_MILLISECONDS)
        self._market_timer.timeout.connect(self._fetch_market)
        self._market_timer.start()
        self._fetch_market()
        self.bridge.probe_telemetry()
        if problem:
            self.window.show_coordinator_error(problem)

    # ---- showing

    def show(self, minimized: bool = False) -> None:
        if QSystemTrayIcon.isSystemTrayAvailable():
            self.tray.show()
            logger.info("the tray icon is shown")
        else:
            logger.info("this desktop has no system tray: the window stays the app's face")
        if not minimized or not QSystemTrayIcon.isSystemTrayAvailable():
            self.show_window()
            logger.info("the window is shown")
        if self.settings.earning and self.settings_writable:
            self.start(self.settings.coordinator)  # it was earning when it last closed: go on

    def show_window(self) -> None:
        self.window.show()
        self.window.raise_()
        self.window.activateWindow()
        self.bridge.probe_telemetry()

    # ---- the seller's actions

    def start(self, coordinator: str) -> None:
        try:
            coordinator = token_store.normalize_coordinator_url(coordinator)
        except ValueError as error:
            self.window.show_coordinator_error(f"{error}: type the address your swarm gave you")
            return
        self.window.show_coordinator_error(None)
        # An invite code is for the swarm it was typed for: another address starts without one.
        invite_code = self.settings.invite_code if coordinator == self.settings.coordinator else None
        self._save(
            self.settings.model_copy(
                update={"coordinator": coordinator, "earning": True, "invite_code": invite_code}
            )
        )
        self.activity = state.RunState(running=True)
        try:
            runtime = self._engine_runtime(self.settings)
        except LockError as error:
            self._on_stopped(f"This app cannot fetch its engine: {error}")
            return
        # Fetched, or checked against its hashes (and repaired) once per launch before the first job.
        if runtime is not None and not (runtime.ready() and self._runtime_checked):
            self._fetch_runtime(runtime, coordinator, invite_code)
        else:
            self._start_agent(coordinator, invite_code)
        self._update_view()

    def _start_agent(self, coordinator: str, invite_code: str | None) -> None:
        self.bridge.start(
            coordinator,
            self.settings.guards,
            invite_code=invite_code,
            sharing=self.settings.sharing,
            electricity=self.settings.electricity,
        )
        self._earnings_timer.start()

    def _fetch_runtime(self, runtime: Runtimes, coordinator: str, invite_code: str | None) -> None:
        """Fetch the engine runtime, showing its progress; start the agent once it is in."""
        fetch = RuntimeFetch(runtime, self)
        self._runtime_fetch = fetch
        self.activity = state.RunState(running=True, fetching_engine=True)
        fetch.progressed.connect(lambda progress: self.window.show_runtime_fetch(progress, runtime.reason))
        fetch.finished.connect(lambda folder: self._on_runtime_ready(folder, coordinator, invite_code))
        fetch.failed.connect(self._on_runtime_failed)
        fetch.cancelled.connect(self._on_runtime_cancelled)
        fetch.start()
        logger.info("fetching the engine runtime %s (%s)", runtime.name, runtime.reason)

    def _on_runtime_ready(self, folder: Path, coordinator: str, invite_code: str | None) -> None:
        self._runtime_fetch = None
        self._runtime_checked = True
        self.window.show_runtime_fetch(None)
        child_process.use_runtime(folder / SITE_PACKAGES)
        logger.info("the engine runtime %s is ready", folder.name)
        if self.activity.running and not self.activity.stopping:
            self.activity = state.RunState(running=True)
            self._start_agent(coordinator, invite_code)
        self._update_view()

    def _on_runtime_failed(self, message: str) -> None:
        self._runtime_fetch = None
        self.window.show_runtime_fetch(None)
        self._on_stopped(message)

    def _on_runtime_cancelled(self) -> None:
        self._runtime_fetch = None
        self.window.show_runtime_fetch(None)
        self._save(self.settings.model_copy(update={"earning": False}))
        self.activity = state.RunState()
        self._update_view()

    def stop(self) -> None:
        """Stop earning; the job checkpoints and is handed back first (a second Stop kills it). While
        the engine is being fetched, the fetch stops (what it has stays for the next Start)."""
        if not self.activity.running:
            return
        if self._runtime_fetch is not None:
            self._runtime_fetch.cancel()
            return
        self._save(self.settings.model_copy(update={"earning": False}))
        self.activity = state.RunState(running=True, stopping=True)
        self.bridge.stop()
        self._update_view()

    def submit_invite_code(self, text: str) -> None:
        """The seller typed the invite code the coordinator asked for: keep it (until this computer
        has joined) and let the waiting registration try it at once."""
        try:
            code = normalize_invite_code(text)
        except ValueError as error:
            self.window.show_invite_code_error(str(error))
            return
        self.window.show_invite_code_error(None)
        self._save(self.settings.model_copy(update={"invite_code": code}))
        self.bridge.set_invite_code(code)

    def open_settings(self) -> None:
        dialog = SettingsDialog(self.settings, self.window)
        if dialog.exec() and dialog.result_settings is not None:
            self._save(dialog.result_settings)
            self.bridge.set_guards(self.settings.guards)
            self.bridge.set_electricity(self.settings.electricity)
            self._show_money()
            self.window.set_temperature_limit(self.settings.guards.temperature_limit_celsius)

    def request_payout(self) -> None:
        """Ask where to be paid and how much, then ask the coordinator; the card shows the outcome."""
        dialog = PayoutDialog(self.settings.payout_payee or "", STYLE_SHEET, self.window)
        if not dialog.exec() or dialog.result_payee is None:
            return
        payee, amount = dialog.result_payee, dialog.result_amount_micro
        self._save(self.settings.model_copy(update={"payout_payee": payee}))
        key = f"tray-{secrets.token_hex(12)}"  # one request: a retry of it cannot pay twice
        self.window.payouts.show_error(None)
        self.bridge.ask(
            "payout", lambda client: client.request_payout(payee, amount_micro=amount, request_key=key)
        )

    def show_receipt(self, job_id: str) -> None:
        self.bridge.ask("receipt", lambda client: client.receipt(job_id))

    def close(self) -> None:
        """Stop the timers and the probing thread (the agent is the caller's: see quit)."""
        self._market_timer.stop()
        self._earnings_timer.stop()
        self._probe_timer.stop()
        self.bridge.close()
        self.tray.hide()

    def quit(self) -> None:
        """Stop the agent (waiting for its job's checkpoint), then leave; the next start goes on earning
        if it was earning now."""
        earning = self.activity.running and not self.activity.stopping
        if self._runtime_fetch is not None:  # what it fetched stays: the next start goes on from there
            self._runtime_fetch.cancel()
            self._runtime_fetch.wait(10)
        if self.bridge.running:
            self.bridge.stop()
            if not self.bridge.wait(QUIT_WAIT_SECONDS):
                self.bridge.stop()  # the second stop kills the job
                self.bridge.wait(10)
        if earning:
            self._save(self.settings.model_copy(update={"earning": True}))
        self.close()
        QApplication.quit()

    # ---- what the agent says

    def _on_status(self, status: AgentStatus) -> None:
        if self.settings.notifications:
            for title, message in state.notifications(self.status, status):
                self._notify(title, message)
        earnings_changed = self.status is None or status.earnings != self.status.earnings
        money_changed = self.status is None or _money_inputs(status) != _money_inputs(self.status)
        if status.connected and (self.status is None or not self.status.connected):
            self._fetch_market()  # the figures now count this computer
        self.status = status
        if status.node_id is not None and self.settings.invite_code is not None:
            # Registered: the code has done its work, and is not kept where it could be read.
            self._save(self.settings.model_copy(update={"invite_code": None}))
        if status.telemetry is not None and status.telemetry is not self.telemetry:
            self.telemetry = status.telemetry
            if self.temperatures.add(time.time(), status.telemetry):
                self.window.show_temperatures(self.temperatures)
        if earnings_changed and status.node_id is not None:
            self.bridge.request_earnings_history()
            self.bridge.ask("payouts", lambda client: client.payouts())
        if money_changed:  # not at every telemetry reading: the jobs list would lose its selection
            self._show_money()
        self._update_view()

    def _on_telemetry(self, telemetry) -> None:
        self.telemetry = telemetry
        self.window.show_telemetry(telemetry)
        if self.temperatures.add(time.time(), telemetry):
            self.window.show_temperatures(self.temperatures)
        self._update_view()

    def _on_earnings_history(self, history: dict) -> None:
        self.summary = state.summarize_earnings(history, datetime.datetime.now().astimezone())
        self._show_money()
        self._update_view()

    def _on_answered(self, what: str, answer: Any) -> None:
        if what == "market":
            try:
                self.market = MarketFigures.model_validate(answer)
            except ValueError as error:
                self.window.forecast.show_forecast(None, f"the coordinator's figures are malformed ({error})")
                return
            self._show_money()
        elif what == "payouts":
            balances, lines = payout_lines(answer)
            self.window.payouts.show_payouts(balances, lines)
        elif what == "payout":
            self._notify(
                "Payout requested",
                f"{format_credits(answer['amount_micro'])} credits to {answer['payee']}: the swarm operator pays it",
            )
            self.bridge.ask("payouts", lambda client: client.payouts())
        elif what == "receipt":
            node_id = self.status.node_id if self.status is not None else ""
            ReceiptDialog(economy.receipt_text(answer, node_id or ""), STYLE_SHEET, self.window).exec()

    def _on_ask_failed(self, what: str, message: str) -> None:
        logger.info("%s: %s", what, message)
        if what == "market":
            self.window.forecast.show_forecast(
                None, f"the swarm's market figures could not be read ({message})"
            )
        elif what in ("payouts", "payout"):
            self.window.payouts.show_error(message[:1].upper() + message[1:])
        elif what == "receipt":
            ReceiptDialog(f"The receipt could not be read: {message}", STYLE_SHEET, self.window).exec()

    def _fetch_market(self) -> None:
        self.bridge.fetch_market(self.settings.coordinator)

    def _show_money(self) -> None:
        """The forecast, the net profit and the jobs' pay and electricity, from what is known now."""
        status = self.status
        electricity = self.settings.electricity
        credit_value = (status.credit_value if status is not None else None) or (
            self.market.credit_value if self.market is not None else None
        )
        jobs = status.recent_jobs if status is not None else ()
        if self.market is not None:
            measured = economy.measured_watts(jobs)
            self.window.forecast.show_forecast(
                economy.forecast_text(self.market, self.telemetry, measured, electricity)
            )
        if self.summary is not None:
            by_day = status.electricity_by_day if status is not None else ()
            money = economy.money_summary(
                self.summary, by_day, credit_value, electricity, datetime.date.today()
            )
            self.window.show_earnings(self.summary, money)
        lines = economy.job_lines(jobs, credit_value, electricity)
        pay, spent = economy.job_chart(jobs, credit_value, electricity)
        unit = electricity.currency if spent else "credits"
        self.window.jobs.show_jobs(
            lines, pay, spent, status.energy_source if status is not None else None, unit
        )

    def _on_stopped(self, problem: str | None, download_page: str | None = None) -> None:
        self._earnings_timer.stop()
        self.activity = state.RunState(error=problem, download_page=download_page)
        if problem is not None:
            self._save(self.settings.model_copy(update={"earning": False}))
            if self.settings.notifications:
                self._notify("compute-swarm stopped", problem, QSystemTrayIcon.MessageIcon.Critical)
        self._update_view()

    # ---- inside

    def _connect(self) -> None:
        self.window.start_requested.connect(self.start)
        self.window.stop_requested.connect(self.stop)
        self.window.settings_requested.connect(self.open_settings)
        self.window.invite_code_entered.connect(self.submit_invite_code)
        self.window.runtime_cancel_requested.connect(self.stop)
        self.window.payout_requested.connect(self.request_payout)
        self.window.receipt_requested.connect(self.show_receipt)
        self.bridge.answered.connect(self._on_answered)
        self.bridge.ask_failed.connect(self._on_ask_failed)
        self.bridge.status_changed.connect(self._on_status)
        self.bridge.telemetry_read.connect(self._on_telemetry)
        self.bridge.earnings_history_read.connect(self._on_earnings_history)
        self.bridge.earnings_history_failed.connect(lambda message: logger.info("earnings: %s", message))
        self.bridge.stopped.connect(self._on_stopped)
        self.tray.activated.connect(self._on_tray_activated)

    def _build_tray_menu(self) -> None:
        menu = QMenu()
        self.headline_action = QAction("Not earning", menu, enabled=False)
        self.start_stop_action = QAction("Start earning", menu)
        self.start_stop_action.triggered.connect(self._toggle)
        open_action = QAction("Open compute-swarm", menu)
        open_action.triggered.connect(self.show_window)
        quit_action = QAction("Quit", menu)
        quit_action.triggered.connect(self.quit)
        for action in (self.headline_action, self.start_stop_action, open_action):
            menu.addAction(action)
        menu.addSeparator()
        menu.addAction(quit_action)
        self.tray.setContextMenu(menu)
        self._menu = menu  # kept: the tray icon does not own it

    def _toggle(self) -> None:
        if self.activity.running:
            self.stop()
        else:
            self.start(self.settings.coordinator)

    def _on_tray_activated(self, reason: QSystemTrayIcon.ActivationReason) -> None:
        if reason in (QSystemTrayIcon.ActivationReason.Trigger, QSystemTrayIcon.ActivationReason.DoubleClick):
            if self.window.isVisible():
                self.window.hide()
            else:
                self.show_window()

    def _probe_while_idle(self) -> None:
        if not self.bridge.running and self.window.isVisible():
            self.bridge.probe_telemetry()

    def _update_view(self) -> None:
        status = self.status if self.activity.running else None
        self.window.show_status(status, self.activity)
        icon_state = state.icon_state(status, self.activity)
        self.tray.setIcon(state_icon(icon_state))
        self.tray.setToolTip(state.tooltip(status, self.activity, self.telemetry, self._today()))
        self.headline_action.setText(state.headline(status, self.activity))
        self.start_stop_action.setText("Stop" if self.activity.running else "Start earning")
        self.start_stop_action.setEnabled(not self.activity.stopping)

    def _today(self) -> int | None:
        return self.summary.today_micro if self.summary is not None else None

    def _notify(
        self,
        title: str,
        message: str,
        icon: QSystemTrayIcon.MessageIcon = QSystemTrayIcon.MessageIcon.Information,
    ) -> None:
        logger.info("%s: %s", title, message)
        if self.tray.isVisible() and QSystemTrayIcon.supportsMessages():
            self.tray.showMessage(title, message, icon, 8000)

    def _save(self, settings: Settings) -> None:
        previous, self.settings = self.settings, settings
        if not self.settings_writable:
            return  # a newer version's file: never overwritten by this one
        try:
            self.store.save(settings)
        except SettingsError as error:
            self.window.show_coordinator_error(str(error))
        if settings.autostart != previous.autostart:
            self.apply_autostart(settings.autostart)

    def apply_autostart(self, enabled: bool) -> None:
        if not self.manage_autostart:
            return
        try:
            if enabled:
                autostart.enable()
            else:
                autostart.disable()
        except autostart.AutostartError as error:
            self.window.show_coordinator_error(f"could not change start at login: {error}")


def _money_inputs(status: AgentStatus) -> tuple:
    """What the money cards are drawn from, of the agent's status."""
    return (
        status.credit_value,
        status.electricity,
        status.recent_jobs,
        status.electricity_by_day,
        status.energy_source,
    )


def run_tray(data_dir: Path, *, minimized: bool = False, settings_path: Path | None = None) -> int:
    application = QApplication.instance() or QApplication([])
    application.setApplicationName("compute-swarm")
    application.setQuitOnLastWindowClosed(False)
    store = SettingsStore(settings_path)
    instance = SingleInstance(str(store.path))
    if not instance.claim():
        logger.info("compute-swarm is running already: showed its window")
        return 0
    is_first_run = not store.path.exists()
    if is_first_run:  # a download from a sell page knows its swarm
        first_run.join_offered_swarm(
            store, app_folder=first_run.app_folder(), downloads=first_run.downloads_folder()
        )
    app = TrayApp(store, data_dir)
    instance.activated.connect(app.show_window)
    if is_first_run:
        _first_run_autostart(app)
    app.show(minimized=minimized)
    return application.exec()


def _first_run_autostart(app: TrayApp) -> None:
    """Start at login is on by default: register it the first time, then follow the setting."""
    if app.settings.autostart and app.settings_writable:
        app.apply_autostart(True)
        app.store.save(app.settings)
