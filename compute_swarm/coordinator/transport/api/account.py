"""A buyer's money: balance, escrow and ledger history."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from compute_swarm.coordinator.service import buyer_reads
from compute_swarm.coordinator.transport.api.deps import CurrentBuyer, ServicesDep
from compute_swarm.coordinator.transport.api.schemas import MAX_ROW_ID

router = APIRouter(prefix="/api", tags=["account"])

# The service's own records are the answers: FastAPI serialises dataclasses as they are.


@router.get("/balance")
def balance(buyer: CurrentBuyer, services: ServicesDep) -> buyer_reads.Balance:
    with services.database.reading() as session:
        return buyer_reads.balance(session, buyer.id)


@router.get("/ledger")
def history(
    buyer: CurrentBuyer,
    services: ServicesDep,
    limit: int = 100,
    before: Annotated[int | None, Query(ge=0, le=MAX_ROW_ID, description="an entry id, to page back")] = None,
) -> list[buyer_reads.LedgerLine]:
    with services.database.reading() as session:
        return buyer_reads.ledger_lines(session, buyer.id, limit, before)
