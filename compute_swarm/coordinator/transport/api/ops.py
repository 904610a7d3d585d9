"""For ops (the admin token): the swarm at a glance, and revoking a node."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool

from compute_swarm.coordinator.domain import verification
from compute_swarm.coordinator.domain.lifecycle import LEASED, QUEUED
from compute_swarm.coordinator.domain.verification import VerificationPolicy
from compute_swarm.coordinator.service import accounts, admission
from compute_swarm.coordinator.service.verifier import node_record, store_record
from compute_swarm.coordinator.store import ledger
from compute_swarm.coordinator.store.tables import Job, JobEvent, Node
from compute_swarm.coordinator.transport.api.deps import Operator, Services, ServicesDep
from compute_swarm.coordinator.transport.api.schemas import InviteIn, InviteOut
from compute_swarm.coordinator.transport.hub import Connection
from compute_swarm.protocol import JOB_STATES

router = APIRouter(prefix="/api/ops", tags=["ops"], dependencies=[Operator])

MAX_NODES_LISTED = 1000


class GpuOut(BaseModel):
    name: str
    backend: str
    memory_total_bytes: int | None
    temperature_celsius: float | None
    utilization_percent: float | None


class NodeRowOut(BaseModel):
    id: str
    name: str
    # offline, revoked, quarantined, or while connected: busy (running jobs), paused (not accepting), idle.
    state: str
    gpus: list[GpuOut]
    backends: list[str]
    running_jobs: int
    last_seen_at: float | None
    created_at: float
    jobs_completed: int
    leases: int  # leases it was granted, ever
    # 1 − its estimated error rate (coordinator.domain.verification): a new node 0.9, rising with clean
    # verifications, falling with each mismatch.
    reputation: float
    verifications: int  # of its jobs re-run on a trusted node
    mismatches: int  # since ops last lifted a quarantine
    sampling_rate: float  # the share of its jobs that are re-run now
    trusted: bool  # it may verify others' jobs (ops trust it, or a long clean record)
    trusted_by_ops: bool
    quarantined: bool
    pending_micro: int
    available_micro: int
    agent_version: str | None
    # Its round trip to the coordinator as the coordinator timed it, while connected (None: not yet).
    round_trip_ms: float | None = None
    # Whether the coordinator reached its transfer port from outside: reachable, tunnelled (through
    # the tunnel server), unreachable; None: it shares nothing. Where its peers connect.
    reachability: str | None = None
    peer_address: str | None = None
    # Reports by other nodes (since the coordinator started) that pieces it served failed their hash.
    # Evidence, not a verdict: libtorrent can also ban an honest peer that shared failed pieces with a
    # liar, and a liar can report anyone.
    reported_by_peers: int = 0


class OverviewOut(BaseModel):
    nodes: list[NodeRowOut]
    nodes_connected: int
    queue_depth: int  # jobs waiting for a node
    jobs_by_state: dict[str, int]
    oldest_queued_seconds: float | None


@router.get("/overview")
async def overview(services: ServicesDep) -> OverviewOut:
    # The hub's connections belong to the event loop: copied here, the database read on a thread.
    live = dict(services.hub.connections)
    return await run_in_threadpool(_overview, services, live)


def _overview(services: Services, live: dict[str, Connection]) -> OverviewOut:
    now = time.time()
    policy = services.verifier.policy
    with services.database.reading() as session:
        nodes = session.scalars(
            select(Node)
            .order_by(Node.revoked_at.is_not(None), Node.last_seen_at.desc())
            .limit(MAX_NODES_LISTED)
        ).all()
        node_ids = [node.id for node in nodes]
        leases = dict(
            session.execute(
                select(JobEvent.node_id, func.count())
                .where(JobEvent.state == LEASED, JobEvent.node_id.in_(node_ids))
                .group_by(JobEvent.node_id)
            ).all()
        )
        counts = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        reported = services.swarm_transfer.tracker.reports_against()
        oldest_queued = session.scalar(select(func.min(Job.queued_at)).where(Job.state == QUEUED))
        rows = [
            _node_row(
                node,
                live.get(node.id),
                leases.get(node.id, 0),
                ledger.balance(session, ledger.node_pending_account(node.id)),
                ledger.balance(session, ledger.node_available_account(node.id)),
                policy,
                reported.get(node.id, 0),
            )
            for node in nodes
        ]
    rows.sort(key=lambda row: (row.state in ("offline", "revoked"), row.state == "revoked"))
    return OverviewOut(
        nodes=rows,
        nodes_connected=len(live),
        queue_depth=counts.get(QUEUED, 0),
        jobs_by_state={state: counts.get(state, 0) for state in JOB_STATES},
        oldest_queued_seconds=now - oldest_queued if oldest_queued is not None else None,
    )


def _node_row(
    node: Node,
    connection: Connection | None,
    leases: int,
    pending: int,
    available: int,
    policy: VerificationPolicy,
    reported_by_peers: int = 0,
) -> NodeRowOut:
    description: dict[str, Any] = node.description or {}
    if connection is not None:
        telemetry = connection.telemetry.model_dump(mode="json")
        running = len(connection.leases)
        state = "busy" if running else ("idle" if connection.accepting_jobs else "paused")
    else:
        telemetry = description.get("telemetry") or {}
        running = 0
        state = "offline"
    record = node_record(node, policy)
    if node.approved_at is None:
        state = "awaiting approval"
    if record.quarantined:
        state = "quarantined"
    if node.revoked_at is not None:
        state = "revoked"
    gpus = [
        GpuOut(
            name=gpu.get("name", "?"),
            backend=gpu.get("backend", "?"),
            memory_total_bytes=gpu.get("memory_total_bytes"),
            # A disconnected node's last temperature would mislead: only live readings are shown.
            temperature_celsius=gpu.get("temperature_celsius") if connection is not None else None,
            utilization_percent=gpu.get("utilization_percent") if connection is not None else None,
        )
        for gpu in telemetry.get("gpus", [])
    ]
    return NodeRowOut(
        id=node.id,
        name=node.name,
        state=state,
        gpus=gpus,
        backends=list(telemetry.get("backends", [])),
        running_jobs=running,
        last_seen_at=time.time() if connection is not None else node.last_seen_at,
        created_at=node.created_at,
        jobs_completed=node.jobs_completed,
        leases=leases,
        reputation=1.0 - record.error_rate,
        verifications=node.verifications,
        mismatches=node.mismatches,
        sampling_rate=verification.sampling_rate(record, policy),
        trusted=verification.is_trusted(record, policy),
        trusted_by_ops=node.trusted,
        quarantined=record.quarantined,
        pending_micro=pending,
        available_micro=available,
        agent_version=description.get("agent_version"),
        round_trip_ms=_milliseconds(connection.round_trip_seconds(time.monotonic()))
        if connection is not None
        else None,
        reachability=node.reachability,
        peer_address=node.peer_address,
        reported_by_peers=reported_by_peers,
    )


def _milliseconds(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


class RevokedOut(BaseModel):
    node_id: str
    revoked_at: float


@router.post("/nodes/{node_id}/revoke")
async def revoke_node(node_id: str, services: ServicesDep) -> RevokedOut:
    """Revoke a node's token: it is disconnected now and its jobs go back to the queue."""

    try:
        node = await run_in_threadpool(services.node_accounts.revoke, node_id)
    except accounts.AccountError as error:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from None
    return RevokedOut(node_id=node.id, revoked_at=node.revoked_at)


class TrustIn(BaseModel):
    trusted: bool


class StandingOut(BaseModel):
    node_id: str
    trusted_by_ops: bool
    quarantined: bool
    approved: bool


def change_standing(services: Services, node_id: str, change) -> StandingOut:
    """Apply change(node, policy) to a node's standing; its node hears of it (coordinator.domain.effects)."""
    try:
        node = services.node_accounts.change_standing(node_id, change)
    except accounts.AccountError as error:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from None
    return StandingOut(
        node_id=node.id,
        trusted_by_ops=node.trusted,
        quarantined=node.quarantined_at is not None,
        approved=node.approved_at is not None,
    )


def set_trust(trusted: bool):
    def change(node: Node, policy: VerificationPolicy) -> None:
        node.trusted = trusted

    return change


def lift(node: Node, policy: VerificationPolicy) -> None:
    store_record(node, verification.lifted(node_record(node, policy), policy))


@router.post("/nodes/{node_id}/trust")
def trust_node(node_id: str, body: TrustIn, services: ServicesDep) -> StandingOut:
    """Trust a node to verify others' jobs (ops' own machines), or stop trusting it."""
    return change_standing(services, node_id, set_trust(body.trusted))


@router.post("/nodes/{node_id}/approve")
def approve_node(node_id: str, services: ServicesDep) -> StandingOut:
    """Let in a node that registered where ops approve nodes: it takes work from now on."""
    return change_standing(services, node_id, admission.approve)


@router.post("/invites", status_code=status.HTTP_201_CREATED)
def create_invite(body: InviteIn, services: ServicesDep) -> InviteOut:
    """An invite code (shown once) for nodes to register with, where ops admit nodes by invitation."""
    with services.database.transaction() as session:
        code = admission.create_invite(session, body.uses, body.hours, body.note)
    expires_at = time.time() + body.hours * 3600 if body.hours is not None else None
    return InviteOut(code=code, uses=body.uses, expires_at=expires_at)


@router.post("/nodes/{node_id}/lift-quarantine")
def lift_quarantine(node_id: str, services: ServicesDep) -> StandingOut:
    """Let a quarantined node take jobs again, watched more closely than a new node."""
    return change_standing(services, node_id, lift)
