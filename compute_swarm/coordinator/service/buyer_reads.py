"""What a buyer reads of their own, in one place for the API and the web pages: their jobs (never the
verification re-runs that check them: those are the platform's), their balance and escrow, and their
ledger lines."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from compute_swarm.coordinator.domain.lifecycle import OPEN_STATES
from compute_swarm.coordinator.store import ledger
from compute_swarm.coordinator.store.tables import Job, LedgerEntry, LedgerTransaction
from compute_swarm.protocol import SUCCEEDED_JOB_STATES


def buyers_jobs(buyer_id: str) -> Select[tuple[Job]]:
    """A buyer's jobs as the buyer sees them, to narrow, order and page."""
    return select(Job).where(Job.buyer_id == buyer_id, Job.verifies_job_id.is_(None))


def servable_models(buyer_id: str) -> Select[tuple[Job]]:
    """A buyer's fine-tunes whose llama.cpp adapter was checked, newest first: the models they chat with."""
    return (
        buyers_jobs(buyer_id)
        .where(Job.state.in_(SUCCEEDED_JOB_STATES), Job.result_gguf_sha256.is_not(None))
        .order_by(Job.finished_at.desc())
    )


@dataclass(frozen=True)
class Balance:
    available_micro: int
    escrow_micro: int  # held for the buyer's unfinished jobs


def balance(session: Session, buyer_id: str) -> Balance:
    # Only unfinished jobs hold escrow; finished ones were charged or refunded.
    open_jobs = session.scalars(
        select(Job.id).where(Job.buyer_id == buyer_id, Job.state.in_(OPEN_STATES))
    ).all()
    return Balance(
        available_micro=ledger.balance(session, ledger.buyer_account(buyer_id)),
        escrow_micro=ledger.balances(session, [ledger.escrow_account(job_id) for job_id in open_jobs]),
    )


@dataclass(frozen=True)
class LedgerLine:
    id: int
    transaction_id: int
    kind: str
    job_id: str | None
    amount_micro: int
    memo: str
    created_at: float


def ledger_lines(
    session: Session, buyer_id: str, limit: int = 100, before: int | None = None
) -> list[LedgerLine]:
    """A buyer's ledger entries, newest first (before: an entry id, to page back)."""
    query = (
        select(LedgerEntry, LedgerTransaction)
        .join(LedgerTransaction, LedgerEntry.transaction_id == LedgerTransaction.id)
        .where(LedgerEntry.account == ledger.buyer_account(buyer_id))
        .order_by(LedgerEntry.id.desc())
        .limit(min(max(limit, 1), 1000))
    )
    if before is not None:
        query = query.where(LedgerEntry.id < before)
    return [
        LedgerLine(
            id=entry.id,
            transaction_id=transaction.id,
            kind=transaction.kind,
            job_id=transaction.job_id,
            amount_micro=entry.amount_micro,
            memo=transaction.memo,
            created_at=transaction.created_at,
        )
        for entry, transaction in session.execute(query).all()
    ]
