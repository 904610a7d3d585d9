"""A buyer's money: balance, escrow and ledger history."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Query

from compute_swarm.coordinator.service import buyer_reads
from compute_swarm.coordinator.transport.api.deps import CurrentBuyer, ServicesDep
from compute_swarm.coordinator.transport.api.schemas import MAX_ROW_ID, BalanceOut, LedgerLine

router = APIRouter(prefix="/api", tags=["account"])


@router.get("/balance")
def balance(buyer: CurrentBuyer, services: ServicesDep) -> BalanceOut:
    with services.database.reading() as session:
        return BalanceOut(**asdict(buyer_reads.balance(session, buyer.id)))


@router.get("/ledger")
def history(
    buyer: CurrentBuyer,
    services: ServicesDep,
    limit: int = 100,
    before: Annotated[int | None, Query(ge=0, le=MAX_ROW_ID, description="an entry id, to page back")] = None,
) -> list[LedgerLine]:
    with services.database.reading() as session:
        return [
            LedgerLine(**asdict(line)) for line in buyer_reads.ledger_lines(session, buyer.id, limit, before)
        ]
