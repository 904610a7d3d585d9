"""One leased job on this node: fetches its dataset and checkpoint, runs it in engine.runner's child
process, uploads its checkpoints and result (retrying while the coordinator is unreachable) and reports
how it ended. desktop.leased_jobs owns one `JobRun` per lease and lends it a `JobHost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import tarfile
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from compute_swarm import protocol
from compute_swarm.desktop import workspace
from compute_swarm.desktop.backoff import Backoff
from compute_swarm.desktop.failures import describe_error, is_transient
from compute_swarm.desktop.job_reports import (
    ProgressThrottle,
    checkpoint_message,
    failure_message,
    progress_message,
    result_message,
)
from compute_swarm.desktop.lease_spec import spec_for_lease
from compute_swarm.desktop.model_files import LocalModel, fetch_model
from compute_swarm.desktop.workspace import Workspace
from compute_swarm.engine import artifacts
from compute_swarm.engine.jobs import InferenceJobSpec, JobSpec
from compute_swarm.engine.records import CheckpointSaved, Completed, Failed, Log, Progress, Record, Started
from compute_swarm.protocol import finite_or_none
from compute_swarm.sdk.client import SwarmError, pack_directory, unpack_archive

logger = logging.getLogger(__name__)

CANCEL_GRACE_SECONDS = 60.0  # a cancelled job may take this long to checkpoint before it is killed
DOWNLOAD_ATTEMPTS = 10
UPLOAD_ATTEMPTS = 30  # with the 60 s cap, about half an hour of the coordinator being unreachable

CancelReason = Literal["coordinator", "paused", "shutdown"]


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    lease_id: str
    attempt: int
    max_attempts: int
    phase: Literal["downloading", "training", "generating", "uploading"] = "downloading"
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    eval_loss: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None


@dataclass(frozen=True)
class JobOutcome:
    job_id: str
    # "cancelled": stopped here, whether the coordinator cancelled it or this node released it
    outcome: Literal["completed", "failed", "cancelled"]
    message: str


@dataclass
class StopSignal:
    """The agent's stop as its jobs' transfers see it; one object shared by the agent and all its jobs."""

    deadline: float | None = None  # a graceful stop: a retry that would end after this is not tried
    abandoned: bool = False  # stop() was called twice: give up every transfer at once


@dataclass(frozen=True)
class JobHost:
    """What a job borrows from the agent that runs it."""

    workspace: Workspace
    client: Any  # compute_swarm.sdk.client.NodeClient, or a test's stand-in
    runner_factory: Callable[..., Any]  # (spec, output_dir, *, resume_from, device) -> engine JobRunner
    device: str | None
    rng: random.Random
    stop: StopSignal
    post: Callable[[protocol.NodeMessage], None]  # to the coordinator, in order
    status_changed: Callable[[JobRun], None]
    ended: Callable[[JobOutcome], None]  # how it ended, for AgentStatus.last_job
    spawn: Callable[[Coroutine[Any, Any, Any], str], asyncio.Task]  # a task the agent cancels on exit


def job_runner(spec: JobSpec, output_dir: Path, *, resume_from: Path | None, device: str | None) -> Any:
    from compute_swarm.engine.runner import JobRunner

    return JobRunner(spec, output_dir, resume_from=resume_from, device=device)


class _GiveUp(Exception):
    """A download or upload that will not succeed (refused, retries used up, the lease ended)."""


class _RunnerStarted:
    """Handed to the loop once the child process exists, so a cancel that came earlier reaches it."""


class JobRun:
    """One lease from its arrival to its reported end. The agent calls `run()` in a task it keeps in
    `task`, and `cancel()` or `kill()` from its event loop; `status` is replaced whole on each change."""

    def __init__(self, lease: protocol.Lease, host: JobHost, *, previous: JobRun | None = None):
        self.lease = lease
        self.directory = host.workspace.job_directory(lease.job_id)
        self.status = JobStatus(
            job_id=lease.job_id,
            lease_id=lease.lease_id,
            attempt=lease.attempt,
            max_attempts=lease.max_attempts,
        )
        self.previous = previous  # the job before, whose child may still be exiting
        self.task: asyncio.Task | None = None
        self.cancel_reason: CancelReason | None = None
        self.pause_reason = ""
        self.reported = False  # its result or failure was posted
        self.tidy_when_done = False  # its result or failure was acknowledged before its child exited
        self._host = host
        self._runner: Any = None
        self._completed = False  # the adapter is done: a checkpoint is no longer worth uploading
        self._newest_checkpoint_step = 0
        self._throttle = ProgressThrottle()
        self._uploads: set[asyncio.Task] = set()
        self._upload_lock = asyncio.Lock()

    @property
    def output_dir(self) -> Path:
        return workspace.output_directory(self.directory)

    @property
    def reference(self) -> protocol.LeaseReference:
        return protocol.LeaseReference(job_id=self.lease.job_id, lease_id=self.lease.lease_id)

    @property
    def holds_lease(self) -> bool:
        """The coordinator counts this lease as running here: its end is not told, nor was it cancelled."""
        return not self.reported and self.cancel_reason != "coordinator"

    def cancel(self, reason: CancelReason, *, pause_reason: str | None = None) -> None:
        if pause_reason is not None:
            self.pause_reason = pause_reason
        # An invalid lease outranks the other reasons: then nothing of the job may be uploaded.
        if self.cancel_reason is None or reason == "coordinator":
            self.cancel_reason = reason
        if self._runner is not None:
            self._runner.cancel(grace_seconds=CANCEL_GRACE_SECONDS)

    def kill(self) -> None:
        if self._runner is not None:
            self._runner.kill()  # does nothing once the child has exited

    # ---- the run

    async def run(self) -> None:
        lease = self.lease
        try:
            try:
                model, dataset, resume_from, adapter = await self._fetch_inputs()
                evaluate = await self._fetch_result_to_evaluate()
                spec = spec_for_lease(
                    lease, model.engine_reference, dataset, adapter if adapter is not None else evaluate
                )
            except _GiveUp as error:
                if self.cancel_reason is None:
                    await self._report_early_failure("error", str(error))
                    return
            previous, self.previous = self.previous, None
            if previous is not None and previous.task is not None and not previous.task.done():
                logger.info(
                    "job %s: waiting for job %s's worker to exit", lease.job_id, previous.lease.job_id
                )
                await asyncio.wait({previous.task})
            if self.cancel_reason is not None:
                await self._report_early_failure(*self._why_stopped())
                return
            await self._train(spec, resume_from)
        except Exception as error:
            logger.exception("job %s: the agent failed while running it", lease.job_id)
            self._post(failure_message(lease, "error", f"the node agent failed: {describe_error(error)}"))
            self._host.ended(JobOutcome(lease.job_id, "failed", describe_error(error)))
        finally:
            self.kill()

    def _post(self, message: protocol.NodeMessage) -> None:
        if isinstance(message, protocol.JobResult | protocol.JobFailure):
            # Its end is told: the coordinator counts this node free, whether or not the child has
            # exited yet.
            self.reported = True
        self._host.post(message)

    def _set_status(self, **changes: Any) -> None:
        self.status = replace(self.status, **changes)
        self._host.status_changed(self)

    async def _report_early_failure(self, kind: str, message: str) -> None:
        logger.warning("job %s failed before training: %s", self.lease.job_id, message)
        self._post(failure_message(self.lease, kind, message))
        outcome = "cancelled" if kind in ("cancelled", "released") else "failed"
        self._host.ended(JobOutcome(self.lease.job_id, outcome, message))

    # ---- transfers

    async def _fetch_inputs(self) -> tuple[LocalModel, Path, Path | None, Path | None]:
        """The base model, the dataset, the checkpoint unpacked to resume from, and a batch's llama.cpp
        adapter."""
        lease = self.lease
        await asyncio.to_thread(self._host.workspace.clear_job_directory, self.directory)
        space, client = self._host.workspace, self._host.client
        model = await self._retrying(
            "download the base model",
            lambda: fetch_model(
                lease.model,
                lambda sha256, destination, size: space.download(client, sha256, destination, size),
                with_weights=not isinstance(lease.spec, InferenceJobSpec),
            ),
            DOWNLOAD_ATTEMPTS,
            download=True,
        )
        dataset = await self._download("dataset", lease.dataset_sha256, lease.dataset_size)
        adapter = (
            await self._download("adapter", lease.adapter_sha256, lease.adapter_size)
            if lease.adapter_sha256
            else None
        )
        if lease.checkpoint_sha256 is None:
            return model, dataset, None, adapter
        archive = await self._download("checkpoint", lease.checkpoint_sha256, lease.checkpoint_size)
        resume_from = workspace.resume_directory(self.directory)
        try:
            await asyncio.to_thread(unpack_archive, archive, resume_from)
        except (OSError, tarfile.TarError, SwarmError) as error:
            raise _GiveUp(f"could not unpack the checkpoint: {describe_error(error)}") from None
        finally:
            # Unlike a dataset, a checkpoint is never fetched twice: a later lease brings a newer one.
            self._host.workspace.forget_artifact(lease.checkpoint_sha256)
            with contextlib.suppress(OSError):
                archive.unlink()
        return model, dataset, resume_from, adapter

    async def _fetch_result_to_evaluate(self) -> Path | None:
        """A verification re-run's other half: the adapter another node delivered, unpacked."""
        if self.lease.evaluate_result_sha256 is None:
            return None
        archive = await self._download(
            "result to verify", self.lease.evaluate_result_sha256, self.lease.evaluate_result_size
        )
        directory = workspace.under_verification_directory(self.directory)
        try:
            await asyncio.to_thread(unpack_archive, archive, directory)
        except (OSError, tarfile.TarError, SwarmError):
            # Not even an archive: the adapter cannot be evaluated, which the comparison counts.
            logger.warning(
                "job %s: the result under verification is not a readable archive", self.lease.job_id
            )
            return directory
        finally:
            self._host.workspace.forget_artifact(self.lease.evaluate_result_sha256)
            with contextlib.suppress(OSError):
                archive.unlink()
        return directory

    async def _download(self, what: str, sha256: str, size: int | None) -> Path:
        """One of the lease's input artifacts, retried while the coordinator is unreachable; never more
        than the `size` the lease states (past it the job fails: see sdk.client.DownloadTooLarge)."""
        return await self._retrying(
            f"download the {what}",
            lambda: self._fetch_artifact(sha256, size),
            DOWNLOAD_ATTEMPTS,
            download=True,
        )

    def _fetch_artifact(self, sha256: str, size: int | None) -> Path:
        """Thread: the artifact from the cache, downloaded into it when it is not there."""
        keep = (self.lease.dataset_sha256, self.lease.checkpoint_sha256, self.lease.adapter_sha256)
        client, space = self._host.client, self._host.workspace

        def download(digest: str, destination: Path) -> Path:
            return space.download(client, digest, destination, size)

        return space.fetch_artifact(sha256, download, keep)

    async def _retrying(
        self, what: str, call: Callable[[], Any], attempts: int, *, download: bool = False
    ) -> Any:
        """Run a transfer in a thread, retrying with backoff while the coordinator is unreachable.
        A download stops at any cancel; an upload only when the lease has ended (a pause or a stop
        still wants the last checkpoint uploaded)."""
        stop = self._host.stop
        backoff = Backoff(rng=self._host.rng)
        for attempt in range(1, attempts + 1):
            if self.cancel_reason == "coordinator" or stop.abandoned or (download and self.cancel_reason):
                raise _GiveUp(f"stopped trying to {what}: the job was cancelled")
            try:
                return await asyncio.to_thread(call)
            except SwarmError as error:
                if not is_transient(error) or attempt == attempts:
                    raise _GiveUp(f"could not {what}: {error}") from None
                problem = error
            except OSError as error:
                raise _GiveUp(f"could not {what}: {describe_error(error)}") from None
            delay = backoff.next_delay()
            if stop.deadline is not None and time.monotonic() + delay > stop.deadline:
                raise _GiveUp(f"could not {what} before stopping: {problem}")
            logger.warning(
                "job %s: could not %s (%s); retrying in %.0f s", self.lease.job_id, what, problem, delay
            )
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    # ---- training

    async def _train(self, spec: JobSpec, resume_from: Path | None) -> None:
        runner = self._host.runner_factory(
            spec, self.output_dir, resume_from=resume_from, device=self._host.device
        )
        self._runner = runner
        records: asyncio.Queue[Record | None] = asyncio.Queue()
        threading.Thread(
            target=self._pump_records,
            args=(asyncio.get_running_loop(), runner, records),
            name=f"records-{self.lease.job_id}",
            daemon=True,
        ).start()
        phase = "generating" if isinstance(spec, InferenceJobSpec) else "training"
        self._set_status(phase=phase, step=self.lease.checkpoint_step)
        while (record := await records.get()) is not None:
            await self._handle_record(record)

    def _pump_records(self, loop: asyncio.AbstractEventLoop, runner: Any, records: asyncio.Queue) -> None:
        """Thread: start the child and hand each of its records to the event loop."""

        def hand(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(records.put_nowait, item)
            except RuntimeError:  # the loop is gone: nobody will read on
                runner.kill()

        try:
            runner.start()
            hand(_RunnerStarted())
            for record in runner.records():
                hand(record)
        except Exception as error:
            logger.exception("job %s: the runner failed", self.lease.job_id)
            hand(Failed(kind="error", message=f"could not run the job: {describe_error(error)}"))
        finally:
            hand(None)

    async def _handle_record(self, record: Any) -> None:
        lease = self.lease
        if isinstance(record, _RunnerStarted):
            if self.cancel_reason is not None:  # a cancel that came while the child was starting
                self._runner.cancel(grace_seconds=CANCEL_GRACE_SECONDS)
        elif isinstance(record, Started):
            resumed = f", resumed at step {record.resumed_from_step}" if record.resumed_from_step else ""
            logger.info(
                "job %s: training on %s, %d steps%s", lease.job_id, record.device, record.total_steps, resumed
            )
            self._set_status(step=record.resumed_from_step, total_steps=record.total_steps)
        elif isinstance(record, Progress):
            self._set_status(
                step=record.step,
                total_steps=record.total_steps,
                loss=finite_or_none(record.loss),
                eval_loss=self.status.eval_loss
                if record.eval_loss is None
                else finite_or_none(record.eval_loss),
                tokens_per_second=finite_or_none(record.tokens_per_second),
                eta_seconds=finite_or_none(record.eta_seconds),
            )
            message = self._throttle.offer(progress_message(lease, record), time.monotonic())
            if message is not None:
                self._post(message)
        elif isinstance(record, CheckpointSaved):
            path = Path(record.path)
            if not path.resolve().is_relative_to(self.output_dir.resolve()):
                logger.warning("job %s: ignored a checkpoint outside its output directory", lease.job_id)
                return
            self._newest_checkpoint_step = max(self._newest_checkpoint_step, record.step)
            task = self._host.spawn(self._upload_checkpoint(record.step, path), f"checkpoint-{record.step}")
            self._uploads.add(task)
            task.add_done_callback(self._uploads.discard)
        elif isinstance(record, Log):
            level = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}.get(
                record.level, logging.ERROR
            )
            logger.log(level, "job %s: %s", lease.job_id, record.message)
        elif isinstance(record, Completed | Failed):
            self._completed = isinstance(record, Completed)
            held = self._throttle.flush()
            if held is not None:
                self._post(held)
            if isinstance(record, Completed):
                await self._report_result(record)
            else:
                await self._report_failure(record)

    # ---- checkpoints, results and failures

    async def _upload_checkpoint(self, step: int, path: Path) -> None:
        lease = self.lease
        async with self._upload_lock:
            # Only the newest checkpoint matters, and none once the lease is gone or the job completed.
            if step < self._newest_checkpoint_step or self._completed or self.cancel_reason == "coordinator":
                return
            archive = self.directory / f"checkpoint-{step:08d}.tar"
            try:
                await asyncio.to_thread(pack_directory, path, archive)
                sha256 = await self._retrying(
                    f"upload the checkpoint at step {step}",
                    lambda: self._host.client.upload_artifact(
                        archive, purpose="checkpoint", job_id=lease.job_id, lease_id=lease.lease_id
                    ),
                    UPLOAD_ATTEMPTS,
                )
            except (OSError, tarfile.TarError) as error:
                logger.warning(
                    "job %s: could not pack the checkpoint at step %d: %s", lease.job_id, step, error
                )
                return
            except _GiveUp as error:
                logger.warning("job %s: %s", lease.job_id, error)
                return
            finally:
                with contextlib.suppress(OSError):
                    archive.unlink(missing_ok=True)
        logger.info("job %s: checkpoint at step %d uploaded", lease.job_id, step)
        self._post(checkpoint_message(lease, step, sha256))

    async def _report_result(self, record: Completed) -> None:
        lease = self.lease
        if self.cancel_reason == "coordinator":  # finished just as the lease ended: nobody takes it now
            await self._report_failure(Failed(kind="cancelled", message="cancelled"))
            return
        self._set_status(phase="uploading")
        await asyncio.gather(*self._uploads, return_exceptions=True)
        archive = self.directory / artifacts.RESULT_ARCHIVE
        try:
            await asyncio.to_thread(workspace.pack_result, self.directory, archive, lease.dataset_sha256)
            sha256 = await self._retrying(
                "upload the result",
                lambda: self._host.client.upload_artifact(
                    archive, purpose="result", job_id=lease.job_id, lease_id=lease.lease_id
                ),
                UPLOAD_ATTEMPTS,
            )
            gguf_sha256 = None
            gguf = self.output_dir / artifacts.GGUF_ADAPTER_FILE
            if gguf.is_file():
                gguf_sha256 = await self._retrying(
                    "upload the adapter for llama.cpp",
                    lambda: self._host.client.upload_artifact(
                        gguf, purpose="adapter", job_id=lease.job_id, lease_id=lease.lease_id
                    ),
                    UPLOAD_ATTEMPTS,
                )
        except (OSError, tarfile.TarError, ValueError) as error:
            message = f"could not package the adapter: {describe_error(error)}"
            logger.error("job %s: %s", lease.job_id, message)
            self._post(failure_message(lease, "error", message))
            self._host.ended(JobOutcome(lease.job_id, "failed", message))
            return
        except _GiveUp as error:
            logger.error("job %s finished, but %s", lease.job_id, error)
            self._post(failure_message(lease, "error", f"finished, but {error}"))
            self._host.ended(JobOutcome(lease.job_id, "failed", str(error)))
            return
        finally:
            with contextlib.suppress(OSError):
                archive.unlink(missing_ok=True)
        final_loss = finite_or_none(record.final_loss)
        loss = f", final loss {final_loss:.4f}" if final_loss is not None else ""
        summary = f"{record.steps} steps in {record.seconds:.0f} s{loss}"
        logger.info("job %s completed: %s; result uploaded", lease.job_id, summary)
        self._post(result_message(lease, record, sha256, gguf_sha256))
        self._host.ended(JobOutcome(lease.job_id, "completed", summary))

    async def _report_failure(self, record: Failed) -> None:
        lease = self.lease
        # A checkpoint taken on the way out goes up before the failure, so the next node resumes from it.
        await asyncio.gather(*self._uploads, return_exceptions=True)
        if self.cancel_reason is not None and record.kind in ("cancelled", "crashed"):
            # Crashed too: a child that did not stop within the grace period was killed.
            (kind, message), outcome = self._why_stopped(), "cancelled"
            logger.info("job %s stopped: %s", lease.job_id, message)
        else:
            kind, message, outcome = record.kind, record.message, "failed"
            logger.warning(
                "job %s failed (%s): %s", lease.job_id, record.kind.replace("_", " "), record.message
            )
            if record.details:
                # Tracebacks and stderr stay on this machine: they may name the seller's paths.
                logger.info(
                    "job %s: details (see %s):\n%s",
                    lease.job_id,
                    self.output_dir / artifacts.WORKER_LOG,
                    record.details,
                )
        self._post(failure_message(lease, kind, message))
        self._host.ended(JobOutcome(lease.job_id, outcome, message))

    def _why_stopped(self) -> tuple[Literal["cancelled", "released"], str]:
        """The failure kind and message for a job this node stopped. Only a lease the coordinator ended
        is "cancelled"; a job the node stops for its own reasons is "released", which the coordinator
        queues again without using up one of the buyer's attempts."""
        if self.cancel_reason == "coordinator":
            return "cancelled", "cancelled by the coordinator"
        if self.cancel_reason == "paused":
            return "released", f"the seller paused the node ({self.pause_reason})"
        return "released", "the node is shutting down"
