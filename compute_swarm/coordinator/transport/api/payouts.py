"""For ops (the admin token): the payout queue, exporting a batch to pay, and marking each payout paid
or rejected. Sellers ask for payouts through their node's routes (api/nodes.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from compute_swarm.coordinator.service.payouts import OPEN_STATES, PAYOUT_STATES, PayoutError, Rate
from compute_swarm.coordinator.transport.api.deps import Operator, ServicesDep
from compute_swarm.coordinator.transport.api.schemas import PayoutOut, PayoutReceiptOut

router = APIRouter(prefix="/api/ops/payouts", tags=["ops"], dependencies=[Operator])


class RateOut(BaseModel):
    currency: str
    rate: str


class PayoutQueueOut(BaseModel):
    payouts: list[PayoutOut]
    totals_micro: dict[str, int]  # by state, over every payout ever
    minimum_micro: int
    default_rate: RateOut


class ExportIn(BaseModel):
    """The rate to convert at (currency per credit); both left out: the credit's value (settings)."""

    model_config = ConfigDict(extra="forbid")
    currency: str | None = Field(default=None, max_length=3)
    rate: str | None = Field(default=None, max_length=32)


class ExportOut(BaseModel):
    batch_id: str
    csv_url: str


class PaidIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reference: str = Field(min_length=1, max_length=200, description="the payment's own reference")


class RejectIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=500, description="why, in words its seller reads")


def _answer(call, *arguments):
    try:
        return call(*arguments)
    except PayoutError as error:
        raise HTTPException(error.status_code, str(error)) from None


@router.get("")
async def queue(
    services: ServicesDep,
    state: Annotated[list[str] | None, Query(description="requested, exported, paid, rejected")] = None,
) -> PayoutQueueOut:
    """Payouts in these states (default: requested and exported, the ones ops owe), oldest first."""
    states = tuple(state) if state else OPEN_STATES
    unknown = [name for name in states if name not in PAYOUT_STATES]
    if unknown:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"unknown payout state {unknown[0]!r}: give {', '.join(PAYOUT_STATES)}",
        )
    return PayoutQueueOut(**await run_in_threadpool(services.payouts.queue, states))


@router.post("/export", status_code=status.HTTP_201_CREATED)
async def export(body: ExportIn, services: ServicesDep) -> ExportOut:
    """Put every requested payout in a new batch, converted at the rate given (default: the credit's
    value); its CSV is at `csv_url`. 409 when none is waiting."""
    rate = None
    if body.currency is not None or body.rate is not None:
        default = services.payouts.default_rate
        rate = _answer(Rate.parse, body.currency or default.currency, body.rate or str(default.value))
    batch_id = await run_in_threadpool(_answer, services.payouts.export, rate)
    return ExportOut(batch_id=batch_id, csv_url=f"/api/ops/payouts/batches/{batch_id}.csv")


@router.get(
    "/batches/{batch_id}.csv",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/csv": {}}}},
)
async def batch_csv(batch_id: str, services: ServicesDep) -> PlainTextResponse:
    text = await run_in_threadpool(_answer, services.payouts.batch_csv, batch_id)
    return PlainTextResponse(
        text,
        media_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="payouts-{batch_id}.csv"'},
    )


@router.get("/{payout_id}")
async def receipt(payout_id: str, services: ServicesDep) -> PayoutReceiptOut:
    return PayoutReceiptOut(**await run_in_threadpool(_answer, services.payouts.receipt, payout_id))


@router.post("/{payout_id}/paid")
async def mark_paid(payout_id: str, body: PaidIn, services: ServicesDep) -> PayoutOut:
    """Ops paid it outside the swarm, with this reference: idempotent for the same reference."""
    return PayoutOut(
        **await run_in_threadpool(_answer, services.payouts.mark_paid, payout_id, body.reference)
    )


@router.post("/{payout_id}/reject")
async def reject(payout_id: str, body: RejectIn, services: ServicesDep) -> PayoutOut:
    """Ops will not pay it: the credit goes back to its seller's available balance."""
    return PayoutOut(**await run_in_threadpool(_answer, services.payouts.reject, payout_id, body.reason))
