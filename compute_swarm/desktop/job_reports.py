"""What the coordinator hears of a running job, and how often: the engine's records (progress, a
checkpoint, the result, a failure) turned into wire messages for a lease, and the throttle that keeps
progress to about one message a second. desktop.job sends them.
"""

from __future__ import annotations

from compute_swarm import protocol
from compute_swarm.engine.records import Completed, Progress
from compute_swarm.protocol import finite_or_none

PROGRESS_INTERVAL_SECONDS = 1.0


def progress_message(lease: protocol.Lease, record: Progress) -> protocol.JobProgress:
    return protocol.JobProgress(
        job_id=lease.job_id,
        lease_id=lease.lease_id,
        step=max(record.step, 0),
        total_steps=max(record.total_steps, 0),
        loss=finite_or_none(record.loss),
        eval_loss=finite_or_none(record.eval_loss),
        learning_rate=finite_or_none(record.learning_rate),
        tokens_per_second=finite_or_none(record.tokens_per_second),
        eta_seconds=finite_or_none(record.eta_seconds),
    )


def checkpoint_message(lease: protocol.Lease, step: int, sha256: str) -> protocol.CheckpointUploaded:
    return protocol.CheckpointUploaded(job_id=lease.job_id, lease_id=lease.lease_id, step=step, sha256=sha256)


def result_message(
    lease: protocol.Lease, record: Completed, sha256: str, gguf_sha256: str | None = None
) -> protocol.JobResult:
    return protocol.JobResult(
        job_id=lease.job_id,
        lease_id=lease.lease_id,
        sha256=sha256,
        gguf_sha256=gguf_sha256,
        steps=max(record.steps, 0),
        final_loss=finite_or_none(record.final_loss),
        eval_loss=finite_or_none(record.eval_loss),
        delivered_eval_loss=finite_or_none(record.delivered_eval_loss),
        train_tokens=max(record.train_tokens, 0),
        seconds=max(finite_or_none(record.seconds) or 0.0, 0.0),
        offload=record.offload,
    )


def failure_message(lease: protocol.Lease, kind: str, message: str) -> protocol.JobFailure:
    return protocol.JobFailure(
        job_id=lease.job_id, lease_id=lease.lease_id, kind=kind, message=message[:4000]
    )


class ProgressThrottle:
    """At most one progress message per interval; the newest one held back is sent by flush(). A new
    held-out loss always goes at once: the coordinator judges a sweep trial by the loss at the very
    step it was measured (its checkpoint follows), which a later report would misplace."""

    def __init__(self, interval: float = PROGRESS_INTERVAL_SECONDS):
        self.interval = interval
        self._last_sent: float | None = None
        self._last_eval_loss: float | None = None
        self._held: protocol.JobProgress | None = None

    def offer(self, message: protocol.JobProgress, now: float) -> protocol.JobProgress | None:
        new_evaluation = message.eval_loss is not None and message.eval_loss != self._last_eval_loss
        if new_evaluation or self._last_sent is None or now - self._last_sent >= self.interval:
            self._last_sent, self._held = now, None
            self._last_eval_loss = (
                message.eval_loss if message.eval_loss is not None else self._last_eval_loss
            )
            return message
        self._held = message
        return None

    def flush(self) -> protocol.JobProgress | None:
        held, self._held = self._held, None
        return held
