"""The tray app, driven like a seller would (offscreen Qt): a real agent connected to a real coordinator
on loopback, a real fine-tune of SmolLM2, and the guards fed through the agent's telemetry interface
(its `probe` and `activity` readers), never by patching the app's insides."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import threading
import typing
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("PySide6", reason="desktop: the tray app's tests need PySide6 (the desktop extra)")

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QApplication

from compute_swarm.desktop.activity import Activity
from compute_swarm.desktop.guards import GuardSettings
from compute_swarm.desktop.runtime.fetch import Runtimes
from compute_swarm.desktop.settings import Settings, SettingsStore
from compute_swarm.desktop.tray import state
from compute_swarm.desktop.tray.app import SingleInstance, TrayApp
from compute_swarm.desktop.tray.widgets import state_icon
from compute_swarm.engine import child_process
from compute_swarm.engine.devices import CpuInfo, DeviceInventory, GpuInfo, GpuProcess
from compute_swarm.engine.jobs import DEMO_CHAT_DATASET
from compute_swarm.sdk.client import SwarmClient
from tests.coordinator.test_admission import coordinator_with, ops
from tests.coordinator.test_node_socket import check_ledger
from tests.desktop.test_joining import create_invite
from tests.desktop.wheel_index import TAGS, Index, make_wheel, pin_of
from tests.swarm_processes import Coordinator

pytestmark = pytest.mark.desktop

GIBIBYTE = 1024**3


class Machine:
    """What the agent reads through its telemetry interface, set by the test."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.temperature = 55.0
        self.processes: tuple[GpuProcess, ...] = ()
        self.full_screen: str | None = None

    def probe(self, check_torch: bool) -> DeviceInventory:
        with self.lock:
            gpu = GpuInfo(
                index=0,
                vendor="nvidia",
                name="NVIDIA GeForce RTX 4070",
                backend="cuda",
                memory_total_bytes=12 * GIBIBYTE,
                memory_free_bytes=9 * GIBIBYTE,
                temperature_celsius=self.temperature,
                utilization_percent=35.0,
                power_watts=120.0,
                processes=self.processes,
            )
        cpu = CpuInfo(
            name="test CPU",
            logical_cores=2,
            memory_total_bytes=24 * GIBIBYTE,
            memory_available_bytes=16 * GIBIBYTE,
        )
        # Jobs run on the CPU here: the GPU is only what the guards and the window see.
        return DeviceInventory(gpus=(gpu,), cpu=cpu, backends=("cpu",))

    def activity(self) -> Activity:
        return Activity(user_idle_seconds=None, fullscreen_application=self.full_screen)

    def set(self, **values: object) -> None:
        with self.lock:
            for name, value in values.items():
                setattr(self, name, value)


@pytest.fixture
def coordinator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    coordinator = Coordinator(tmp_path / "coordinator").start()
    monkeypatch.setenv("SWARM_COORDINATOR", coordinator.url)  # the first run's prefilled address
    yield coordinator
    coordinator.kill()
    check_ledger(coordinator.data_dir)


@pytest.fixture
def machine() -> Machine:
    return Machine()


@pytest.fixture
def make_app(qtbot, tmp_path: Path, machine: Machine):
    apps: list[TrayApp] = []

    def make(**options: Any) -> TrayApp:
        app = TrayApp(
            SettingsStore(tmp_path / "config" / "settings.json"),
            tmp_path / "node",
            agent_options={
                "probe": machine.probe,
                "activity": machine.activity,
                "guard_interval_seconds": 0.2,
            },
            manage_autostart=False,
            **options,
        )
        qtbot.addWidget(app.window)
        apps.append(app)
        app.show()
        return app

    yield make
    for app in apps:
        if app.bridge.running:
            app.bridge.stop()
            app.bridge.stop()  # at once: kill whatever runs
            assert app.bridge.wait(30)
        app.close()


def icon_state(app: TrayApp) -> str:
    # The status the window was last given (on the Qt thread), not the agent's newer one.
    return state.icon_state(app.status, app.activity)


def start(qtbot, app: TrayApp) -> None:
    qtbot.mouseClick(app.window.start_stop, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: icon_state(app) == "idle", timeout=30_000)
    assert (app.window.headline.text(), app.window.detail.text()) == ("Ready", "Waiting for a job")


def test_start_earning_runs_a_real_job_shows_it_and_its_earnings_then_stop(
    qtbot, make_app, coordinator: Coordinator, demo_model_directory: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="compute_swarm.desktop.tray.app")
    app = make_app()
    window = app.window
    assert window.coordinator.text() == coordinator.url  # first run: prefilled, nothing else asked
    assert window.start_stop.text() == "Start earning"
    qtbot.waitUntil(
        lambda: window.gpu_cards and "RTX 4070" in window.gpu_cards[0].name.text(), timeout=10_000
    )

    start(qtbot, app)
    assert not window.coordinator.isEnabled()
    assert window.connection.text().startswith(f"Connected to {coordinator.url} as node ")
    assert json.loads(app.store.path.read_text())["earning"] is True
    assert "GPU 55 °C" in app.tray.toolTip()

    buyer = SwarmClient(coordinator.url, coordinator.create_buyer("buyer"))
    dataset = buyer.upload_file(DEMO_CHAT_DATASET)
    job = buyer.submit_lora(
        {
            "base_model": "smollm2-135m-instruct",
            "dataset": dataset["id"],
            "max_steps": 3,
            "batch_size": 2,
            "max_sequence_length": 96,
            "learning_rate": 1e-3,
            "eval_fraction": 0.0,
        }
    )
    qtbot.waitUntil(lambda: icon_state(app) == "earning", timeout=60_000)
    assert job["id"] in window.job_title.text() and "LoRA fine-tune" in window.job_title.text()
    assert window.headline.text() == "Earning" and app.headline_action.text() == "Earning: running a job"
    qtbot.waitUntil(lambda: "completed" in window.last_job.text(), timeout=240_000)
    qtbot.waitUntil(lambda: buyer.job(job["id"])["state"] == "completed", timeout=30_000)

    def credits_today() -> str:
        found = re.search(r"\(([\d.]+) credits\)", window.earned_detail["today"].text())
        return found.group(1) if found else "0"

    # Today's net profit in the seller's money (a 3-step job on a CPU earns less than its
    # electricity), with what it earned and what the electricity cost under it.
    qtbot.waitUntil(lambda: float(credits_today()) > 0, timeout=30_000)
    assert "electricity $" in window.earned_detail["today"].text()
    assert window.earned["today"].text().lstrip("-").startswith("$")
    assert window.earned["total"].text() == window.earned["today"].text()
    assert "1 job done" in window.balances.text()
    assert f"Today: {credits_today()} credits" in app.tray.toolTip()
    # The job's own line: what it pays, the energy it used and what that cost.
    qtbot.waitUntil(lambda: window.jobs.jobs.count() == 1, timeout=10_000)
    line = window.jobs.jobs.item(0).text()
    assert job["id"] in line and "pays" in line and "Wh" in line and re.search(r"net -?\$", line)
    assert any(f"Job finished: Job {job['id']} is done" in message for message in caplog.messages)
    qtbot.waitUntil(lambda: icon_state(app) == "idle", timeout=30_000)  # once the trainer has exited

    qtbot.mouseClick(window.start_stop, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not app.activity.running, timeout=60_000)
    assert window.headline.text() == "Not earning" and window.start_stop.text() == "Start earning"
    assert window.coordinator.isEnabled()
    assert json.loads(app.store.path.read_text())["earning"] is False


def test_guards_pause_and_resume_from_the_telemetry_feed(
    qtbot, make_app, coordinator: Coordinator, machine: Machine
) -> None:
    app = make_app()
    start(qtbot, app)

    machine.set(temperature=90.0)
    qtbot.waitUntil(lambda: icon_state(app) == "paused", timeout=10_000)
    assert app.window.headline.text() == "Paused"
    assert app.window.detail.text() == "The GPU is at 90 °C (limit 83 °C; resumes below 75 °C)"
    assert app.headline_action.text() == "Paused: the GPU is at 90 °C (limit 83 °C; resumes below 75 °C)"
    machine.set(temperature=78.0)  # cooler, but not by the hysteresis yet
    qtbot.wait(800)
    assert icon_state(app) == "paused"
    assert "78 °C" in app.window.detail.text()
    machine.set(temperature=70.0)
    qtbot.waitUntil(lambda: icon_state(app) == "idle", timeout=10_000)

    machine.set(
        processes=(GpuProcess(pid=999_999, name="Cyberpunk2077.exe", used_memory_bytes=4 * GIBIBYTE),)
    )
    qtbot.waitUntil(lambda: icon_state(app) == "paused", timeout=10_000)
    assert app.window.detail.text() == "Cyberpunk2077.exe is using the GPU (4.0 GiB)"
    machine.set(processes=(), full_screen="Elden Ring")
    qtbot.waitUntil(lambda: "Elden Ring is running full screen" in app.window.detail.text(), timeout=10_000)
    machine.set(full_screen=None)
    qtbot.waitUntil(lambda: icon_state(app) == "idle", timeout=10_000)

    # A guard turned off in the settings lets the same game run beside the swarm.
    app.bridge.set_guards(GuardSettings(pause_when_full_screen=False))
    machine.set(full_screen="Elden Ring")
    qtbot.wait(800)
    assert icon_state(app) == "idle"


def test_settings_are_saved_applied_to_the_agent_and_read_back(
    qtbot, make_app, coordinator: Coordinator, machine: Machine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from compute_swarm.desktop.tray import window as window_module

    app = make_app()
    start(qtbot, app)
    machine.set(temperature=78.0)  # below the default limit of 83 °C

    def change_and_save(dialog: window_module.SettingsDialog) -> bool:
        dialog.temperature_limit.setValue(75)
        dialog.only_when_idle.setChecked(True)
        dialog.idle_minutes.setValue(3)
        dialog.schedule.setChecked(True)
        dialog.schedule_start.setValue(0)
        dialog.schedule_end.setValue(0)  # the whole day
        dialog.notifications.setChecked(False)
        dialog.buttons.button(dialog.buttons.StandardButton.Save).click()
        return dialog.result() == dialog.DialogCode.Accepted

    # exec() would block the test in a modal loop: the dialog is filled in and saved as a seller would.
    monkeypatch.setattr(window_module.SettingsDialog, "exec", change_and_save)
    app.open_settings()
    qtbot.waitUntil(lambda: icon_state(app) == "paused", timeout=10_000)
    assert "limit 75 °C" in app.window.detail.text()
    saved = SettingsStore(app.store.path).load().settings
    assert saved.guards.temperature_limit_celsius == 75
    assert saved.guards.only_when_idle and saved.guards.idle_minutes == 3
    assert saved.notifications is False and saved.earning is True
    assert app.window.temperature_chart.threshold == 75


def test_a_computer_waiting_for_the_operators_approval_says_so_until_it_is_approved(
    qtbot, make_app, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    coordinator = coordinator_with(tmp_path / "coordinator", SWARM_NODE_ADMISSION="approval")
    monkeypatch.setenv("SWARM_COORDINATOR", coordinator.url)
    try:
        app = make_app()
        window = app.window
        qtbot.mouseClick(window.start_stop, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: icon_state(app) == "waiting", timeout=30_000)
        # Not "Ready": nothing would come, and the seller is told why and who decides.
        assert (window.headline.text(), window.detail.text()) == (
            "Waiting for approval",
            "Waiting for the swarm operator to approve this computer",
        )
        assert window.job_title.text().startswith("No jobs until approved. Nothing to do meanwhile")
        assert app.headline_action.text() == (
            "Waiting for approval: waiting for the swarm operator to approve this computer"
        )
        assert window.connection.text().startswith(f"Connected to {coordinator.url} as node ")
        assert not window.invite_code.isVisible()

        assert ops(coordinator, f"/api/ops/nodes/{app.status.node_id}/approve").status_code == 200
        qtbot.waitUntil(lambda: icon_state(app) == "idle", timeout=10_000)
        assert (window.headline.text(), window.detail.text()) == ("Ready", "Waiting for a job")
        assert window.job_title.text() == "No job right now"
    finally:
        coordinator.stop()


def test_the_window_asks_for_an_invite_code_says_a_wrong_one_and_joins_with_a_good_one(
    qtbot, make_app, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    coordinator = coordinator_with(tmp_path / "coordinator", SWARM_NODE_ADMISSION="invite")
    monkeypatch.setenv("SWARM_COORDINATOR", coordinator.url)
    try:
        app = make_app()
        window = app.window
        assert not window.invite_code.isVisible()  # asked for only where the coordinator wants one
        qtbot.mouseClick(window.start_stop, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(window.invite_code.isVisible, timeout=30_000)
        assert window.headline.text() == "Invite code needed"
        assert window.detail.text() == (
            "This swarm lets computers join by invitation: type the invite code the swarm operator gave you"
        )
        assert icon_state(app) == "waiting" and window.start_stop.text() == "Stop"
        assert window.invite_code.hasFocus()

        qtbot.mouseClick(window.join_button, Qt.MouseButton.LeftButton)  # nothing typed
        assert window.coordinator_error.text() == "Type the invite code the swarm operator gave you"
        qtbot.keyClicks(window.invite_code, "swarm-invite-guessed")
        qtbot.keyClick(window.invite_code, Qt.Key.Key_Return)
        qtbot.waitUntil(lambda: window.headline.text() == "Invite code refused", timeout=15_000)
        assert "unknown, used up or expired" in window.detail.text()
        assert not window.coordinator_error.isVisible() and window.invite_code.isVisible()
        assert SettingsStore(app.store.path).load().settings.invite_code == "swarm-invite-guessed"

        window.invite_code.setText(create_invite(coordinator))
        qtbot.mouseClick(window.join_button, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: icon_state(app) == "idle", timeout=15_000)
        assert not window.invite_code.isVisible()
        # Joined: the code is not kept any longer than it was needed.
        qtbot.waitUntil(lambda: SettingsStore(app.store.path).load().settings.invite_code is None)
    finally:
        coordinator.stop()


def test_every_state_has_an_icon(qtbot) -> None:
    # Drawn for the window and the tray at each change: a state that cannot be drawn raises in a slot.
    for icon_state_name in typing.get_args(state.IconState):
        assert not state_icon(icon_state_name).pixmap(16, 16).isNull()


def test_a_bad_address_is_said_next_to_the_field_and_nothing_starts(qtbot, make_app) -> None:
    app = make_app()
    app.window.coordinator.setText("ftp://swarm.example")
    qtbot.mouseClick(app.window.start_stop, Qt.MouseButton.LeftButton)
    assert app.window.coordinator_error.isVisible()
    assert "not an http:// or https://" in app.window.coordinator_error.text()
    assert not app.bridge.running and app.window.start_stop.text() == "Start earning"


def test_an_unusable_settings_file_is_kept_and_said(qtbot, make_app, tmp_path: Path) -> None:
    path = tmp_path / "config" / "settings.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"guards": {"temperature_limit_celsius": 500}}')
    app = make_app()
    assert "the defaults are in use" in app.window.coordinator_error.text()
    assert list(path.parent.glob("settings.json.invalid-*"))
    assert app.settings == Settings()


def test_a_second_launch_shows_the_first_instead_of_starting(qtbot, tmp_path: Path) -> None:
    first = SingleInstance(str(tmp_path / "settings.json"))
    assert first.claim()
    with qtbot.waitSignal(first.activated, timeout=5_000):
        assert not SingleInstance(str(tmp_path / "settings.json")).claim()
    assert SingleInstance(str(tmp_path / "other.json")).claim()  # another seller's config: its own app
    assert QApplication.instance() is not None


def test_a_packaged_app_fetches_its_engine_first_with_progress_and_a_cancel_that_keeps_what_it_has(
    qtbot, make_app, coordinator: Coordinator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The runtime this app takes goes on sys.path and into the environment: both are put back after.
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv(child_process.RUNTIME_VARIABLE, raising=False)
    published = tmp_path / "published"
    published.mkdir()
    engine = make_wheel(
        published,
        "packaged_engine",
        "1.0",
        {
            "packaged_engine/__init__.py": b"READY = True\n",
            # Random bytes, so the wheel stays 2 MB: 32 chunks on the slow line below.
            "packaged_engine/weights.bin": hashlib.sha256(b"weights").digest() * 65_536,
        },
    )
    index = Index(published)
    index.seconds_per_chunk = 0.1
    runtime = Runtimes(
        tmp_path / "runtime", "cpu", [pin_of(engine)], [index.url], tags=TAGS, reason="no GPU: CPU build"
    )
    app = make_app(engine_runtime=lambda settings: runtime)
    window = app.window
    try:
        qtbot.mouseClick(window.start_stop, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: window.runtime_card.isVisible() and " MB (" in window.runtime_numbers.text())
        assert window.runtime_reason.text() == "no GPU: CPU build"
        assert "left" in window.runtime_numbers.text() and window.runtime_progress.value() > 0
        assert window.start_stop.text() == "Stop" and not app.bridge.running, "no agent before the engine"
        assert (window.headline.text(), window.detail.text()) == (
            "Getting ready",
            "Fetching the engine, once",
        )

        qtbot.mouseClick(window.runtime_cancel, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: not app.activity.running, timeout=10_000)
        assert not window.runtime_card.isVisible() and window.start_stop.text() == "Start earning"
        assert not runtime.ready() and list((tmp_path / "runtime" / "downloads").glob("*.part"))
        assert json.loads(app.store.path.read_text())["earning"] is False

        index.seconds_per_chunk = 0.0
        start(qtbot, app)  # the fetch goes on where it stopped, then the agent connects
        assert runtime.ready() and not window.runtime_card.isVisible()
        ranges = [wanted for path, wanted in index.requests if path.endswith(engine.name)]
        assert ranges[-1] is not None, "the second fetch resumed the download"
        assert os.environ[child_process.RUNTIME_VARIABLE] == str(runtime.site_packages())

        # The next launch checks the runtime against its hashes before the first job, and repairs it.
        qtbot.mouseClick(window.start_stop, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: not app.activity.running, timeout=60_000)
        (runtime.site_packages() / "packaged_engine" / "__init__.py").write_text("READY = False\n")
        index.requests.clear()
        relaunched = make_app(engine_runtime=lambda settings: runtime)
        start(qtbot, relaunched)
        assert [path for path, _ in index.requests if path.startswith("/files/")] == [f"/files/{engine.name}"]
        assert (runtime.site_packages() / "packaged_engine" / "__init__.py").read_text() == "READY = True\n"
    finally:
        index.close()
