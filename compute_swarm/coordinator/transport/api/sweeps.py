"""Buyers' hyperparameter sweeps: submit, list, inspect (a row per trial, the best), cancel."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, status
from pydantic import BaseModel
from sqlalchemy import select

from compute_swarm.coordinator.service import trials
from compute_swarm.coordinator.store.tables import Sweep
from compute_swarm.coordinator.transport.api.deps import CurrentBuyer, ServicesDep, owned

router = APIRouter(prefix="/api/sweeps", tags=["sweeps"])


class SweepIn(BaseModel):
    spec: dict[str, Any]


def owned_sweep(sweep_id: str, buyer: CurrentBuyer, services: ServicesDep) -> Sweep:
    return owned(services, Sweep, sweep_id, buyer)


OwnedSweep = Annotated[Sweep, Depends(owned_sweep)]


def _view(services: ServicesDep, sweep: Sweep) -> dict:
    with services.database.reading() as session:
        return trials.view(session, sweep)


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
