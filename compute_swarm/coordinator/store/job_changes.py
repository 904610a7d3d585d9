"""Where a job's lifecycle meets its row: `change` asks coordinator.domain.lifecycle what an event does to the
job, writes the answer, posts its money through the ledger, records it in the job's timeline and
queues its effects for after the commit, all in the caller's transaction. This is the one place a
job's state is written.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnDefault, bindparam, insert, inspect, update
from sqlalchemy.orm import Session, make_transient_to_detached
from sqlalchemy.orm.attributes import set_committed_value

from compute_swarm.coordinator.domain import lifecycle
from compute_swarm.coordinator.domain.lifecycle import Charge, Hold, JobFacts, Move, Refund, ReturnCharge
from compute_swarm.coordinator.store import ledger
from compute_swarm.coordinator.store.database import after_commit
from compute_swarm.coordinator.store.job_events import record as record_event
from compute_swarm.coordinator.store.tables import Job

# A new job's row is made with the row's own fields; its lifecycle's fields come from Submitted.
_FIELDS = (
    "attempt",
    "node_id",
    "lease_id",
    "lease_expires_at",
    "error_kind",
    "error_message",
    "progress",
    "queued_at",
    "finished_at",
    "updated_at",
    "price_micro",
)


def facts(job: Job) -> JobFacts:
    """The job as its lifecycle reads it."""
    return JobFacts(
        job_id=job.id,
        buyer_id=job.buyer_id,
        state=job.state or lifecycle.NEW,
        price_micro=job.price_micro,
        max_attempts=job.max_attempts,
        rerun=job.verifies_job_id is not None,
        attempt=job.attempt or 0,
        node_id=job.node_id,
        lease_id=job.lease_id,
        lease_expires_at=job.lease_expires_at,
        excluded_nodes=tuple(job.excluded_nodes or ()),
        error_kind=job.error_kind,
        error_message=job.error_message,
        progress=job.progress,
        queued_at=job.queued_at,
        finished_at=job.finished_at,
        updated_at=job.updated_at,
    )


def change(session: Session, job: Job, event: lifecycle.Event) -> lifecycle.Transition:
    """Apply `event` to `job` (a row locked by the caller, or one just made); raises
    lifecycle.NotAllowed, changing nothing, when the job's state does not take it, and
    ledger.InsufficientCredits when a buyer cannot pay a hold."""
    transition = lifecycle.transition(facts(job), event)
    after = transition.job
    values: dict[str, Any] = {name: getattr(after, name) for name in _FIELDS}
    values["state"], values["excluded_nodes"] = after.state, list(after.excluded_nodes)
    # What can refuse the change refuses it before anything is written (a buyer's balance short of a
    # hold; a new job's text, checked as its row is written), so a refusal in a group commit needs no
    # rollback (Database._commit_group).
    for move in transition.moves:
        if isinstance(move, Hold):
            ledger.check_balance(session, job.buyer_id, move.amount_micro)
    if job not in session:
        for name, value in values.items():
            setattr(job, name, value)
        _insert(session, job)
    else:
        _update(session, job, values)
    for move in transition.moves:
        _post(session, job, move)
    record_event(session, job, transition.message)
    after_commit(session, *transition.effects)
    return transition


def _insert(session: Session, job: Job) -> None:
    """Write a new job's row with one plain statement (the ORM's unit of work for it was most of a
    submission's time), then hand the job to the session as a row it loaded, so what changes it
    later in the transaction is written as the ORM writes any change."""
    row = {}
    for attribute in _JOB_COLUMNS:
        if attribute.key not in job.__dict__:  # not given: the column's default, as an insert gives it
            setattr(job, attribute.key, _default(attribute.columns[0].default))
        row[attribute.key] = getattr(job, attribute.key)
    session.connection().execute(_INSERT_JOB, row)
    make_transient_to_detached(job)
    session.add(job)


def _update(session: Session, job: Job, values: dict[str, Any]) -> None:
    """Write a job's lifecycle fields with one plain statement, and tell its object the values written
    (the ORM's flush of the change cost more than a submission's other statements together)."""
    session.connection().execute(_UPDATE_JOB, {"job_id": job.id, **values})
    for name, value in values.items():
        set_committed_value(job, name, value)


def _default(default: ColumnDefault | None) -> Any:
    if default is None:
        return None
    return default.arg({}) if default.is_callable else default.arg  # a callable's argument: its context


_JOB_COLUMNS = list(inspect(Job).column_attrs)
_INSERT_JOB = insert(Job)
_UPDATE_JOB = (
    update(Job)
    .where(Job.id == bindparam("job_id"))
    .values({name: bindparam(name) for name in ("state", "excluded_nodes", *_FIELDS)})
)


def _post(session: Session, job: Job, move: Move) -> None:
    match move:
        case Hold():  # its balance checked by change(), under the balance's lock
            ledger.move_to_escrow(session, job.buyer_id, job.id, move.amount_micro)
        case Charge():
            ledger.charge(
                session,
                job.id,
                move.node_id,
                move.node_share_micro,
                move.fee_micro,
                buyer_id=job.buyer_id if move.return_rest else None,
                memo=move.memo,
            )
        case Refund():
            ledger.refund(session, job.id, job.buyer_id, memo=move.memo)
        case ReturnCharge():
            ledger.return_charge(session, job.id, job.buyer_id, move.amount_micro, memo=move.memo[:500])
