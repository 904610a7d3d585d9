"""The seller's economics on the agent's side: each job's energy measured from its start to its end and
written to the work journal with what it cost, and the *only profitable work* guard, which declines a
job whose pay would not cover the electricity it is expected to use.

The expectation is this computer's own: its measured time per unit of priced work for that kind of job
on that model, and the power its jobs drew (measured where the hardware allows, else estimated). Until
it has finished one such job it has no measure, and takes the job: that is how it learns one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from compute_swarm import protocol
from compute_swarm.desktop.electricity import (
    Conversion,
    ElectricitySettings,
    electricity_cost_micro,
    expected_cost_micro,
)
from compute_swarm.desktop.energy import EnergyMeter, energy_meter
from compute_swarm.desktop.work_journal import JobEntry, WorkJournal
from compute_swarm.engine.jobs import InferenceJobSpec
from compute_swarm.money import format_money

logger = logging.getLogger("compute_swarm.desktop.agent")

JOURNAL_FILE = "work-journal.jsonl"


@dataclass(frozen=True)
class Measurement:
    """A job under way: its lease, when it started and the meter's reading then."""

    lease: protocol.Lease
    started_at: float
    start_millijoules: int


def job_kind(lease: protocol.Lease) -> str:
    return "inference" if isinstance(lease.spec, InferenceJobSpec) else "lora"


class Economics:
    """Runs on the agent's event loop (file writes are small appends)."""

    def __init__(
        self,
        data_dir: Path,
        settings: ElectricitySettings,
        *,
        meter_factory: Callable[[protocol.Telemetry, float], EnergyMeter] = energy_meter,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[], None] = lambda: None,
    ):
        self.journal = WorkJournal(data_dir / JOURNAL_FILE)
        self.settings = settings
        self.credit_value: protocol.CreditValue | None = None  # the coordinator's, from its welcome
        self.meter: EnergyMeter | None = None
        self._meter_factory = meter_factory
        self._clock = clock
        self._on_change = on_change

    def use_settings(self, settings: ElectricitySettings) -> None:
        self.settings = settings
        self._on_change()

    def welcomed(self, welcome: protocol.Welcome) -> None:
        self.credit_value = welcome.credit_value
        self._on_change()

    def telemetry(self, telemetry: protocol.Telemetry | None) -> None:
        """Each machine reading: the meter is made at the first, and fed power readings after."""
        if telemetry is None:
            return
        now = self._clock()
        if self.meter is None:
            self.meter = self._meter_factory(telemetry, now)
            logger.info("job energy: %s", self.meter.source)
        else:
            self.meter.sample(telemetry, now)

    def started(self, lease: protocol.Lease) -> Measurement:
        now = self._clock()
        return Measurement(lease, now, self.meter.read(now) if self.meter is not None else 0)

    def ended(self, measurement: Measurement, outcome: str) -> JobEntry:
        now = self._clock()
        lease = measurement.lease
        energy = self.meter.read(now) - measurement.start_millijoules if self.meter is not None else 0
        entry = JobEntry(
            job_id=lease.job_id,
            kind=job_kind(lease),
            base_model=lease.spec.base_model,
            started_at=measurement.started_at,
            ended_at=now,
            outcome=outcome,
            energy_millijoules=max(energy, 0),
            energy_source=self.meter.source if self.meter is not None else "not measured",
            energy_estimated=self.meter.estimated if self.meter is not None else True,
            electricity_micro=electricity_cost_micro(max(energy, 0), self.settings),
            currency=self.settings.currency,
            pay_micro=(lease.pay_micro or 0) if outcome == "completed" else 0,
            work_tokens=lease.work_tokens,
        )
        self.journal.add(entry)
        self._on_change()
        return entry

    def decline_reason(self, lease: protocol.Lease) -> str | None:
        """Why the *only profitable work* guard declines this job, or None to take it."""
        if not self.settings.only_profitable or self.credit_value is None or lease.pay_micro is None:
            return None
        kind, model = job_kind(lease), lease.spec.base_model
        seconds_per_token = self.journal.seconds_per_work_token(kind, model)
        watts = self.journal.working_watts(kind, model) or (self.meter.watts() if self.meter else None)
        if seconds_per_token is None or watts is None or not lease.work_tokens:
            logger.info(
                "job %s: no measure of this computer's speed on %s yet; taking it", lease.job_id, model
            )
            return None
        conversion = Conversion(self.credit_value, self.settings)
        pay = conversion.local_micro(lease.pay_micro)
        if pay is None:
            logger.info("job %s: taken, as profit cannot be judged: %s", lease.job_id, conversion.missing())
            return None
        seconds = lease.work_tokens * seconds_per_token
        cost = expected_cost_micro(watts, seconds, self.settings)
        if pay >= cost:
            return None
        currency = self.settings.currency
        return (
            f"unprofitable here: it pays about {format_money(pay, currency, 4)} and would use about "
            f"{watts:.0f} W for {seconds / 60:.0f} min, {format_money(cost, currency, 4)} of electricity"
        )
