"""A buyer's money: balance, escrow and ledger history."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select

from coordinator import ledger
from coordinator.api.deps import CurrentBuyer, ServicesDep
from coordinator.api.schemas import BalanceOut, LedgerLine
from coordinator.lifecycle import OPEN_STATES
from coordinator.tables import Job, LedgerEntry, LedgerTransaction

router = APIRouter(prefix="/api", tags=["account"])


@router.get("/balance")
def balance(buyer: CurrentBuyer, services: ServicesDep) -> BalanceOut:
    with services.database.reading() as session:
        # Only unfinished jobs hold escrow; finished ones were charged or refunded.
        open_jobs = session.scalars(
            select(Job.id).where(Job.buyer_id == buyer.id, Job.state.in_(OPEN_STATES))
        ).all()
        return BalanceOut(
            available_micro=ledger.balance(session, ledger.buyer_account(buyer.id)),
            escrow_micro=ledger.balances(session, [ledger.escrow_account(job_id) for job_id in open_jobs]),
        )


@router.get("/ledger")
def history(
    buyer: CurrentBuyer, services: ServicesDep, limit: int = 100, before: int | None = None
) -> list[LedgerLine]:
    query = (
        select(LedgerEntry, LedgerTransaction)
        .join(LedgerTransaction, LedgerEntry.transaction_id == LedgerTransaction.id)
        .where(LedgerEntry.account == ledger.buyer_account(buyer.id))
        .order_by(LedgerEntry.id.desc())
        .limit(min(max(limit, 1), 1000))
    )
    if before is not None:
        query = query.where(LedgerEntry.id < before)
    with services.database.reading() as session:
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
