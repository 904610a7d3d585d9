"""A llama.cpp that really crashes, for tests of what a node does when its inference child dies.

`CrashingLlama(directory).environment()` puts a sitecustomize.py on PYTHONPATH; every Python process
started with it runs that file, and in the inference server's child only it makes llama.cpp's first
evaluation die of a real signal (a read of address 0 for SIGSEGV, as a llama.cpp built for another
machine does), as long as the switch file exists. The child counts its starts and its crashes in files,
so a test can tell whether a node started a child at all.
"""

from __future__ import annotations

import os
from pathlib import Path

SITECUSTOMIZE = """
import os
import sys

_directory = os.environ.get("CRASHING_LLAMA_DIRECTORY")
if _directory and "compute_swarm.engine.inference_server" in sys.orig_argv:
    import ctypes
    import signal
    import time

    import llama_cpp

    def _note(name):
        with open(os.path.join(_directory, name), "a") as log:
            log.write(f"{time.time()}\\n")

    _note("starts.log")
    _evaluate = llama_cpp.Llama.eval

    def _crash_or_evaluate(self, tokens):
        switch = os.path.join(_directory, "crash")
        if os.path.exists(switch):
            with open(switch) as file:
                name = file.read().strip() or "SIGSEGV"
            _note("crashes.log")
            if name == "SIGSEGV":
                ctypes.string_at(0)
            os.kill(os.getpid(), getattr(signal, name))
        return _evaluate(self, tokens)

    llama_cpp.Llama.eval = _crash_or_evaluate
"""


class CrashingLlama:
    def __init__(self, directory: Path, signal_name: str = "SIGSEGV"):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "sitecustomize.py").write_text(SITECUSTOMIZE)
        self.switch.write_text(signal_name)

    @property
    def switch(self) -> Path:
        return self.directory / "crash"

    def environment(self) -> dict[str, str]:
        """What a process's environment needs for its inference children to crash."""
        return {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(self.directory), os.environ.get("PYTHONPATH")])),
            "CRASHING_LLAMA_DIRECTORY": str(self.directory),
        }

    def heal(self) -> None:
        """From now on llama.cpp evaluates as it should."""
        self.switch.unlink()

    def starts(self) -> list[float]:
        """When each inference child started (time.time())."""
        return self._times("starts.log")

    def crashes(self) -> list[float]:
        return self._times("crashes.log")

    def _times(self, name: str) -> list[float]:
        path = self.directory / name
        return [float(line) for line in path.read_text().split()] if path.exists() else []
