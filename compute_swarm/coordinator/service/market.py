"""The market's figures by hardware class, from what the coordinator itself recorded over the last days:
the work it paid for (charges and verification pay in the ledger), how long each piece took by its own
clock (from the lease that finished a job to its result; from a live request's arrival to its end), the
tokens it priced, and which class each node is by the telemetry of its latest hello. No node's claim of
speed or earnings goes in.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from compute_swarm.coordinator.domain.lifecycle import LEASED, QUEUED
from compute_swarm.coordinator.service.leases import work_tokens
from compute_swarm.coordinator.store.tables import (
    InferenceRequest,
    Job,
    JobEvent,
    LedgerEntry,
    LedgerTransaction,
    Node,
)
from compute_swarm.market import ClassFigures, MarketFigures, hardware_class
from compute_swarm.protocol import CreditValue

WINDOW_DAYS = 7
MINIMUM_WORK_SECONDS = 1.0  # shorter pieces say nothing of an hourly rate


@dataclass
class _ClassTally:
    nodes_active: int = 0
    nodes_connected: int = 0
    jobs: int = 0
    requests: int = 0
    tokens: int = 0
    work_seconds: float = 0.0
    rates_micro_per_hour: list[float] = field(default_factory=list)

    def add(self, paid_micro: int, seconds: float) -> None:
        self.work_seconds += seconds
        if seconds >= MINIMUM_WORK_SECONDS:
            self.rates_micro_per_hour.append(paid_micro * 3600 / seconds)


def node_class(node: Node) -> str:
    description = node.description or {}
    gpus = ((description.get("telemetry") or {}).get("gpus")) or []
    return hardware_class(
        (str(gpu.get("name", "")), gpu.get("memory_total_bytes")) for gpu in gpus if isinstance(gpu, dict)
    )


def market_figures(
    session: Session,
    connected: Iterable[str],
    credit_value: CreditValue,
    *,
    now: float | None = None,
    window_days: int = WINDOW_DAYS,
) -> MarketFigures:
    now = time.time() if now is None else now
    since = now - window_days * 86_400
    connected = set(connected)
    tallies: dict[str, _ClassTally] = defaultdict(_ClassTally)
    classes: dict[str, str] = {}
    for node in session.scalars(
        select(Node).where(Node.revoked_at.is_(None), (Node.last_seen_at >= since) | Node.id.in_(connected))
    ):
        classes[node.id] = node_class(node)
        tally = tallies[classes[node.id]]
        tally.nodes_active += 1
        tally.nodes_connected += node.id in connected

    # What the ledger paid each node for work in the window: (job or request id, node) → micro-credits.
    paid: dict[tuple[str, str], int] = defaultdict(int)
    for job_id, account, amount in session.execute(
        select(LedgerTransaction.job_id, LedgerEntry.account, LedgerEntry.amount_micro)
        .join(LedgerTransaction, LedgerEntry.transaction_id == LedgerTransaction.id)
        .where(
            LedgerTransaction.kind.in_(("charge", "verification")),
            LedgerTransaction.created_at >= since,
            LedgerEntry.account.like("node:%"),
        )
    ):
        if job_id is not None:
            paid[(job_id, account.split(":")[1])] += amount

    jobs = {
        job.id: job
        for job in _in_chunks(
            session, [job_id for job_id, _ in paid], lambda ids: select(Job).where(Job.id.in_(ids))
        )
    }
    lease_started: dict[str, float] = {}
    for job_id, started in _in_chunks(
        session,
        list(jobs),
        lambda ids: (
            select(JobEvent.job_id, func.max(JobEvent.at))
            .where(JobEvent.job_id.in_(ids), JobEvent.state == LEASED)
            .group_by(JobEvent.job_id)
        ),
        scalars=False,
    ):
        lease_started[job_id] = started
    requests = {
        request.id: request
        for request in _in_chunks(
            session,
            [job_id for job_id, _ in paid if job_id not in jobs],
            lambda ids: select(InferenceRequest).where(InferenceRequest.id.in_(ids)),
        )
    }

    for (work_id, node_id), amount in paid.items():
        hardware = classes.get(node_id)
        if hardware is None:
            continue  # revoked since
        tally = tallies[hardware]
        job = jobs.get(work_id)
        if job is not None and job.finished_at is not None and work_id in lease_started:
            tally.jobs += 1
            tally.tokens += work_tokens(job) or 0
            tally.add(amount, job.finished_at - lease_started[work_id])
        elif (request := requests.get(work_id)) is not None and request.finished_at is not None:
            tally.requests += 1
            tally.tokens += request.prompt_tokens + request.completion_tokens
            tally.add(amount, request.finished_at - request.created_at)

    figures = []
    for hardware, tally in sorted(tallies.items()):
        rates = tally.rates_micro_per_hour
        median_rate = int(statistics.median(rates)) if rates else None
        hours_per_node_day = tally.work_seconds / 3600 / max(tally.nodes_active, 1) / window_days
        figures.append(
            ClassFigures(
                hardware_class=hardware,
                nodes_active=tally.nodes_active,
                nodes_connected=tally.nodes_connected,
                jobs_per_day=round(tally.jobs / window_days, 2),
                requests_per_day=round(tally.requests / window_days, 2),
                tokens_per_day=tally.tokens // window_days,
                median_pay_per_work_hour_micro=median_rate,
                work_hours_per_node_per_day=round(hours_per_node_day, 3),
                expected_pay_per_day_micro=int(median_rate * hours_per_node_day)
                if median_rate is not None
                else None,
            )
        )
    queued = session.scalar(select(func.count()).select_from(Job).where(Job.state == QUEUED)) or 0
    return MarketFigures(
        window_days=window_days,
        computed_at=now,
        queued_jobs=queued,
        nodes_connected=len(connected),
        credit_value=credit_value,
        classes=tuple(figures),
    )


def _in_chunks(session: Session, ids: list[str], query, *, scalars: bool = True) -> list:
    found: list = []
    for start in range(0, len(ids), 500):
        statement = query(ids[start : start + 500])
        found += session.scalars(statement).all() if scalars else session.execute(statement).all()
    return found
