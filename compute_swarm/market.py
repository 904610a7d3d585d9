"""Market figures by hardware class, as the coordinator publishes them (`GET /api/market`) and a seller's
app reads them for its forecast: "this PC would earn about X a day at current demand, about Y after
electricity". Light: both sides import it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

from compute_swarm.protocol import CreditValue

CPU_ONLY = "CPU only"
GIB = 1024**3


def hardware_class(gpus: Iterable[tuple[str, int | None]]) -> str:
    """A computer's class for the market: its GPUs' model and memory ("NVIDIA GeForce RTX 4070 ·
    12 GB", "2 × AMD Radeon RX 7900 XTX · 24 GB"), or "CPU only". Made from the telemetry a node sends,
    the same way on both sides, so a seller finds their own class in the figures."""
    found = sorted((name.strip(), round((memory or 0) / GIB)) for name, memory in gpus)
    if not found:
        return CPU_ONLY
    name, memory = found[0]
    count = sum(1 for other in found if other == found[0])
    label = f"{name} · {memory} GB" if memory else name
    return f"{count} × {label}" if count > 1 else label


class _Figures(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ClassFigures(_Figures):
    hardware_class: str
    nodes_active: int  # seen within the window
    nodes_connected: int  # now
    jobs_per_day: float  # fine-tunes and batches completed, and their verification re-runs
    requests_per_day: float  # live inference requests served
    tokens_per_day: int  # tokens trained (as priced) and served
    # The median of what each piece of work paid per hour it took (micro-credits); None: no work yet.
    median_pay_per_work_hour_micro: int | None
    work_hours_per_node_per_day: float  # how busy a node of this class was, on average
    # median pay per hour × hours of work a day: what one more such node would earn at this demand.
    expected_pay_per_day_micro: int | None


class MarketFigures(_Figures):
    window_days: int
    computed_at: float
    queued_jobs: int  # waiting for a node now
    nodes_connected: int
    credit_value: CreditValue
    classes: tuple[ClassFigures, ...]

    def figures_for(self, hardware: str) -> ClassFigures | None:
        return next((figures for figures in self.classes if figures.hardware_class == hardware), None)


@dataclass(frozen=True)
class Forecast:
    """What a computer of `basis.hardware_class` would earn a day, in credits and (where it can be
    converted) in the seller's money before and after electricity."""

    basis: ClassFigures
    own_class: bool  # False: no figures for this computer's class, so the busiest class's are used
    pay_per_day_micro: int
    work_hours_per_day: float


def forecast(market: MarketFigures, hardware: str) -> Forecast | None:
    """The forecast from this class's figures, else (said so) from the class with the most work; None
    when the market has no work to go by."""
    own = market.figures_for(hardware)
    basis = own if own is not None and own.expected_pay_per_day_micro is not None else None
    if basis is None:
        measured = [figures for figures in market.classes if figures.expected_pay_per_day_micro is not None]
        if not measured:
            return None
        basis = max(measured, key=lambda figures: figures.work_hours_per_node_per_day)
    assert basis.expected_pay_per_day_micro is not None
    return Forecast(
        basis=basis,
        own_class=basis is own,
        pay_per_day_micro=basis.expected_pay_per_day_micro,
        work_hours_per_day=basis.work_hours_per_node_per_day,
    )
