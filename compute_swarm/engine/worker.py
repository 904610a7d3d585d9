"""The child-process side of engine.runner: run one job, report typed records as JSON lines.

Protocol: the first line on stdin is a JobRequest; later lines are commands ({"command": "cancel"}).
Records go to the original stdout, one JSON object per line; the child's own fd 1 is pointed at
stderr, so anything a library prints cannot corrupt the record stream.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import traceback
from typing import Literal, TextIO

from pydantic import BaseModel, ConfigDict, ValidationError

from compute_swarm.engine.jobs import InferenceJobSpec, InvalidJobError, JobSpec
from compute_swarm.engine.records import Failed, Log, Record


class JobRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    spec: JobSpec
    output_dir: str
    device: str | None = None  # None: the best device engine.devices finds
    resume_from: str | None = None  # a checkpoint directory, or "latest"


class Command(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    command: Literal["cancel"]


class RecordWriter:
    def __init__(self, stream: TextIO):
        self._stream = stream
        self._lock = threading.Lock()

    def __call__(self, record: Record) -> None:
        with self._lock:
            self._stream.write(record.model_dump_json() + "\n")
            self._stream.flush()


class _LogForwarder(logging.Handler):
    """Warnings and errors from the engine travel to the parent as Log records."""

    def __init__(self, write: RecordWriter):
        super().__init__(level=logging.WARNING)
        self._write = write

    def emit(self, entry: logging.LogRecord) -> None:
        level = "error" if entry.levelno >= logging.ERROR else "warning"
        self._write(Log(level=level, message=self.format(entry)))


def _listen_for_commands(cancelled: threading.Event) -> None:
    for line in sys.stdin:
        try:
            if Command.model_validate_json(line).command == "cancel":
                cancelled.set()
        except ValidationError:
            logging.getLogger(__name__).warning("ignoring an unknown command: %.200s", line.strip())
    # The parent closed our stdin: it is gone or done with us, so stop at the next step.
    cancelled.set()


def run(request: JobRequest, write: RecordWriter, cancelled: threading.Event) -> None:
    if isinstance(request.spec, InferenceJobSpec):
        run_inference(request, write, cancelled)
        return
    # Imported here so a bad request is answered without paying for torch's import.
    from compute_swarm.engine import devices, lora, resources

    try:
        device = request.device or devices.probe().best_device()
        lora.check_memory(request.spec, device)
        completed = lora.train_lora(
            request.spec,
            request.output_dir,
            device=device,
            resume_from=request.resume_from,
            report=write,
            should_stop=cancelled.is_set,
        )
        write(completed)
    except lora.TrainingCancelled as cancellation:
        checkpoint = str(cancellation.checkpoint) if cancellation.checkpoint else None
        write(Failed(kind="cancelled", message=str(cancellation), checkpoint=checkpoint))
    except resources.InsufficientMemoryError as error:
        write(Failed(kind="insufficient_memory", message=str(error)))
    except (InvalidJobError, resources.ResourceError) as error:
        write(Failed(kind="invalid_spec", message=str(error)))
    except MemoryError as error:  # torch.OutOfMemoryError is a subclass of RuntimeError, handled below
        write(
            Failed(
                kind="out_of_memory", message=f"ran out of memory: {error}", details=traceback.format_exc()
            )
        )
    except Exception as error:
        kind = "out_of_memory" if type(error).__name__ == "OutOfMemoryError" else "error"
        write(Failed(kind=kind, message=f"{type(error).__name__}: {error}", details=traceback.format_exc()))


def run_inference(request: JobRequest, write: RecordWriter, cancelled: threading.Event) -> None:
    from compute_swarm.engine import inference, models

    try:
        spec = request.spec
        assert isinstance(spec, InferenceJobSpec)
        spec = spec.model_copy(update={"base_model": str(models.resolve_model_path(spec.base_model))})
        pool = inference.ModelPool(max_models=1)
        try:
            write(
                inference.run_batch(
                    spec, request.output_dir, pool=pool, report=write, should_stop=cancelled.is_set
                )
            )
        finally:
            pool.close()
    except InterruptedError as error:
        write(Failed(kind="cancelled", message=str(error)))
    except InvalidJobError as error:
        write(Failed(kind="invalid_spec", message=str(error)))
    except Exception as error:
        write(
            Failed(kind="error", message=f"{type(error).__name__}: {error}", details=traceback.format_exc())
        )


def main() -> None:
    record_stream = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    write = RecordWriter(record_stream)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("compute_swarm.engine").addHandler(_LogForwarder(write))

    try:
        request = JobRequest.model_validate_json(sys.stdin.readline())
    except ValidationError as error:
        write(Failed(kind="invalid_spec", message=f"bad job request: {error}"))
        return
    cancelled = threading.Event()
    threading.Thread(target=_listen_for_commands, args=(cancelled,), daemon=True).start()
    run(request, write, cancelled)


if __name__ == "__main__":
    main()
