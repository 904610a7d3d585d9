"""A long-lived child process that serves generation requests with models kept loaded, and the
parent's handle on it (`InferenceProcess`).

The node agent keeps one: a crash or an out-of-memory kill in llama.cpp ends the requests in flight
with a GenerationFailed event (kind "crashed" for the one being served, which most likely caused it)
and the next request starts a fresh child; the agent runs on. Requests and events cross the boundary
as JSON lines, never pickle. The child answers one request at a time, in arrival order (a llama.cpp
context serves one sequence).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from compute_swarm.engine import child_process
from compute_swarm.engine.inference import (
    DEFAULT_CONTEXT_TOKENS,
    DEFAULT_MAX_LOADED_MODELS,
    GenerationDone,
    GenerationError,
    GenerationEvent,
    GenerationFailed,
    GenerationRequest,
    ModelPool,
    coalesce,
    generate,
    generation_event_adapter,
)

logger = logging.getLogger(__name__)

SERVER_LOG = "inference.log"


class ServerOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    context_tokens: int = Field(default=DEFAULT_CONTEXT_TOKENS, ge=256, le=1 << 20)
    max_models: int = Field(default=DEFAULT_MAX_LOADED_MODELS, ge=1, le=64)
    # None: as many layers on the GPU as fit its free memory (engine.offload), none where llama.cpp
    # cannot offload; a number (-1: all) is taken as it is. Each GenerationDone says what was used.
    gpu_layers: int | None = None
    threads: int | None = Field(default=None, ge=1, le=1024)
    # Text generated within this long leaves in one delta (engine.inference.coalesce); 0: every piece.
    delta_interval_seconds: float = Field(default=0.05, ge=0.0, le=1.0)


class Generate(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["generate"] = "generate"
    request: GenerationRequest


class StopGenerating(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["stop"] = "stop"
    request_id: str


Command = Annotated[Generate | StopGenerating, Field(discriminator="type")]
command_adapter: TypeAdapter[Command] = TypeAdapter(Command)

EventHandler = Callable[[GenerationEvent], None]


class InferenceProcess:
    """The parent's side. `submit` and `stop` may be called from any thread; each request's events go
    to its handler, on the reader thread, ending with exactly one GenerationDone or GenerationFailed."""

    def __init__(self, options: ServerOptions | None = None, *, log_directory: str | Path | None = None):
        self.options = options or ServerOptions()
        self.log_directory = Path(log_directory) if log_directory is not None else None
        self._lock = threading.Lock()
        self._process: subprocess.Popen[str] | None = None
        # request id → (the child serving it, its handler)
        self._handlers: dict[str, tuple[subprocess.Popen[str], EventHandler]] = {}
        self._closed = False

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._handlers)

    def submit(self, request: GenerationRequest, on_event: EventHandler) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the inference process was closed")
            if request.request_id in self._handlers:
                raise ValueError(f"request {request.request_id} is already being served")
            process = self._running_process()
            self._handlers[request.request_id] = (process, on_event)
            sent = self._send(process, Generate(request=request))
        if not sent:
            self._finish(request.request_id, "the inference process is not accepting requests")

    def stop(self, request_id: str) -> None:
        """Stop generating for this request (the buyer went away); its handler still gets its end."""
        with self._lock:
            if self._process is not None and request_id in self._handlers:
                self._send(self._process, StopGenerating(request_id=request_id))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            process, self._process = self._process, None
        if process is not None:
            with contextlib.suppress(OSError, ValueError):
                process.stdin.close()  # the child's reader sees end of input and exits
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    # ---- the child

    def _running_process(self) -> subprocess.Popen[str]:
        if self._process is not None and self._process.poll() is None:
            return self._process
        environment = child_process.environment()
        log = subprocess.DEVNULL
        if self.log_directory is not None:
            self.log_directory.mkdir(parents=True, exist_ok=True)
            log = open(self.log_directory / SERVER_LOG, "ab")  # noqa: SIM115 (the child keeps it)
        try:
            process = subprocess.Popen(
                child_process.command(
                    "compute_swarm.engine.inference_server", self.options.model_dump_json()
                ),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                encoding="utf-8",
                env=environment,
                start_new_session=True,  # a Ctrl-C reaches the agent, which closes us in order
            )
        finally:
            if log is not subprocess.DEVNULL:
                log.close()
        self._process = process
        threading.Thread(target=self._read, args=(process,), name="inference-reader", daemon=True).start()
        return process

    @staticmethod
    def _send(process: subprocess.Popen[str], command: Generate | StopGenerating) -> bool:
        try:
            assert process.stdin is not None
            process.stdin.write(command.model_dump_json() + "\n")
            process.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False  # the child is gone; its reader ends the requests in flight

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            try:
                event = generation_event_adapter.validate_json(line)
            except ValidationError:
                logger.warning("unreadable line from the inference process: %.200s", line.strip())
                continue
            with self._lock:
                served = self._handlers.get(event.request_id)
                if served is None or served[0] is not process:
                    continue
                if isinstance(event, GenerationDone | GenerationFailed):
                    del self._handlers[event.request_id]
            _call(served[1], event)
        return_code = process.wait()
        with self._lock:
            if self._process is process:
                self._process = None
            orphans = [request_id for request_id, (owner, _) in self._handlers.items() if owner is process]
        cause = _describe_exit(return_code)
        if self._closed:
            for request_id in orphans:
                self._finish(request_id, f"the inference process was closed ({cause})")
            return
        if orphans:
            logger.error("llama.cpp crashed (%s) with %d requests in flight", cause, len(orphans))
        # The child serves in arrival order, and handlers keep it: the first request left is the one
        # it was serving, which crashed it; those queued behind it never started, and another child
        # (or node) may serve them.
        for number, request_id in enumerate(orphans):
            if number == 0:
                self._finish(request_id, f"llama.cpp crashed ({cause})", kind="crashed")
            else:
                self._finish(request_id, f"llama.cpp crashed ({cause}) before this request started")

    def _finish(self, request_id: str, message: str, *, kind: str = "error") -> None:
        with self._lock:
            served = self._handlers.pop(request_id, None)
        if served is not None:
            _call(served[1], GenerationFailed(request_id=request_id, kind=kind, message=message))


def _call(handler: EventHandler, event: GenerationEvent) -> None:
    try:
        handler(event)
    except Exception:
        logger.exception("an inference event handler failed")


def _describe_exit(return_code: int) -> str:
    if return_code < 0:
        try:
            name = signal.Signals(-return_code).name
        except ValueError:
            name = f"signal {-return_code}"
        return f"killed by {name}" + _EXIT_HINTS.get(-return_code, "")
    return f"exit code {return_code}"


# What a seller (or a buyer reading the error) can do about the usual ways llama.cpp dies.
_EXIT_HINTS = {
    signal.SIGKILL: "; the machine may have run out of memory",
    # A llama.cpp built with the build machine's native flags (-march=native) runs an instruction
    # this CPU does not have.
    signal.SIGILL: "; the CPU may lack an instruction set llama.cpp was built for (AVX2/FMA/F16C)",
}


# ---- the child's side


def serve(
    options: ServerOptions, commands: queue.Queue, stopped: set[str], write: Callable[[str], None]
) -> None:
    pool = ModelPool(
        max_models=options.max_models,
        context_tokens=options.context_tokens,
        gpu_layers=options.gpu_layers,
        threads=options.threads,
    )
    try:
        while (request := commands.get()) is not None:
            if request.request_id in stopped:
                stopped.discard(request.request_id)
                write(_failed(request.request_id, "error", "stopped before it started").model_dump_json())
                continue
            try:
                events = generate(pool, request, should_stop=lambda: request.request_id in stopped)
                for event in coalesce(events, options.delta_interval_seconds):
                    write(event.model_dump_json())
            except GenerationError as error:
                write(_failed(request.request_id, error.kind, str(error)).model_dump_json())
            except Exception as error:
                logging.getLogger(__name__).exception("request %s failed", request.request_id)
                write(
                    _failed(request.request_id, "error", f"{type(error).__name__}: {error}").model_dump_json()
                )
            stopped.discard(request.request_id)
    finally:
        pool.close()


def _failed(request_id: str, kind: str, message: str) -> GenerationFailed:
    return GenerationFailed(request_id=request_id, kind=kind, message=message[:2000])


def _read_commands(commands: queue.Queue, stopped: set[str]) -> None:
    for line in sys.stdin:
        try:
            command = command_adapter.validate_json(line)
        except ValidationError as error:
            logging.getLogger(__name__).warning("ignoring a bad command: %s", error)
            continue
        if isinstance(command, Generate):
            commands.put(command.request)
        else:
            stopped.add(command.request_id)
    commands.put(None)  # the parent closed our input: finish the request in hand, then exit


def main() -> None:
    record_stream = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    # Anything llama.cpp or a library prints goes to the log, never into the event stream.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    options = ServerOptions.model_validate_json(sys.argv[1]) if len(sys.argv) > 1 else ServerOptions()
    lock = threading.Lock()

    def write(line: str) -> None:
        with lock:
            record_stream.write(line + "\n")
            record_stream.flush()

    commands: queue.Queue = queue.Queue()
    stopped: set[str] = set()
    threading.Thread(target=_read_commands, args=(commands, stopped), daemon=True).start()
    serve(options, commands, stopped, write)


if __name__ == "__main__":
    main()
