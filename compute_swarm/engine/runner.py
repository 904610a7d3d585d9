"""Run one job in a supervised child process (engine.worker) and read back its typed records.

A crash, a segfault or the kernel's OOM killer in the child ends the job with a Failed record; the
caller (the CLI, the node agent) keeps running. Records cross the boundary as JSON, never pickle.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

from pydantic import ValidationError

from compute_swarm.engine import child_process
from compute_swarm.engine.artifacts import WORKER_LOG
from compute_swarm.engine.jobs import JobSpec
from compute_swarm.engine.records import FINAL_RECORD_TYPES, Failed, Log, Record, record_adapter
from compute_swarm.engine.worker import JobRequest

STDERR_TAIL_BYTES = 4000


class JobRunner:
    """One job in one child process. Iterate `records()` to follow it to its single final record."""

    def __init__(
        self,
        spec: JobSpec,
        output_dir: str | Path,
        *,
        device: str | None = None,
        resume_from: str | Path | None = None,
        environment: dict[str, str] | None = None,
    ):
        self.output_dir = Path(output_dir)
        self.request = JobRequest(
            spec=spec,
            output_dir=str(self.output_dir),
            device=device,
            resume_from=str(resume_from) if resume_from is not None else None,
        )
        self.environment = environment
        self.process: subprocess.Popen[str] | None = None
        self._cancel_requested = threading.Event()
        self._killer: threading.Timer | None = None
        self._log_start = 0

    @property
    def log_path(self) -> Path:
        return self.output_dir / WORKER_LOG

    def start(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        environment = child_process.environment(self.environment)
        # NVML (engine.devices) numbers GPUs by PCI bus; CUDA must agree, or a job checked against one
        # GPU's free memory would run on another.
        environment.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                child_process.command("compute_swarm.engine.worker"),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                encoding="utf-8",
                env=environment,
                # Its own process group: a Ctrl-C in the terminal reaches the parent, which then
                # cancels the child cleanly instead of both dying mid-step.
                start_new_session=True,
            )
        self._send(self.request.model_dump_json())

    def _send(self, line: str) -> None:
        assert self.process is not None and self.process.stdin is not None
        try:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the child is gone; records() reports how it ended

    def cancel(self, grace_seconds: float = 60.0) -> None:
        """Ask the child to stop at the next step (saving a checkpoint); kill it if it has not exited
        after grace_seconds."""
        if self.process is None or self.process.poll() is not None:
            return
        self._cancel_requested.set()
        self._send(json.dumps({"command": "cancel"}))
        if self._killer is None:
            self._killer = threading.Timer(grace_seconds, self.kill)
            self._killer.daemon = True
            self._killer.start()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()

    def records(self) -> Iterator[Record]:
        """Yield the child's records until it exits; the last one is always Completed or Failed."""
        if self.process is None:
            self.start()
        assert self.process is not None and self.process.stdout is not None
        final: Record | None = None
        finished_reading = False
        try:
            for line in self.process.stdout:
                try:
                    record = record_adapter.validate_json(line)
                except ValidationError:
                    yield Log(
                        level="warning", message=f"unreadable line from the worker: {line.strip()[:200]}"
                    )
                    continue
                if isinstance(record, FINAL_RECORD_TYPES):
                    final = record
                yield record
            finished_reading = True
        finally:
            if not finished_reading:
                # The caller stopped reading early: the child must not train on, holding the GPU.
                self.kill()
            return_code = self.process.wait()
            if self._killer is not None:
                self._killer.cancel()
            for stream in (self.process.stdin, self.process.stdout):
                if stream is not None:
                    stream.close()
        if final is None:
            yield self._failure_without_record(return_code)

    def run(self) -> Record:
        """Run to the end, discarding intermediate records; returns the final record."""
        *_, final = self.records()
        return final

    def _failure_without_record(self, return_code: int) -> Failed:
        if self._cancel_requested.is_set():
            return Failed(
                kind="cancelled", message="cancelled; the worker was stopped before it finished a step"
            )
        if return_code < 0:
            try:
                name = signal.Signals(-return_code).name
            except ValueError:
                name = f"signal {-return_code}"
            cause = f"the worker was killed by {name}"
            if -return_code == signal.SIGKILL:
                cause += " (the system may have run out of memory)"
        else:
            cause = f"the worker exited with code {return_code} without a result"
        return Failed(kind="crashed", message=cause, details=self._stderr_tail())

    def _stderr_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(max(self._log_start, log.seek(0, os.SEEK_END) - STDERR_TAIL_BYTES))
                return log.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
