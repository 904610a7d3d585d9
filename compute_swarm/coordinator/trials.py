"""A sweep's trials in the database: queueing them all (or none), stopping the clearly worse ones
early, and the sweep as its buyer sees it (each trial's settings, losses, cost and state; the best).

A trial stopped early is charged for the share of its steps it ran (the node did that work) and the
rest of its escrow goes back to the buyer.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from compute_swarm import sweeps
from compute_swarm.coordinator import ledger, pricing
from compute_swarm.coordinator.inference import fine_tuned_model_id
from compute_swarm.coordinator.job_events import record as record_event
from compute_swarm.coordinator.lifecycle import CANCELLED, OPEN_STATES, SUCCEEDED_STATES
from compute_swarm.coordinator.settings import Settings
from compute_swarm.coordinator.tables import Job, JobProgressPoint, LedgerEntry, LedgerTransaction, Sweep

STOPPED_EARLY = "stopped_early"


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


def stop_if_worse(session: Session, job: Job, step: int, eval_loss: float, settings: Settings) -> str | None:
    """Median stopping for a trial that just reported a held-out loss; the reason when it stopped."""
    sweep = session.get(Sweep, job.sweep_id)
    if sweep is None:
        return None
    rule = sweeps.SweepSpec.model_validate(sweep.spec).median_stopping
    others: list[float] = []
    for other_id in session.scalars(select(Job.id).where(Job.sweep_id == sweep.id, Job.id != job.id)):
        points = [
            (point.step, point.eval_loss)
            for point in session.scalars(
                select(JobProgressPoint)
                .where(JobProgressPoint.job_id == other_id, JobProgressPoint.eval_loss.is_not(None))
                .order_by(JobProgressPoint.step)
            )
        ]
        # Only trials that got as far: a loss from an earlier step would flatter this one.
        if points and points[-1][0] >= step:
            others.append(sweeps.loss_at(points, step))
    stop, median = sweeps.should_stop(eval_loss, step, others, rule)
    if not stop:
        return None
    # The job's own step count, never the node's report of it: the node is paid by this share.
    total = job.spec.get("max_steps") or step
    reason = (
        f"stopped early at step {step} of {total}: held-out loss {eval_loss:.4f} is above the median "
        f"{median:.4f} of {len(others)} other trials"
    )
    # The node did `step` of `total` steps' work: the buyer pays that share, and gets the rest back.
    price = job.price_micro * min(step, total) // max(total, 1)
    node_share, fee = pricing.split_payment(price, settings.platform_fee_basis_points)
    ledger.charge(session, job.id, job.node_id, node_share, fee, buyer_id=job.buyer_id, memo=reason[:500])
    job.price_micro = price
    job.state = CANCELLED
    job.error_kind = STOPPED_EARLY
    job.error_message = reason
    job.finished_at = job.updated_at = time.time()
    job.lease_id = job.lease_expires_at = None
    # Not re-run (it delivered nothing to check): its node's credit waits out the window.
    job.verification = "skipped"
    job.verification_detail = "stopped early: nothing delivered to verify"
    job.credit_release_at = job.finished_at + settings.verification_window_seconds
    record_event(session, job, reason)
    return reason


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
                if trial.state in SUCCEEDED_STATES
                else (points[-1].eval_loss if points else None),
                "final_loss": metrics.get("final_loss"),
                "held_micro": held.get(trial.id, 0),
                "cost_micro": cost,
                "fine_tuned_model": fine_tuned_model_id(trial) if trial.result_gguf_sha256 else None,
            }
        )
    finished = [row for row, trial in zip(rows, trials, strict=True) if trial.state in SUCCEEDED_STATES]
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
