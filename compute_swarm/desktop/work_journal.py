"""The node's own record of the jobs it ran: when, how long, the energy each used and what that cost,
and what the lease said it pays. One JSON line per job in the node's data directory, so the figures
survive restarts; the coordinator's ledger stays the record of what was paid.

The file is bounded: past MAX_ENTRIES the oldest entries are folded into per-day totals on its first
line, so today's, this week's and all-time electricity stay exact.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

MAX_ENTRIES = 5000
KEEP_ENTRIES = 4000
# The figures a job must have for its speed to count (a job cut short says little about speed).
MINIMUM_MEASURED_SECONDS = 5.0


@dataclass(frozen=True)
class JobEntry:
    job_id: str
    kind: str  # "lora" or "inference"
    base_model: str
    started_at: float
    ended_at: float
    outcome: str  # completed, failed, cancelled (released or declined count as cancelled)
    energy_millijoules: int
    energy_source: str
    energy_estimated: bool
    electricity_micro: int  # in `currency`, at the price when it ran
    currency: str
    pay_micro: int  # what the lease said completing it credits (0 unless completed)
    work_tokens: int | None  # the work the lease priced it by

    @property
    def seconds(self) -> float:
        return max(self.ended_at - self.started_at, 0.0)

    @property
    def watts(self) -> float | None:
        return self.energy_millijoules / 1000 / self.seconds if self.seconds > 0 else None


@dataclass
class Carried:
    """What trimmed entries leave behind: electricity and pay per local day, and how many jobs."""

    electricity_by_day: dict[str, int] = field(default_factory=dict)
    pay_by_day: dict[str, int] = field(default_factory=dict)
    jobs: int = 0


def local_day(moment: float) -> str:
    return datetime.datetime.fromtimestamp(moment).date().isoformat()


class WorkJournal:
    def __init__(self, path: Path):
        self.path = path
        self.carried = Carried()
        self.entries: list[JobEntry] = []
        self._load()

    def add(self, entry: JobEntry) -> None:
        self.entries.append(entry)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as journal:
                journal.write(json.dumps(asdict(entry)) + "\n")
            if len(self.entries) > MAX_ENTRIES:
                self._trim()
        except OSError as error:  # a full disk costs the record, never the job
            logger.warning("could not write the work journal %s: %s", self.path, error)

    def electricity_by_day(self) -> dict[str, int]:
        days = dict(self.carried.electricity_by_day)
        for entry in self.entries:
            day = local_day(entry.ended_at)
            days[day] = days.get(day, 0) + entry.electricity_micro
        return days

    def recent(self, count: int) -> tuple[JobEntry, ...]:
        return tuple(self.entries[-count:])

    def seconds_per_work_token(self, kind: str, base_model: str) -> float | None:
        """This computer's measured time per unit of priced work for this kind of job on this model
        (the median of its completed jobs); None until one completed."""
        ratios = [
            entry.seconds / entry.work_tokens
            for entry in self._completed(kind, base_model)
            if entry.work_tokens and entry.seconds >= MINIMUM_MEASURED_SECONDS
        ]
        return statistics.median(ratios) if ratios else None

    def working_watts(self, kind: str, base_model: str) -> float | None:
        """The power its completed jobs of this kind drew (median), measured or estimated."""
        readings = [
            entry.watts
            for entry in self._completed(kind, base_model)
            if entry.watts is not None and entry.seconds >= MINIMUM_MEASURED_SECONDS
        ]
        return statistics.median(readings) if readings else None

    def _completed(self, kind: str, base_model: str) -> Iterable[JobEntry]:
        return (
            entry
            for entry in self.entries[-200:]
            if entry.outcome == "completed" and entry.kind == kind and entry.base_model == base_model
        )

    def _load(self) -> None:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return
        except OSError as error:
            logger.warning("could not read the work journal %s: %s", self.path, error)
            return
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                if "carried" in record:
                    self.carried = Carried(**record["carried"])
                else:
                    self.entries.append(JobEntry(**record))
            except (ValueError, TypeError) as error:
                # One torn line (the computer lost power mid-write) costs that line only.
                logger.warning("skipped line %d of the work journal %s: %s", number, self.path, error)

    def _trim(self) -> None:
        folded, self.entries = self.entries[:-KEEP_ENTRIES], self.entries[-KEEP_ENTRIES:]
        for entry in folded:
            day = local_day(entry.ended_at)
            self.carried.electricity_by_day[day] = (
                self.carried.electricity_by_day.get(day, 0) + entry.electricity_micro
            )
            self.carried.pay_by_day[day] = self.carried.pay_by_day.get(day, 0) + entry.pay_micro
            self.carried.jobs += 1
        scratch = self.path.with_suffix(".tmp")
        with scratch.open("w", encoding="utf-8") as journal:
            journal.write(json.dumps({"carried": asdict(self.carried)}) + "\n")
            for entry in self.entries:
                journal.write(json.dumps(asdict(entry)) + "\n")
        os.replace(scratch, self.path)
