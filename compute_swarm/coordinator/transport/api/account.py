"""A buyer's money: balance, escrow and ledger history."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select
from sqlalchemy.orm import Session

from compute_swarm.coordinator.domain.lifecycle import OPEN_STATES
from compute_swarm.coordinator.store import ledger
from compute_swarm.coordinator.store.tables import Job, LedgerEntry, LedgerTransaction
from compute_swarm.coordinator.transport.api.deps import CurrentBuyer, ServicesDep
from compute_swarm.coordinator.transport.api.schemas import MAX_ROW_ID, BalanceOut, LedgerLine

router = APIRouter(prefix="/api", tags=["account"])


def balance_of(session: Session, buyer_id: str) -> BalanceOut:
    # Only unfinished jobs hold escrow; finished ones were charged or refunded.
    open_jobs = session.scalars(
        select(Job.id).where(Job.buyer_id == buyer_id, Job.state.in_(OPEN_STATES))
    ).all()
    return BalanceOut(
        available_micro=ledger.balance(session, ledger.buyer_account(buyer_id)),
        escrow_micro=ledger.balances(session, [ledger.escrow_account(job_id) for job_id in open_jobs]),
    )


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


@router.get("/balance")
def balance(buyer: CurrentBuyer, services: ServicesDep) -> BalanceOut:
    with services.database.reading() as session:
        return balance_of(session, buyer.id)


@router.get("/ledger")
def history(
    buyer: CurrentBuyer,
    services: ServicesDep,
    limit: int = 100,
    before: Annotated[int | None, Query(ge=0, le=MAX_ROW_ID, description="an entry id, to page back")] = None,
) -> list[LedgerLine]:
    with services.database.reading() as session:
        return ledger_lines(session, buyer.id, limit, before)
