"""A buyer's money: balance, escrow, ledger history, and the live (/v1) requests that spent it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from compute_swarm.coordinator.service import buyer_reads
from compute_swarm.coordinator.store.tables import InferenceRequest
from compute_swarm.coordinator.transport.api.deps import CurrentBuyer, ServicesDep
from compute_swarm.coordinator.transport.api.schemas import MAX_ROW_ID

router = APIRouter(prefix="/api", tags=["account"])

MAX_LISTED_REQUESTS = 500

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


@dataclass(frozen=True)
class RequestLine:
    """One chat or completion request: what it held while it ran and what it was charged (price_micro;
    0 while open, and for a failed one)."""

    id: str
    model: str
    state: str  # open, completed, failed
    prompt_tokens: int
    completion_tokens: int
    price_micro: int
    held_micro: int
    created_at: float
    finished_at: float | None
    error: str | None


@dataclass(frozen=True)
class RequestTotals:
    """Every request the buyer ever made, not only those listed."""

    requests: int
    prompt_tokens: int
    completion_tokens: int
    charged_micro: int


@dataclass(frozen=True)
class RequestList:
    requests: list[RequestLine]
    totals: RequestTotals


def inference_requests(session: Session, buyer_id: str, limit: int = 100) -> RequestList:
    """A buyer's live requests, newest first (at most `limit`), with the totals over all of them."""
    rows = session.scalars(
        select(InferenceRequest)
        .where(InferenceRequest.buyer_id == buyer_id)
        .order_by(InferenceRequest.created_at.desc(), InferenceRequest.id)
        .limit(limit)
    ).all()
    count, prompt_tokens, completion_tokens, charged = session.execute(
        select(
            func.count(),
            func.coalesce(func.sum(InferenceRequest.prompt_tokens), 0),
            func.coalesce(func.sum(InferenceRequest.completion_tokens), 0),
            func.coalesce(func.sum(InferenceRequest.price_micro), 0),
        ).where(InferenceRequest.buyer_id == buyer_id)
    ).one()
    return RequestList(
        requests=[
            RequestLine(
                id=row.id,
                model=row.model,
                state=row.state,
                prompt_tokens=row.prompt_tokens,
                completion_tokens=row.completion_tokens,
                price_micro=row.price_micro,
                held_micro=row.held_micro,
                created_at=row.created_at,
                finished_at=row.finished_at,
                error=row.error,
            )
            for row in rows
        ],
        totals=RequestTotals(int(count), int(prompt_tokens), int(completion_tokens), int(charged)),
    )


@router.get("/inference-requests")
def requests(
    buyer: CurrentBuyer,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=MAX_LISTED_REQUESTS)] = 100,
) -> RequestList:
    """This buyer's /v1 chat and completion requests, newest first, with their tokens and charges."""
    with services.database.reading() as session:
        return inference_requests(session, buyer.id, limit)
