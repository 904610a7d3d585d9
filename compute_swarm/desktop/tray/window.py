"""The tray's window: what the GPU is doing, the job, the earnings and the guards, at a glance; and the
settings dialog. Widgets only show what they are given (`show_status`, `show_earnings`, ...); the app
decides when.
"""

from __future__ import annotations

import datetime
import html

from pydantic import ValidationError
from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QCloseEvent
from PySide6.QtWidgets import (
    QCheckBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFormLayout,
    QFrame,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from compute_swarm.desktop.agent_status import AgentStatus
from compute_swarm.desktop.electricity import ElectricitySettings
from compute_swarm.desktop.guards import GuardSettings
from compute_swarm.desktop.runtime.fetch import Progress
from compute_swarm.desktop.settings import Settings
from compute_swarm.desktop.tray import state
from compute_swarm.desktop.tray.economy import MoneySummary, money_text
from compute_swarm.desktop.tray.economy_view import ForecastCard, JobsCard, PayoutsCard
from compute_swarm.desktop.tray.widgets import (
    MUTED,
    STATE_COLORS,
    TEXT,
    Chart,
    Meter,
    card,
    label,
    state_icon,
)
from compute_swarm.protocol import GpuTelemetry, Telemetry

LINK = "#8ab4ff"  # readable on the window's dark cards and on the notice's amber
STYLE_SHEET = f"""
QWidget {{ color: {TEXT}; font-size: 10pt; }}
MainWindow, QDialog, QScrollArea#page, QWidget#page {{ background: #12161f; }}
QListWidget {{ background: #0d1017; border: 1px solid #2a3140; border-radius: 6px; }}
QListWidget::item {{ padding: 3px 4px; }}
QListWidget::item:selected {{ background: #2a3140; }}
QLabel, QCheckBox {{ background: transparent; }}
QFrame#card {{ background: #1b2130; border-radius: 10px; }}
QLabel#muted {{ color: {MUTED}; }}
QLabel#title {{ font-size: 11pt; font-weight: 600; }}
QLabel#headline {{ font-size: 15pt; font-weight: 600; }}
QLabel#big {{ font-size: 17pt; font-weight: 600; }}
QLabel#error {{ color: {STATE_COLORS["error"]}; }}
QLabel#notice {{ background: #2a2614; color: #ffd60a; border-radius: 8px; padding: 8px 10px; }}
QLineEdit, QSpinBox, QDoubleSpinBox {{ background: #0d1017; border: 1px solid #2a3140; border-radius: 6px;
    padding: 4px 6px; }}
QLineEdit:disabled {{ color: {MUTED}; }}
QPushButton {{ background: #2a3140; border: none; border-radius: 8px; padding: 7px 14px; }}
QPushButton:hover {{ background: #343d50; }}
QPushButton#primary {{ background: {STATE_COLORS["earning"]}; color: #06210f; font-size: 12pt;
    font-weight: 700; padding: 9px 22px; }}
QPushButton#primary:hover {{ background: #4cd872; }}
QPushButton#primary-small {{ background: {STATE_COLORS["earning"]}; color: #06210f; font-weight: 700; }}
QPushButton#primary-small:hover {{ background: #4cd872; }}
QPushButton#stop {{ background: #3a2a2a; color: #ffb4ae; font-size: 12pt; font-weight: 700;
    padding: 9px 22px; }}
QProgressBar {{ background: #2a3140; border: none; border-radius: 4px; height: 8px; text-align: center;
    color: transparent; }}
QProgressBar::chunk {{ background: {STATE_COLORS["idle"]}; border-radius: 4px; }}
"""


class GpuCard(QFrame):
    def __init__(self) -> None:
        super().__init__()
        self.setObjectName("card")
        layout = QGridLayout(self)
        layout.setContentsMargins(14, 12, 14, 12)
        self.name = label("", "title")
        self.temperature = label("—", "big")
        self.temperature.setAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        self.utilization = Meter("Utilisation", STATE_COLORS["idle"])
        self.memory = Meter("VRAM", "#a78bfa")
        self.power = label("", "muted")
        layout.addWidget(self.name, 0, 0)
        layout.addWidget(self.temperature, 0, 1)
        layout.addWidget(self.utilization, 1, 0, 1, 2)
        layout.addWidget(self.memory, 2, 0, 1, 2)
        layout.addWidget(self.power, 3, 0, 1, 2)
        layout.setColumnStretch(0, 1)  # the name gets the room, the temperature what it needs

    def show_gpu(self, gpu: GpuTelemetry, limit_celsius: float) -> None:
        self.name.setText(gpu.name)
        if gpu.temperature_celsius is None:
            self.temperature.setText("— °C")
        else:
            hot = gpu.temperature_celsius >= limit_celsius - 5
            color = STATE_COLORS["paused"] if hot else TEXT
            self.temperature.setText(f"<span style='color:{color}'>{gpu.temperature_celsius:.0f} °C</span>")
        utilization = gpu.utilization_percent
        self.utilization.set_value(
            None if utilization is None else utilization / 100,
            "—" if utilization is None else f"{utilization:.0f} %",
        )
        total, free = gpu.memory_total_bytes, gpu.memory_free_bytes
        if total and free is not None:
            used = total - free
            self.memory.set_value(used / total, f"{state.format_bytes(used)} of {state.format_bytes(total)}")
        else:
            self.memory.set_value(None, state.format_bytes(total))
        self.power.setText("" if gpu.power_watts is None else f"Power {gpu.power_watts:.0f} W")


class MainWindow(QWidget):
    start_requested = Signal(str)  # the coordinator address typed
    stop_requested = Signal()
    settings_requested = Signal()
    invite_code_entered = Signal(str)  # as typed: the app checks it
    runtime_cancel_requested = Signal()
    payout_requested = Signal()
    receipt_requested = Signal(str)  # a job id

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.setWindowTitle("compute-swarm")
        self.setWindowIcon(state_icon("offline"))
        self.setStyleSheet(STYLE_SHEET)
        self.setMinimumWidth(520)
        self.resize(560, 860)
        self._limit_celsius = settings.guards.temperature_limit_celsius
        self._running = False
        # Everything scrolls: the money cards make the window taller than a laptop's screen.
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        scroll = QScrollArea()
        scroll.setObjectName("page")
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        page = QWidget()
        page.setObjectName("page")
        scroll.setWidget(page)
        self.page = page
        outer.addWidget(scroll)
        root = QVBoxLayout(page)
        root.setContentsMargins(16, 16, 16, 16)
        root.setSpacing(12)

        # ---- the state, the one big button
        header = QHBoxLayout()
        self.icon = QLabel()
        self.icon.setFixedSize(40, 40)
        header.addWidget(self.icon)
        headings = QVBoxLayout()
        self.headline = label("Not earning", "headline")
        self.detail = label("", "muted")
        headings.addWidget(self.headline)
        headings.addWidget(self.detail)
        header.addLayout(headings, 1)
        self.start_stop = QPushButton("Start earning")
        self.start_stop.setObjectName("primary")
        self.start_stop.setCursor(Qt.CursorShape.PointingHandCursor)
        self.start_stop.clicked.connect(self._start_or_stop)
        header.addWidget(self.start_stop, 0, Qt.AlignmentFlag.AlignTop)
        root.addLayout(header)
        self.update_notice = label("", "notice")
        self.update_notice.setTextFormat(Qt.TextFormat.RichText)
        self.update_notice.setOpenExternalLinks(True)  # the coordinator's sell page, in the browser
        self.update_notice.hide()
        root.addWidget(self.update_notice)

        # The address, and under it the invite code where the coordinator asks for one: one grid, so
        # the two fields line up.
        address = QGridLayout()
        address.setHorizontalSpacing(8)
        address.addWidget(label("Coordinator", "muted"), 0, 0)
        self.coordinator = QLineEdit(settings.coordinator)
        self.coordinator.setPlaceholderText("http://127.0.0.1:8000")
        self.coordinator.returnPressed.connect(self._start_or_stop)
        address.addWidget(self.coordinator, 0, 1)
        self.settings_button = QPushButton("Settings")
        self.settings_button.clicked.connect(self.settings_requested.emit)
        address.addWidget(self.settings_button, 0, 2)
        self.invite_code_label = label("Invite code", "muted")
        self.invite_code = QLineEdit(settings.invite_code or "")
        self.invite_code.setPlaceholderText("swarm-invite-…, from the swarm operator")
        self.invite_code.returnPressed.connect(self._submit_invite_code)
        self.join_button = QPushButton("Join")
        self.join_button.setObjectName("primary-small")
        self.join_button.clicked.connect(self._submit_invite_code)
        self._invite_widgets = (self.invite_code_label, self.invite_code, self.join_button)
        for column, widget in enumerate(self._invite_widgets):
            address.addWidget(widget, 1, column)
            widget.hide()
        address.setColumnStretch(1, 1)
        root.addLayout(address)
        self.coordinator_error = label("", "error")
        self.coordinator_error.hide()
        root.addWidget(self.coordinator_error)

        # ---- the engine, fetched once by a packaged app before its first job
        self.runtime_card, runtime_layout = card("Getting the engine ready (once)")
        self.runtime_reason = label("", "muted")
        self.runtime_progress = QProgressBar()
        self.runtime_progress.setRange(0, 1000)
        self.runtime_progress.setTextVisible(False)
        self.runtime_progress.setFixedHeight(8)
        self.runtime_numbers = label("")
        self.runtime_detail = label("", "muted")
        self.runtime_cancel = QPushButton("Cancel")
        self.runtime_cancel.clicked.connect(self.runtime_cancel_requested.emit)
        for widget in (self.runtime_reason, self.runtime_progress, self.runtime_numbers, self.runtime_detail):
            runtime_layout.addWidget(widget)
        runtime_layout.addWidget(self.runtime_cancel, 0, Qt.AlignmentFlag.AlignRight)
        self.runtime_card.hide()
        root.addWidget(self.runtime_card)

        # ---- the forecast: what this PC could earn, before and while it does
        self.forecast = ForecastCard()
        root.addWidget(self.forecast)

        # ---- the GPUs
        self.gpu_cards: list[GpuCard] = []
        self.gpu_area = QVBoxLayout()
        self.gpu_area.setSpacing(8)
        self.no_gpu = label("Looking for GPUs…", "muted")
        self.gpu_area.addWidget(self.no_gpu)
        root.addLayout(self.gpu_area)

        # ---- the job
        job_card, job_layout = card("Current job")
        self.job_title = label("No job right now")
        self.job_progress = QProgressBar()
        self.job_progress.setTextVisible(False)
        self.job_progress.setFixedHeight(8)
        self.job_progress.hide()
        self.job_details = label("", "muted")
        self.last_job = label("", "muted")
        for widget in (self.job_title, self.job_progress, self.job_details, self.last_job):
            job_layout.addWidget(widget)
        root.addWidget(job_card)

        # ---- the earnings, the electricity they cost, and the difference
        earnings_card, earnings_layout = card("Net profit: earnings less electricity")
        numbers = QGridLayout()
        self.earned: dict[str, QLabel] = {}
        self.earned_detail: dict[str, QLabel] = {}
        for column, (key, caption) in enumerate(
            (("today", "Today"), ("week", "This week"), ("total", "Total"))
        ):
            value = label("—", "big")
            numbers.addWidget(value, 0, column)
            numbers.addWidget(label(caption, "muted"), 1, column)
            detail = label("", "muted")
            numbers.addWidget(detail, 2, column, Qt.AlignmentFlag.AlignTop)
            self.earned[key], self.earned_detail[key] = value, detail
        earnings_layout.addLayout(numbers)
        self.money_problem = label("", "notice")
        self.money_problem.hide()
        earnings_layout.addWidget(self.money_problem)
        self.balances = label("", "muted")
        earnings_layout.addWidget(self.balances)
        self.earnings_chart = Chart("bars", STATE_COLORS["earning"])
        self.earnings_chart.empty_text = "your earnings per day will show here"
        earnings_layout.addWidget(self.earnings_chart)
        self.earnings_legend = label("", "muted")
        earnings_layout.addWidget(self.earnings_legend)
        root.addWidget(earnings_card)

        # ---- each job's pay and electricity, its receipt; the payouts
        self.jobs = JobsCard()
        self.jobs.receipt_requested.connect(self.receipt_requested.emit)
        root.addWidget(self.jobs)
        self.payouts = PayoutsCard()
        self.payouts.payout_requested.connect(self.payout_requested.emit)
        root.addWidget(self.payouts)

        # ---- the temperature
        temperature_card, temperature_layout = card("GPU temperature, last 30 minutes")
        self.temperature_chart = Chart("line", "#ff9f0a", " °C")
        self.temperature_chart.threshold = self._limit_celsius
        temperature_layout.addWidget(self.temperature_chart)
        root.addWidget(temperature_card)

        self.connection = label("", "muted")
        root.addWidget(self.connection)
        self.show_status(None, state.RunState())

    # ---- what the app hands over

    def show_status(self, status: AgentStatus | None, activity: state.RunState) -> None:
        self._running = activity.running
        icon_state = state.icon_state(status, activity)
        self.icon.setPixmap(state_icon(icon_state).pixmap(40, 40))
        self.setWindowIcon(state_icon(icon_state))
        title, detail = state.headline_parts(status, activity)
        self.headline.setText(title)
        self.headline.setStyleSheet(f"color: {STATE_COLORS[icon_state]};" if icon_state != "offline" else "")
        asking_for_invite_code = (
            status is not None and activity.running and status.invite_code_wanted is not None
        )
        if activity.download_page is not None:
            pass  # the headline's words; the update line under it says where the app is
        elif activity.error:
            detail = activity.error
        elif (
            status is not None
            and activity.running
            and not status.connected
            and status.problem
            and not asking_for_invite_code  # there the headline's detail says what to do
        ):
            detail = status.problem
        elif not activity.running:
            detail = "Press Start earning to rent this GPU to the swarm while you are not using it."
        self.detail.setText(detail[:1].upper() + detail[1:] if detail else "")
        self.start_stop.setText("Stop" if activity.running else "Start earning")
        self.start_stop.setObjectName("stop" if activity.running else "primary")
        self.start_stop.setEnabled(not activity.stopping)
        self.start_stop.style().polish(self.start_stop)
        self.coordinator.setEnabled(not activity.running)
        self.settings_button.setEnabled(True)
        self._show_invite_code_field(asking_for_invite_code)
        self._show_job(status)
        if status is not None:
            if status.telemetry is not None:
                self.show_telemetry(status.telemetry)
            if status.earnings is not None:
                earnings = status.earnings
                self.balances.setText(
                    f"Pending verification {state.credits_text(earnings.pending_micro)} · "
                    f"available {state.credits_text(earnings.available_micro)} · "
                    f"{earnings.jobs_completed} job{'' if earnings.jobs_completed == 1 else 's'} done"
                )
        sharing = state.sharing_text(status) if activity.running else ""
        self.connection.setText(self._connection_text(status, activity) + (f"\n{sharing}" if sharing else ""))
        notice = state.update_notice(status, activity)
        self.update_notice.setVisible(notice is not None)
        if notice is not None:
            self.update_notice.setText(
                f'{html.escape(notice.text)} <a href="{html.escape(notice.url)}" style="color: {LINK};">'
                f"{html.escape(notice.link_text)}</a>"
            )

    def show_telemetry(self, telemetry: Telemetry) -> None:
        while len(self.gpu_cards) < len(telemetry.gpus):
            card = GpuCard()
            self.gpu_cards.append(card)
            self.gpu_area.addWidget(card)
        for card, gpu in zip(self.gpu_cards, telemetry.gpus, strict=False):
            card.show_gpu(gpu, self._limit_celsius)
            card.show()
        for card in self.gpu_cards[len(telemetry.gpus) :]:
            card.hide()
        if telemetry.gpus:
            self.no_gpu.hide()
        else:
            self.no_gpu.setText(
                f"No GPU found: jobs would run on the CPU ({telemetry.cpu.name}, {telemetry.cpu.logical_cores} "
                "threads), slowly."
            )
            self.no_gpu.show()

    def show_earnings(self, summary: state.EarningsSummary, money: MoneySummary | None) -> None:
        """Net profit where earnings convert into the seller's money, else the credits earned; each
        period's earnings and electricity under it; the days' earnings beside their electricity."""
        periods = {"today": summary.today_micro, "week": summary.week_micro, "total": summary.total_micro}
        labels = [day.strftime("%a %d") for day, _ in summary.daily]
        if money is None:
            for key, credits in periods.items():
                self.earned[key].setText(state.credits_text(credits))
                self.earned_detail[key].setText("credits")
            self.earnings_chart.set_values([amount / 1e6 for _, amount in summary.daily], labels)
            self.earnings_legend.setText("credits earned per day")
            return
        for key, period in (("today", money.today), ("week", money.week), ("total", money.total)):
            net = period.net_micro
            self.earned[key].setText(
                money_text(net, money.currency)
                if net is not None
                else state.credits_text(period.credits_micro)
            )
            earned = money_text(period.gross_micro, money.currency) if period.gross_micro is not None else ""
            self.earned_detail[key].setText(
                f"earned {earned}\nelectricity {money_text(period.electricity_micro, money.currency)}\n"
                f"({state.credits_text(period.credits_micro)} credits)"
            )
        self.money_problem.setText(
            money.problem[:1].upper() + money.problem[1:] + "." if money.problem else ""
        )
        self.money_problem.setVisible(bool(money.problem))
        if money.net_by_day:
            electricity = dict(money.electricity_by_day)
            earned_by_day = [(net + electricity.get(day, 0)) / 1e6 for day, net in money.net_by_day]
            spent_by_day = [electricity.get(day, 0) / 1e6 for day, _ in money.net_by_day]
            self.earnings_chart.set_values(earned_by_day, labels, spent_by_day)
            self.earnings_legend.setText(f"per day, in {money.currency}: green earned · red electricity")
        else:
            self.earnings_chart.set_values([amount / 1e6 for _, amount in summary.daily], labels)
            self.earnings_legend.setText("credits earned per day")

    def show_temperatures(self, history: state.TemperatureHistory) -> None:
        values = history.values()
        labels = []
        if history.points:
            first = datetime.datetime.fromtimestamp(history.points[0][0]).strftime("%H:%M")
            labels = [first, "now"]
        self.temperature_chart.set_values(values, labels)

    def set_temperature_limit(self, limit_celsius: float) -> None:
        self._limit_celsius = limit_celsius
        self.temperature_chart.threshold = limit_celsius
        self.temperature_chart.update()

    def show_runtime_fetch(self, progress: Progress | None, reason: str = "") -> None:
        """The engine runtime's fetch: its progress, or None to put the card away."""
        self.runtime_card.setVisible(progress is not None)
        if progress is None:
            return
        self.runtime_reason.setText(reason)
        self.runtime_progress.setValue(round(progress.fraction * 1000))
        self.runtime_numbers.setText(state.runtime_fetch_text(progress))
        self.runtime_detail.setText(progress.detail)

    def show_coordinator_error(self, message: str | None) -> None:
        self.coordinator_error.setText(message or "")
        self.coordinator_error.setVisible(bool(message))

    def show_invite_code_error(self, message: str | None) -> None:
        """What is wrong with the code typed, before it is sent (empty, overlong, spaces inside)."""
        self.show_coordinator_error(message[:1].upper() + message[1:] if message else None)
        if message:
            self.invite_code.setFocus()

    # ---- inside

    def _start_or_stop(self) -> None:
        if self._running:
            self.stop_requested.emit()
        else:
            self.start_requested.emit(self.coordinator.text())

    def _submit_invite_code(self) -> None:
        self.invite_code_entered.emit(self.invite_code.text())

    def _show_invite_code_field(self, visible: bool) -> None:
        appearing = visible and self.invite_code.isHidden()
        for widget in self._invite_widgets:
            widget.setVisible(visible)
        if appearing:
            self.invite_code.setFocus()
            self.invite_code.selectAll()  # a refused code is typed over, not appended to

    def _show_job(self, status: AgentStatus | None) -> None:
        job = status.job if status else None
        last = status.last_job if status else None
        if job is not None and last is not None and last.job_id == job.job_id:
            job = None  # reported already: only its trainer is still exiting
        if job is None:
            self.job_title.setText(state.no_job_text(status))
            self.job_progress.hide()
            self.job_details.setText("")
        else:
            self.job_title.setText(state.describe_job(job))
            done, total = state.job_progress(job)
            self.job_progress.setRange(0, total or 0)  # 0..0: busy, not yet sized
            self.job_progress.setValue(done)
            self.job_progress.show()
            self.job_details.setText(state.job_details(job))
        self.last_job.setText(f"Last: job {last.job_id} {last.outcome} — {last.message}" if last else "")

    @staticmethod
    def _connection_text(status: AgentStatus | None, activity: state.RunState) -> str:
        if status is None or not activity.running:
            return "Not connected"
        node = f" as node {status.node_id}" if status.node_id else ""
        if status.invite_code_wanted is not None:
            return f"Not registered with {status.coordinator} yet: it wants an invite code"
        if status.connected:
            return f"Connected to {status.coordinator}{node}"
        return f"Not connected to {status.coordinator}{node}" + (
            f": {status.problem}" if status.problem else ""
        )

    def closeEvent(self, event: QCloseEvent) -> None:
        # The app lives in the tray: closing the window hides it (the app decides whether to quit).
        event.ignore()
        self.hide()


class SettingsDialog(QDialog):
    """The guards, start at login and notifications; each field's error is shown under it."""

    def __init__(self, settings: Settings, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("compute-swarm settings")
        self.setStyleSheet(STYLE_SHEET)
        self._settings = settings
        self.result_settings: Settings | None = None
        guards = settings.guards
        form = QFormLayout(self)
        self.temperature_limit = self._spin(
            QDoubleSpinBox(), 40, 110, guards.temperature_limit_celsius, " °C"
        )
        self.hysteresis = self._spin(QDoubleSpinBox(), 1, 30, guards.temperature_hysteresis_celsius, " °C")
        self.pause_for_games = QCheckBox("Pause when a game or other heavy program uses the GPU")
        self.pause_for_games.setChecked(guards.pause_for_games)
        self.heavy_process = self._spin(QSpinBox(), 64, 1024 * 1024, guards.heavy_process_mebibytes, " MiB")
        self.full_screen = QCheckBox("Pause while an application runs full screen")
        self.full_screen.setChecked(guards.pause_when_full_screen)
        self.only_when_idle = QCheckBox("Only work when I have been away for")
        self.only_when_idle.setChecked(guards.only_when_idle)
        self.idle_minutes = self._spin(QSpinBox(), 1, 24 * 60, guards.idle_minutes, " min")
        self.schedule = QCheckBox("Only work between")
        self.schedule.setChecked(guards.schedule_enabled)
        self.schedule_start = self._spin(QSpinBox(), 0, 23, guards.schedule_start_hour, ":00")
        self.schedule_end = self._spin(QSpinBox(), 0, 23, guards.schedule_end_hour, ":00")
        self.autostart = QCheckBox("Start compute-swarm when I log in")
        self.autostart.setChecked(settings.autostart)
        self.notifications = QCheckBox("Tell me when a job finishes, work pauses or the connection drops")
        self.notifications.setChecked(settings.notifications)
        electricity = settings.electricity
        self.price = QLineEdit(electricity.price_per_kwh)
        self.price.setPlaceholderText("as on your bill, e.g. 0.32")
        self.currency = QLineEdit(electricity.currency)
        self.currency.setMaxLength(3)
        self.currency.setPlaceholderText("EUR")
        self.exchange_rate = QLineEdit(electricity.exchange_rate or "")
        self.exchange_rate.setPlaceholderText("only where the swarm pays in another currency")
        self.only_profitable = QCheckBox("Only take jobs that pay more than their electricity")
        self.only_profitable.setChecked(electricity.only_profitable)

        form.addRow("Pause above", self.temperature_limit)
        form.addRow("Resume when cooler by", self.hysteresis)
        form.addRow(self.pause_for_games)
        form.addRow("Heavy means more than", self.heavy_process)
        form.addRow(self.full_screen)
        idle_row = QHBoxLayout()
        idle_row.addWidget(self.only_when_idle)
        idle_row.addWidget(self.idle_minutes)
        form.addRow(idle_row)
        schedule_row = QHBoxLayout()
        schedule_row.addWidget(self.schedule)
        schedule_row.addWidget(self.schedule_start)
        schedule_row.addWidget(QLabel("and"))
        schedule_row.addWidget(self.schedule_end)
        form.addRow(schedule_row)
        form.addRow(self.autostart)
        form.addRow(self.notifications)
        form.addRow(label("Electricity", "title"))
        price_row = QHBoxLayout()
        price_row.addWidget(self.price, 1)
        price_row.addWidget(QLabel("per kWh, in"))
        price_row.addWidget(self.currency)
        form.addRow("Price", price_row)
        form.addRow("1 unit of the swarm's currency is", self.exchange_rate)
        form.addRow(self.only_profitable)
        self.error = label("", "error")
        self.error.hide()
        form.addRow(self.error)
        self.buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Save | QDialogButtonBox.StandardButton.Cancel
        )
        self.buttons.accepted.connect(self._save)
        self.buttons.rejected.connect(self.reject)
        form.addRow(self.buttons)

    @staticmethod
    def _spin(box, minimum: float, maximum: float, value: float, suffix: str):
        box.setRange(minimum, maximum)
        box.setValue(value)
        box.setSuffix(suffix)
        return box

    def _save(self) -> None:
        try:
            guards = GuardSettings(
                temperature_limit_celsius=self.temperature_limit.value(),
                temperature_hysteresis_celsius=self.hysteresis.value(),
                pause_for_games=self.pause_for_games.isChecked(),
                heavy_process_mebibytes=self.heavy_process.value(),
                pause_when_full_screen=self.full_screen.isChecked(),
                only_when_idle=self.only_when_idle.isChecked(),
                idle_minutes=self.idle_minutes.value(),
                schedule_enabled=self.schedule.isChecked(),
                schedule_start_hour=self.schedule_start.value(),
                schedule_end_hour=self.schedule_end.value(),
            )
            electricity = ElectricitySettings(
                price_per_kwh=self.price.text(),
                currency=self.currency.text(),
                exchange_rate=self.exchange_rate.text() or None,
                only_profitable=self.only_profitable.isChecked(),
            )
        except ValidationError as error:
            message = str(error.errors()[0]["msg"]).removeprefix("Value error, ")
            self.error.setText(message[:1].upper() + message[1:])
            self.error.show()
            return
        self.result_settings = self._settings.model_copy(
            update={
                "guards": guards,
                "electricity": electricity,
                "autostart": self.autostart.isChecked(),
                "notifications": self.notifications.isChecked(),
            }
        )
        self.accept()
