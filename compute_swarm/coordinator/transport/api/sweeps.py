"""Buyers' hyperparameter sweeps: price, submit, list, inspect (a row per trial, the best), cancel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, status
from pydantic import BaseModel
from sqlalchemy import select

from compute_swarm.coordinator.service import trials
from compute_swarm.coordinator.service.submissions import JobError
from compute_swarm.coordinator.store.tables import Sweep
from compute_swarm.coordinator.transport.api.deps import CurrentBuyer, Services, ServicesDep, owned
from compute_swarm.coordinator.transport.api.jobs import refusal

router = APIRouter(prefix="/api/sweeps", tags=["sweeps"])


class SweepIn(BaseModel):
    spec: dict[str, Any]


def owned_sweep(sweep_id: str, buyer: CurrentBuyer, services: ServicesDep) -> Sweep:
    return owned(services, Sweep, sweep_id, buyer)


OwnedSweep = Annotated[Sweep, Depends(owned_sweep)]


def _view(services: ServicesDep, sweep: Sweep) -> dict:
    with services.database.reading() as session:
        return trials.view(session, sweep)


@dataclass(frozen=True)
class SweepQuote:
    """What a sweep would hold when submitted: each trial's price, in the order of its trials."""

    trial_prices_micro: list[int]
    available_micro: int
    max_price_per_trial_micro: int | None
    max_total_price_micro: int | None

    @property
    def price_micro(self) -> int:
        return sum(self.trial_prices_micro)


class TrialRefused(JobError):
    """A sweep's trial the coordinator would refuse: which one, its swept settings, and why (with the
    spec fields at fault, as for a job)."""

    def __init__(self, number: int, values: dict[str, float | int], error: JobError):
        settings = ", ".join(f"{name}={value}" for name, value in values.items())
        super().__init__(f"trial {number} ({settings}): {error}", error.status_code, error.fields)
        self.number = number
        self.values = values


def quote_sweep(services: Services, buyer_id: str, spec_data: Any) -> SweepQuote:
    """Price every trial as submitting would, changing nothing. SweepError for the sweep's own spec,
    TrialRefused for a trial the coordinator would refuse. The caps are not applied: the buyer sees
    the price beside them."""
    spec = trials.parse(spec_data)
    prices: list[int] = []
    available = 0
    for number, (data, values) in enumerate(trials.trial_specs(spec), 1):
        try:
            quoted, available = services.submissions.quote(buyer_id, data)
        except JobError as error:
            raise TrialRefused(number, values, error) from None
        prices.append(quoted.price_micro)
    return SweepQuote(prices, available, spec.max_price_per_trial_micro, spec.max_total_price_micro)


class SweepQuoteOut(BaseModel):
    trials: int
    price_micro: int  # all the trials together: what submitting holds
    trial_prices_micro: list[int]
    available_micro: int
    affordable: bool
    within_caps: bool  # False: submitting is refused (max_price_per_trial_micro or max_total_price_micro)


@router.post("/quote")
def quote(body: SweepIn, buyer: CurrentBuyer, services: ServicesDep) -> SweepQuoteOut:
    """What submitting this sweep would hold in escrow, trial by trial, next to the buyer's balance."""
    try:
        quoted = quote_sweep(services, buyer.id, body.spec)
    except trials.SweepError as error:
        raise HTTPException(error.status_code, str(error)) from None
    except JobError as error:
        return refusal(error)
    per_trial, total = quoted.max_price_per_trial_micro, quoted.max_total_price_micro
    return SweepQuoteOut(
        trials=len(quoted.trial_prices_micro),
        price_micro=quoted.price_micro,
        trial_prices_micro=quoted.trial_prices_micro,
        available_micro=quoted.available_micro,
        affordable=quoted.price_micro <= quoted.available_micro,
        within_caps=(per_trial is None or max(quoted.trial_prices_micro) <= per_trial)
        and (total is None or quoted.price_micro <= total),
    )


@router.post("", status_code=status.HTTP_201_CREATED)
def submit(body: SweepIn, buyer: CurrentBuyer, services: ServicesDep) -> dict:
    """Expand the sweep into trials and queue them all, holding each trial's price (or queue none)."""
    try:
        sweep, _queued = services.submissions.submit_sweep(buyer.id, body.spec)
    except trials.SweepError as error:
        raise HTTPException(error.status_code, str(error)) from None
    return _view(services, sweep)


@router.get("")
def list_sweeps(buyer: CurrentBuyer, services: ServicesDep) -> list[dict]:
    with services.database.reading() as session:
        sweeps = session.scalars(
            select(Sweep).where(Sweep.buyer_id == buyer.id).order_by(Sweep.created_at.desc()).limit(200)
        ).all()
        return [trials.view(session, sweep) for sweep in sweeps]


@router.get("/{sweep_id}")
def get_sweep(sweep: OwnedSweep, services: ServicesDep) -> dict:
    return _view(services, sweep)


@router.post("/{sweep_id}/cancel")
def cancel(sweep: OwnedSweep, services: ServicesDep) -> dict:
    """Cancel every trial still open (their escrow comes back); finished trials stay as they are."""
    services.submissions.cancel_sweep(sweep.id)
    return _view(services, sweep)
