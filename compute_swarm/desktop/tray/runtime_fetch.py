"""The engine runtime's fetch, off the Qt thread: `Runtimes.fetch` runs in a thread of its own and
reports to the window through Qt signals (queued to the Qt thread)."""

from __future__ import annotations

import threading
from pathlib import Path

from PySide6.QtCore import QObject, Signal

from compute_swarm.desktop.runtime.fetch import Busy, Runtimes
from compute_swarm.desktop.runtime.wheels import WheelError
from compute_swarm.engine.package_index import Cancelled, SourceError


class RuntimeFetch(QObject):
    progressed = Signal(object)  # fetch.Progress
    finished = Signal(object)  # the runtime's folder (Path)
    failed = Signal(str)  # why, in words for the window
    cancelled = Signal()

    def __init__(self, runtime: Runtimes, parent: QObject | None = None):
        super().__init__(parent)
        self.runtime = runtime
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name="runtime-fetch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def cancel(self) -> None:
        """Stop at the next chunk; what was fetched stays for the next try."""
        self._cancel.set()

    def wait(self, seconds: float) -> bool:
        self._thread.join(seconds)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            folder: Path = self.runtime.fetch(self.progressed.emit, self._cancel)
        except Cancelled:
            self.cancelled.emit()
        except (SourceError, WheelError, Busy, OSError) as error:
            self.failed.emit(f"The engine could not be fetched: {error}")
        else:
            self.finished.emit(folder)
