"""Screenshots of the real tray window (`make screenshots`, under Xvfb): a real coordinator on loopback,
the window's agent connected to it and running a real 3-step fine-tune of SmolLM2; then the window
where the swarm operator approves each computer, where computers join by invitation, where the
coordinator offers or needs a newer app, and a packaged app's first download of its engine. This machine
has no GPU, so the GPU the window shows is a reading fed through the agent's telemetry interface.

    python -m tests.desktop.screenshot_tray OUTPUT_DIRECTORY [--joining-only | --update-only | --engine-only]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from PySide6.QtCore import QEventLoop, QTimer
from PySide6.QtWidgets import QApplication

from compute_swarm.desktop import token_store
from compute_swarm.desktop.runtime.fetch import Runtimes
from compute_swarm.desktop.settings import SettingsStore
from compute_swarm.desktop.tray.app import TrayApp
from compute_swarm.engine.jobs import DEMO_CHAT_DATASET
from compute_swarm.sdk.client import NodeClient, SwarmClient
from tests.desktop.test_tray import Machine
from tests.desktop.wheel_index import TAGS, Index, make_wheel, pin_of
from tests.swarm_processes import Coordinator, run_cli


def wait(application: QApplication, condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        loop = QEventLoop()
        QTimer.singleShot(100, loop.quit)
        loop.exec()


def pause(seconds: float) -> None:
    """Let the event loop run for this long (paint, deliver the agent's and the coordinator's answers)."""
    loop = QEventLoop()
    QTimer.singleShot(round(seconds * 1000), loop.quit)
    loop.exec()


def save(app: TrayApp, application: QApplication, path: Path) -> None:
    window = app.window
    window.resize(560, min(window.page.sizeHint().height(), 1000))
    pause(1.5)  # let the last changes paint
    # The whole scrolling page, as tall as it is (Xvfb has no window manager: no title bar to include).
    window.page.resize(window.page.width(), window.page.sizeHint().height())
    window.page.grab().save(str(path))
    print(f"wrote {path} ({window.page.width()}×{window.page.height()})")


def started_window_screenshot(
    application: QApplication, folder: Path, environment: dict[str, str], shown, path: Path
) -> None:
    """The window after Start earning against a coordinator with these settings, once `shown(app)`."""
    coordinator = Coordinator(folder, environment=environment).start()
    os.environ["SWARM_COORDINATOR"] = coordinator.url
    machine = Machine()
    machine.set(temperature=47.0)
    app = TrayApp(
        SettingsStore(folder / "config" / "settings.json"),
        folder / "node",
        agent_options={"probe": machine.probe, "activity": machine.activity, "guard_interval_seconds": 1.0},
        manage_autostart=False,
    )
    try:
        app.window.move(20, 20)
        app.show()
        app.window.start_stop.click()
        wait(application, lambda: shown(app), 60, path.name)
        save(app, application, path)
    finally:
        app.bridge.stop()
        app.bridge.stop()
        app.bridge.wait(30)
        app.close()
        app.window.close()
        coordinator.kill()


def money_screenshot(
    app: TrayApp, application: QApplication, coordinator: Coordinator, work: Path, path: Path
) -> None:
    """The money cards: net profit, the jobs' pay and electricity, the forecast, and a payout the swarm
    operator paid (asked through the tray, paid through the admin CLI)."""
    credentials = token_store.load(coordinator.url, work / "node")
    assert credentials is not None
    node = NodeClient(coordinator.url, credentials.token)
    wait(application, lambda: node.me()["earnings"]["available_micro"] > 0, 60, "released credit")
    app.bridge.ask("payout", lambda client: client.request_payout("seller@example.com"))
    wait(application, lambda: node.payouts()["payouts"], 30, "the payout request")
    data_dir = ["--data-dir", str(coordinator.data_dir)]
    assert run_cli("admin", "export-payouts", *data_dir, "--output", str(work / "batch.csv")).returncode == 0
    payout_id = node.payouts()["payouts"][0]["id"]
    assert run_cli("admin", "mark-paid", *data_dir, payout_id, "--reference", "PAYPAL-7Q2X").returncode == 0
    app.bridge.ask("payouts", lambda client: client.payouts())
    wait(application, lambda: "PAYPAL-7Q2X" in app.window.payouts.payouts.text(), 30, "the paid payout")
    # The coordinator recomputes its figures once a minute: ask until they count this computer's jobs.
    deadline = time.monotonic() + 150
    while "would earn" not in app.window.forecast.headline.text() and time.monotonic() < deadline:
        app._fetch_market()
        pause(15)
    assert "would earn" in app.window.forecast.headline.text(), app.window.forecast.headline.text()
    save(app, application, path)


def joining_screenshots(application: QApplication, output: Path, work: Path) -> None:
    """A computer waiting for the swarm operator's approval, and one asked for an invite code."""
    for admission, name, shown in (
        (
            "approval",
            "tray-4-awaiting-approval.png",
            lambda app: app.window.headline.text() == "Waiting for approval",
        ),
        ("invite", "tray-5-invite-code.png", lambda app: app.window.invite_code.isVisible()),
    ):
        environment = {"SWARM_NODE_ADMISSION": admission}
        started_window_screenshot(application, work / admission, environment, shown, output / name)


def update_screenshots(application: QApplication, output: Path, work: Path) -> None:
    """The coordinator offers a newer app ("Update available"), and one that no longer takes this app."""
    for setting, name, shown in (
        (
            "SWARM_LATEST_AGENT_VERSION",
            "tray-6-update-available.png",
            lambda app: app.window.update_notice.isVisible() and app.window.headline.text() == "Ready",
        ),
        (
            "SWARM_MINIMUM_AGENT_VERSION",
            "tray-7-update-needed.png",
            lambda app: app.window.headline.text() == "Update needed",
        ),
    ):
        environment = {"SWARM_NODE_ADMISSION": "open", setting: "0.2.0"}
        started_window_screenshot(application, work / setting.lower(), environment, shown, output / name)


def engine_download_screenshot(application: QApplication, output: Path, work: Path) -> None:
    """A packaged app's first Start earning: the engine runtime downloading, from a package index here
    over a slow line (a 24 MB wheel of random bytes)."""
    published = work / "published"
    published.mkdir()
    engine = make_wheel(
        published,
        "packaged_engine",
        "1.0",
        {"packaged_engine/weights.bin": os.urandom(24 * 1024 * 1024)},
    )
    index = Index(published)
    index.seconds_per_chunk = 0.02
    runtime = Runtimes(
        work / "runtime",
        "cu128",
        [pin_of(engine)],
        [index.url],
        tags=TAGS,
        # As builds.choose says it for the RTX 4070 the window shows (this machine has none).
        reason="NVIDIA driver 570.86 runs CUDA up to 12.8: torch's CUDA 12.8 build",
    )
    app = TrayApp(
        SettingsStore(work / "engine" / "settings.json"),
        work / "engine" / "node",
        agent_options={"probe": Machine().probe, "guard_interval_seconds": 1.0},
        manage_autostart=False,
        engine_runtime=lambda settings: runtime,
    )
    try:
        app.window.move(20, 20)
        app.show()
        app.window.start_stop.click()
        wait(application, lambda: app.window.runtime_progress.value() > 250, 60, "the engine download")
        save(app, application, output / "tray-0-engine-download.png")
    finally:
        app.stop()
        wait(application, lambda: not app.activity.running, 30, "the download to stop")
        app.close()
        app.window.close()
        index.close()


def main() -> int:
    arguments = [argument for argument in sys.argv[1:] if not argument.startswith("--")]
    output = Path(arguments[0] if arguments else "screenshots")
    output.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tray-screenshots-"))
    os.environ.setdefault("SWARM_TOKEN_STORE", "file")
    if "--joining-only" in sys.argv:
        joining_screenshots(QApplication.instance() or QApplication([]), output, work)
        return 0
    if "--update-only" in sys.argv:
        update_screenshots(QApplication.instance() or QApplication([]), output, work)
        return 0
    if "--engine-only" in sys.argv:
        engine_download_screenshot(QApplication.instance() or QApplication([]), output, work)
        return 0
    # Credit is released at once and a payout may be small, so the money cards have something to show.
    coordinator = Coordinator(
        work / "coordinator",
        environment={
            "SWARM_PAYOUT_MINIMUM_MICRO": "1",
            "SWARM_VERIFICATION_BASE_RATE": "0",
            "SWARM_VERIFICATION_MINIMUM_RATE": "0",
            "SWARM_VERIFICATION_WINDOW_SECONDS": "1",
        },
    ).start()
    os.environ["SWARM_COORDINATOR"] = coordinator.url
    application = QApplication.instance() or QApplication([])
    machine = Machine()
    machine.set(temperature=61.0)
    app = TrayApp(
        SettingsStore(work / "config" / "settings.json"),
        work / "node",
        agent_options={"probe": machine.probe, "activity": machine.activity, "guard_interval_seconds": 1.0},
        manage_autostart=False,
    )
    try:
        app.window.move(20, 20)
        app.show()
        wait(application, lambda: bool(app.window.gpu_cards), 20, "the GPU reading")
        save(app, application, output / "tray-1-first-run.png")

        app.start(coordinator.url)
        wait(application, lambda: app.window.headline.text() == "Ready", 60, "the connection")
        buyer = SwarmClient(coordinator.url, coordinator.create_buyer("buyer"))
        dataset = buyer.upload_file(DEMO_CHAT_DATASET)
        spec = {"base_model": "smollm2-135m-instruct", "dataset": dataset["id"], "batch_size": 2}
        spec.update(max_sequence_length=96, learning_rate=1e-3, eval_fraction=0.0)
        job = buyer.submit_lora({**spec, "max_steps": 3})
        machine.set(temperature=72.0)
        wait(application, lambda: "of 3 steps" in app.window.job_details.text(), 240, "training to start")
        save(app, application, output / "tray-2-earning.png")

        wait(application, lambda: buyer.job(job["id"])["state"] == "completed", 240, "the job to complete")
        wait(application, lambda: app.window.earned["today"].text() not in ("—", "0"), 60, "the earnings")
        buyer.submit_lora(
            {**spec, "max_steps": 2}
        )  # a second job, so the chart has a bar and the count grows
        wait(application, lambda: "2 jobs done" in app.window.balances.text(), 240, "the second job")
        money_screenshot(app, application, coordinator, work, output / "tray-4-money.png")
        machine.set(temperature=88.0)
        wait(application, lambda: app.window.headline.text() == "Paused", 30, "the temperature guard")
        save(app, application, output / "tray-3-paused-hot.png")
    finally:
        app.bridge.stop()
        app.bridge.stop()
        app.bridge.wait(30)
        app.close()
        coordinator.kill()
    app.window.hide()
    joining_screenshots(application, output, work)
    update_screenshots(application, output, work)
    engine_download_screenshot(application, output, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
