"""The market's figures by hardware class (service/market.py), public: what a computer of each class
earned per hour of work and how busy such computers were, which sellers' apps and the sell page turn
into a forecast. Aggregates only, computed at most once a minute."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from compute_swarm.coordinator.service.market import market_figures
from compute_swarm.coordinator.transport.api.deps import Services, ServicesDep
from compute_swarm.market import MarketFigures

router = APIRouter(tags=["market"])
REFRESH_SECONDS = 60.0


async def current_market(request: Request, services: ServicesDep) -> MarketFigures:
    """The market's figures, computed at most once a minute for the API and the sell page: they move
    slowly, and one computation reads a week of the ledger."""
    cached: tuple[float, MarketFigures] | None = getattr(request.app.state, "market_figures", None)
    if cached is not None and time.monotonic() - cached[0] < REFRESH_SECONDS:
        return cached[1]
    connected = list(services.hub.connections)  # the hub's, read here on the event loop
    figures = await run_in_threadpool(_compute, services, connected)
    request.app.state.market_figures = (time.monotonic(), figures)
    return figures


CurrentMarket = Annotated[MarketFigures, Depends(current_market)]


@router.get("/api/market")
async def market(figures: CurrentMarket) -> MarketFigures:
    return figures


def _compute(services: Services, connected: list[str]) -> MarketFigures:
    with services.database.reading() as session:
        return market_figures(session, connected, services.settings.credit_value_for_nodes)
