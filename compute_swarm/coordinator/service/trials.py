"""A sweep's trials in the database: queueing them all (or none), stopping the clearly worse ones
early, and the sweep as its buyer sees it (each trial's settings, losses, cost and state; the best).

A trial stopped early is paid only for steps the coordinator can check: those between the checkpoint
its lease resumed from (step 0 for a fresh start) and the latest checkpoint that same lease uploaded
(the coordinator holds it, checked by its sha256 on arrival). The buyer is charged that share of the
trial's price and the node credited its share of that (pending, as for a completed job); the rest of
the escrow goes back to the buyer. No checkpoint from the lease, no charge at all: the step a node
reports is never paid for. A paid stopped trial is sampled for verification as a completed job is: a
trusted node trains the trial's spec up to the checkpoint's step and measures the checkpoint's held-out
loss beside its own (coordinator.service.verifier).

Stopping follows the held-out loss the trial's node reports (a lie there only ends its own trial),
against the losses the other trials reported at or before that step (sweeps.losses_at). The engine
evaluates at each checkpoint step and reports the loss before it saves the checkpoint, so a trial is
judged there when that checkpoint arrives, and is paid for every step it ran; a loss reported at any
other step is judged at once. A trial at its last step is never stopped: its result follows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from compute_swarm import sweeps
from compute_swarm.coordinator.domain import lifecycle
from compute_swarm.coordinator.domain.lifecycle import OPEN_STATES, STOPPED_EARLY
from compute_swarm.coordinator.service.inference import fine_tuned_model_id
from compute_swarm.coordinator.settings import Settings
from compute_swarm.coordinator.store import ledger
from compute_swarm.coordinator.store.job_changes import change
from compute_swarm.coordinator.store.tables import (
    Job,
    JobProgressPoint,
    LedgerEntry,
    LedgerTransaction,
    Sweep,
    Upload,
)
from compute_swarm.protocol import SUCCEEDED_JOB_STATES

if TYPE_CHECKING:
    from compute_swarm.coordinator.service.verifier import Verifier

# In a running trial's progress: the checkpoint step its lease started from (set at its first report).
RESUMED_FROM_STEP = "resumed_from_step"


class SweepError(ValueError):
    def __init__(self, message: str, status_code: int = 422):
        super().__init__(message)
        self.status_code = status_code


def parse(spec_data: Any) -> sweeps.SweepSpec:
    try:
        return sweeps.parse(spec_data)
    except ValueError as error:
        raise SweepError(str(error)) from None


def trial_specs(spec: sweeps.SweepSpec) -> list[tuple[dict[str, Any], dict[str, float | int]]]:
    """(the trial's LoRA spec data, its swept settings) for each trial."""
    try:
        settings = sweeps.expand(spec)
    except ValueError as error:
        raise SweepError(str(error)) from None
    trials = []
    for values in settings:
        data = {**spec.base, **values, "type": "lora"}
        steps = data.get("max_steps")
        if not isinstance(steps, int):
            raise SweepError(
                "a sweep's trials need max_steps (in base or among the parameters), for median stopping"
            )
        # The engine measures the held-out loss at each checkpoint: so many a trial, to compare trials.
        data["checkpoint_interval"] = sweeps.evaluation_interval(steps, spec.evaluations_per_trial)
        trials.append((data, values))
    return trials


@dataclass(frozen=True)
class CheckedWork:
    """The steps of a trial's current lease that the coordinator can check: from the checkpoint the
    lease resumed from to the latest checkpoint the lease uploaded (to_step == from_step: none)."""

    from_step: int
    to_step: int
    checkpoint_sha256: str | None

    @property
    def steps(self) -> int:
        return self.to_step - self.from_step


def checked_work(session: Session, job: Job) -> CheckedWork:
    """What the job's current lease did that a checkpoint it uploaded shows."""
    resumed_from = (job.progress or {}).get(RESUMED_FROM_STEP)
    if not isinstance(resumed_from, int):
        # A lease that began before the coordinator recorded where leases start: nothing it can show.
        resumed_from = job.checkpoint_step
    if job.checkpoint_sha256 is None or job.checkpoint_step <= resumed_from:
        return CheckedWork(resumed_from, resumed_from, None)
    uploaded = session.scalar(
        select(Upload.id).where(
            Upload.holder == f"node:{job.node_id}",
            Upload.job_id == job.id,
            Upload.lease_id == job.lease_id,
            Upload.purpose == "checkpoint",
            Upload.sha256 == job.checkpoint_sha256,
            Upload.completed_at.is_not(None),
        )
    )
    if uploaded is None:
        return CheckedWork(resumed_from, resumed_from, None)
    return CheckedWork(resumed_from, job.checkpoint_step, job.checkpoint_sha256)


def checkpoint_follows(job: Job, step: int) -> bool:
    """Whether the engine saves a checkpoint at this step of the trial, after reporting its held-out
    loss there (engine.lora: every checkpoint_interval steps, before the last)."""
    spec = job.submitted_spec
    interval = spec.checkpoint_interval
    return interval > 0 and step % interval == 0 and step < (spec.max_steps or 0)


def after_evaluation(
    session: Session, job: Job, step: int, eval_loss: float, settings: Settings, verifier: Verifier
) -> str | None:
    """A trial's node reported a held-out loss at `step`; the reason when the trial stopped."""
    if step >= (job.max_steps or 0):
        return None  # its result follows
    if checkpoint_follows(job, step) and checked_work(session, job).to_step < step:
        return None  # judged when the checkpoint arrives (after_checkpoint)
    return stop_if_worse(session, job, step, eval_loss, settings, verifier)


def after_checkpoint(
    session: Session, job: Job, step: int, settings: Settings, verifier: Verifier
) -> str | None:
    """A trial's lease just uploaded its checkpoint at `step`: judged by the held-out loss this attempt
    reported there; the reason when the trial stopped."""
    if step >= (job.max_steps or 0):
        return None  # a checkpoint at its last step: its result follows
    eval_loss = session.scalar(
        select(JobProgressPoint.eval_loss)
        .where(
            JobProgressPoint.job_id == job.id,
            JobProgressPoint.attempt == job.attempt,
            JobProgressPoint.step == step,
            JobProgressPoint.eval_loss.is_not(None),
        )
        .order_by(JobProgressPoint.id.desc())
        .limit(1)
    )
    if eval_loss is None:
        return None
    return stop_if_worse(session, job, step, eval_loss, settings, verifier)


def stop_if_worse(
    session: Session, job: Job, step: int, eval_loss: float, settings: Settings, verifier: Verifier
) -> str | None:
    """Median stopping for a trial with a held-out loss at `step`; the reason when it stopped."""
    sweep = session.get(Sweep, job.sweep_id)
    if sweep is None:
        return None
    rule = sweeps.SweepSpec.model_validate(sweep.spec).median_stopping
    others = sweeps.losses_at(
        (
            [
                (point.step, point.eval_loss)
                for point in session.scalars(
                    select(JobProgressPoint)
                    .where(JobProgressPoint.job_id == other_id, JobProgressPoint.eval_loss.is_not(None))
                    .order_by(JobProgressPoint.step)
                )
            ]
            for other_id in session.scalars(select(Job.id).where(Job.sweep_id == sweep.id, Job.id != job.id))
        ),
        step,
    )
    stop, median = sweeps.should_stop(eval_loss, step, others, rule)
    if not stop:
        return None
    # The job's own step count, never the node's report of it.
    total = max(job.max_steps or step, 1)
    reason = (
        f"stopped early at step {step} of {total}: held-out loss {eval_loss:.4f} is above the median "
        f"{median:.4f} of {len(others)} other trials"
    )
    work = checked_work(session, job)
    stopped = lifecycle.TrialStopped(
        time.time(), reason, total, work.from_step, work.to_step, settings.platform_fee_basis_points
    )
    change(session, job, stopped)
    if job.price_micro > 0:
        assert work.checkpoint_sha256 is not None
        verifier.after_stop(session, job, work.to_step, work.checkpoint_sha256)
    else:
        verifier.not_to_verify(job, "stopped early with nothing charged: nothing to verify")
    return job.error_message


def view(session: Session, sweep: Sweep) -> dict[str, Any]:
    """The sweep as its buyer reads it: a row per trial, the best trial, the money."""
    trials = session.scalars(
        select(Job).where(Job.sweep_id == sweep.id).order_by(Job.created_at, Job.id)
    ).all()
    # The buyer's side of each trial's money: held at submission (escrow), and given back (a refund,
    # or a stopped trial's unused share in its charge).
    held: dict[str, int] = {}
    returned: dict[str, int] = {}
    for job_id, kind, amount in session.execute(
        select(LedgerTransaction.job_id, LedgerTransaction.kind, LedgerEntry.amount_micro)
        .join(LedgerEntry, LedgerEntry.transaction_id == LedgerTransaction.id)
        .where(
            LedgerTransaction.job_id.in_([trial.id for trial in trials]),
            LedgerEntry.account == ledger.buyer_account(sweep.buyer_id),
        )
    ):
        if kind == "escrow":
            held[job_id] = -amount
        else:
            returned[job_id] = returned.get(job_id, 0) + amount
    rows = []
    for number, trial in enumerate(trials, 1):
        points = session.scalars(
            select(JobProgressPoint)
            .where(JobProgressPoint.job_id == trial.id, JobProgressPoint.eval_loss.is_not(None))
            .order_by(JobProgressPoint.step)
        ).all()
        metrics = trial.metrics or {}
        cost = held.get(trial.id, 0) - returned.get(trial.id, 0) if trial.state not in OPEN_STATES else None
        rows.append(
            {
                "trial": number,
                "job_id": trial.id,
                "state": STOPPED_EARLY if trial.error_kind == STOPPED_EARLY else trial.state,
                **(trial.sweep_parameters or {}),
                "step": (trial.progress or {}).get("step", metrics.get("steps")),
                "eval_loss": metrics.get("eval_loss")
                if trial.state in SUCCEEDED_JOB_STATES
                else (points[-1].eval_loss if points else None),
                "final_loss": metrics.get("final_loss"),
                "held_micro": held.get(trial.id, 0),
                "cost_micro": cost,
                "fine_tuned_model": fine_tuned_model_id(trial) if trial.result_gguf_sha256 else None,
            }
        )
    finished = [row for row, trial in zip(rows, trials, strict=True) if trial.state in SUCCEEDED_JOB_STATES]
    ranked = [row for row in finished if row["eval_loss"] is not None] or [
        row for row in finished if row["final_loss"] is not None
    ]
    best = min(
        ranked,
        key=lambda row: row["eval_loss"] if row["eval_loss"] is not None else row["final_loss"],
        default=None,
    )
    open_trials = sum(trial.state in OPEN_STATES for trial in trials)
    return {
        "id": sweep.id,
        "state": "running" if open_trials else "completed",
        "spec": sweep.spec,
        "created_at": sweep.created_at,
        "trials": rows,
        "best": best,
        "cost_micro": sum(row["cost_micro"] or 0 for row in rows),
        "held_micro": sum(row["held_micro"] for row in rows if row["cost_micro"] is None),
    }
