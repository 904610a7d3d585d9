"""A buyer's money: balance, escrow and ledger history."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import String, func, literal, select

from coordinator import ledger
from coordinator.api.deps import CurrentBuyer, ServicesDep
from coordinator.api.schemas import BalanceOut, LedgerLine
from coordinator.tables import Job, LedgerEntry, LedgerTransaction

router = APIRouter(prefix="/api", tags=["account"])


@router.get("/balance")
def balance(buyer: CurrentBuyer, services: ServicesDep) -> BalanceOut:
    with services.database.transaction() as session:
        escrow_accounts = select(literal("escrow:", String) + Job.id).where(Job.buyer_id == buyer.id)
        held = session.scalar(
            select(func.coalesce(func.sum(LedgerEntry.amount_micro), 0)).where(
                LedgerEntry.account.in_(escrow_accounts)
            )
        )
        return BalanceOut(
            available_micro=ledger.balance(session, ledger.buyer_account(buyer.id)), escrow_micro=int(held)
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
    with services.database.transaction() as session:
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
