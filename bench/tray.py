"""The tray app's footprint: cold start to a visible window, then idle CPU and memory while its agent is
connected to a real coordinator with no job. Baseline, in the same run: a bare PySide6 app that shows a
tray icon and a label (what any Qt tray app costs before doing anything).

    cold start   from starting the process to its "shown" log line (the window under Xvfb; a desktop
                 with a tray host shows the icon at the same moment)
    idle CPU     CPU seconds the process used over --idle-seconds, as % of one core (after a settle)
    RSS          resident memory at the end of the idle period
Goals (issue 6): idle CPU <= 1 % of a core, RSS <= 150 MB, cold start <= 2 s.

    python bench/tray.py [--idle-seconds 30] [--settle-seconds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))
from tests.swarm_processes import COMMAND, Coordinator  # noqa: E402

BASELINE = """
import sys
from PySide6.QtGui import QIcon, QPixmap
from PySide6.QtWidgets import QApplication, QLabel, QSystemTrayIcon
application = QApplication(sys.argv)
pixmap = QPixmap(32, 32); pixmap.fill()
tray = QSystemTrayIcon(QIcon(pixmap)); tray.show()
label = QLabel("baseline"); label.show()
print("INFO baseline: the window is shown", file=sys.stderr, flush=True)
sys.exit(application.exec())
"""


def start_xvfb() -> tuple[subprocess.Popen, str]:
    read, write = os.pipe()
    server = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write), "-nolisten", "tcp", "-screen", "0", "1280x1024x24"],
        pass_fds=(write,),
    )
    os.close(write)
    with os.fdopen(read) as pipe:
        return server, f":{pipe.readline().strip()}"


def measure(command: list[str], environment: dict[str, str], ready: str, settle: float, idle: float) -> dict:
    started = time.monotonic()
    process = subprocess.Popen(command, env=environment, stderr=subprocess.PIPE, text=True)
    shown = threading.Event()
    connected = threading.Event()
    lines: list[str] = []
    shown_after: list[float] = []

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if "the window is shown" in line and not shown.is_set():
                shown_after.append(time.monotonic() - started)
                shown.set()
            if ready in line:
                connected.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not shown.wait(60) or not connected.wait(120):
            raise SystemExit(f"{command[0]} did not get ready:\n{''.join(lines[-20:])}")
        time.sleep(settle)
        watched = psutil.Process(process.pid)
        before = watched.cpu_times()
        time.sleep(idle)
        after = watched.cpu_times()
        cpu_seconds = (after.user + after.system) - (before.user + before.system)
        return {
            "cold_start_seconds": round(shown_after[0], 3),
            "idle_cpu_percent_of_a_core": round(100 * cpu_seconds / idle, 3),
            "rss_mb": round(watched.memory_info().rss / 1e6, 1),
        }
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--settle-seconds", type=float, default=10.0)
    arguments = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-tray-"))
    server, display = start_xvfb()
    coordinator = Coordinator(work / "coordinator").start()
    try:
        config = work / "config"
        config.mkdir()
        (config / "settings.json").write_text(
            json.dumps({"version": 1, "coordinator": coordinator.url, "earning": True, "autostart": False})
        )
        environment = {
            **os.environ,
            "DISPLAY": display,
            "QT_QPA_PLATFORM": "xcb",
            "SWARM_CONFIG_DIR": str(config),
            "SWARM_TOKEN_STORE": "file",
        }
        ours = measure(
            [COMMAND, "-v", "tray", "--data-dir", str(work / "node")],
            environment,
            "connected to",
            arguments.settle_seconds,
            arguments.idle_seconds,
        )
        baseline = measure(
            [sys.executable, "-c", BASELINE], environment, "the window is shown", 1.0, arguments.idle_seconds
        )
    finally:
        coordinator.kill()
        server.terminate()
    print(f"{'':28}{'ours':>10}{'bare Qt tray':>14}{'goal':>10}")
    goals = {"cold_start_seconds": 2.0, "idle_cpu_percent_of_a_core": 1.0, "rss_mb": 150.0}
    for key, goal in goals.items():
        verdict = "ok" if ours[key] <= goal else "OVER"
        print(f"{key:28}{ours[key]:>10}{baseline[key]:>14}{goal:>10}  {verdict}")
    results = REPOSITORY / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "tray.json").write_text(
        json.dumps({"ours": ours, "baseline": baseline, "goals": goals}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
