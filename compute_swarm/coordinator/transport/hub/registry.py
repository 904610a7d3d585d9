"""The connected nodes as the hub sees them: each node's connection, who has a free slot (longest free
first), who serves inference, and each node's standing as it was told. Runs on the event loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from compute_swarm import protocol
from compute_swarm.coordinator.domain.effects import StopOnNode
from compute_swarm.coordinator.domain.scheduler import NodeSnapshot, node_snapshot
from compute_swarm.coordinator.service.node_accounts import NodeAccounts
from compute_swarm.coordinator.transport.metrics import Metrics

# How long a cancelled job may take to stop on its node (the runner kills it after 60 s) before the
# node's slot counts as free again without word from the node.
STOPPING_GRACE_SECONDS = 90.0
ACTIVE = protocol.Standing(state="active")


@dataclass(eq=False)
class Connection:
    """A node's open websocket, as the hub sees it."""

    node_id: str
    send_text: Callable[[str], Awaitable[None]]
    close: Callable[[int, str], Awaitable[None]]
    hello: protocol.Hello
    telemetry: protocol.Telemetry
    accepting_jobs: bool
    # Tells this connection from the node's others, on this replica or another (effects.NodeConnected).
    token: str = field(default_factory=lambda: secrets.token_hex(8))
    greeted_at: float = 0.0  # wall-clock seconds
    snapshot: NodeSnapshot | None = None
    leases: dict[str, str] = field(default_factory=dict)  # lease id → job id
    # Slots set aside for jobs whose lease is being written (Dispatcher.reserve, and a round's plan
    # while it commits): taken, so nothing else is planned onto them meanwhile.
    reserved: int = 0
    # Leases told to stop whose job may still be winding down (saving a checkpoint): each keeps the
    # node's slot until the node reports how it ended, or until its deadline (monotonic seconds).
    stopping: dict[str, float] = field(default_factory=dict)
    # Set when the node handed a job back ("released"): no new lease until its next heartbeat says
    # whether it accepts jobs, so a busy or pausing node is not offered the same job in a loop.
    resting: bool = False
    loaded_models: frozenset[str] = frozenset()  # kept loaded for inference (protocol.model_key)
    # Model keys that crashed its llama.cpp process → its report: from its hello and heartbeats, and
    # from a crash the moment the node reports it (so the request is not routed back there).
    crashed_models: dict[str, str] = field(default_factory=dict)
    # Its standing, refreshed before the next dispatch once a job settled or ops changed it, and
    # each sweep (ops' CLI writes from another process): a trusted node takes re-runs that verify
    # others' jobs; a barred one (quarantined, or waiting for ops' approval) takes no job and serves
    # no request until ops let it. The node is told its standing (in its welcome, then in `standing`
    # messages), so its seller is not left waiting for work that cannot come.
    trusted: bool = False
    standing: protocol.Standing = ACTIVE
    last_message_at: float = field(default_factory=time.monotonic)
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Its round trip, timed by the coordinator (protocol.Ping): a smoothed figure, and the ping waiting
    # for its pong with the moment (monotonic) it was sent.
    measured_round_trip_seconds: float | None = None
    ping_nonce: str | None = None
    pinged_at: float = 0.0
    # Swarm transfer: the address its websocket came from, its latest network report, and whether the
    # coordinator reached its transfer port from outside (hub/reachability.py), at which address.
    remote_host: str = ""
    network: protocol.NetworkReport = field(default_factory=protocol.NetworkReport)
    reachability: protocol.ReachabilityState | None = None
    peer_address: tuple[str, int] | None = None

    def round_trip_seconds(self, now: float) -> float | None:
        """The smoothed round trip, or longer while a ping waits past it: a node that stops answering
        looks as slow as it is."""
        waiting = now - self.pinged_at if self.ping_nonce is not None else 0.0
        if self.measured_round_trip_seconds is None:
            return waiting or None
        return max(self.measured_round_trip_seconds, waiting)

    def timed_pong(self, nonce: str, now: float) -> bool:
        """Take a pong: True when it answers the ping waiting (others are stale, and ignored)."""
        if nonce != self.ping_nonce:
            return False
        sample = now - self.pinged_at
        previous = self.measured_round_trip_seconds
        # Smoothed, so one slow answer (a busy moment) moves the figure but does not define it.
        self.measured_round_trip_seconds = sample if previous is None else 0.7 * previous + 0.3 * sample
        self.ping_nonce = None
        return True

    def ping_due(self, now: float) -> bool:
        return self.ping_nonce is None and now - self.pinged_at >= protocol.PING_INTERVAL_SECONDS

    @property
    def barred(self) -> bool:
        return self.standing.state != "active"

    async def close_quietly(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):  # closed already
            await self.close(code, reason)

    async def send(self, message: protocol.CoordinatorMessage) -> bool:
        try:
            async with self.send_lock:
                await self.send_text(message.model_dump_json())
            return True
        except Exception:  # the socket is closing; its disconnect handling cleans up
            return False


class Registry:
    def __init__(self, metrics: Metrics, slot_freed: Callable[[], None]):
        self.metrics = metrics
        self.slot_freed = slot_freed  # wakes the dispatcher
        self.connections: dict[str, Connection] = {}
        # Connected nodes that serve inference: routing looks at these only.
        self.serving: dict[str, Connection] = {}
        # Nodes with a free slot, longest-free first: dispatch offers jobs to the front of this
        # order, which spreads work and keeps a round's cost in proportion to the jobs, not the swarm.
        self.free: dict[str, Connection] = {}

    def add(self, connection: Connection) -> None:
        self.connections[connection.node_id] = connection
        if connection.hello.inference_slots > 0:
            self.serving[connection.node_id] = connection
        self.refresh_snapshot(connection)
        self.metrics.nodes_connected.set(len(self.connections))

    def remove(self, connection: Connection) -> bool:
        """Forget the connection; False when a newer connection of its node replaced it already."""
        if self.connections.get(connection.node_id) is not connection:
            return False
        del self.connections[connection.node_id]
        self.free.pop(connection.node_id, None)
        self.serving.pop(connection.node_id, None)
        self.metrics.nodes_connected.set(len(self.connections))
        return True

    def end_lease(self, connection: Connection, lease_id: str) -> None:
        if connection.leases.pop(lease_id, None) is not None:
            self.refresh_snapshot(connection)
            self.slot_freed()

    def reserve(self, connection: Connection) -> None:
        connection.reserved += 1
        self.refresh_snapshot(connection)

    def release(self, connection: Connection) -> None:
        connection.reserved -= 1
        self.refresh_snapshot(connection)

    def refresh_snapshot(self, connection: Connection) -> None:
        connection.snapshot = node_snapshot(
            connection.node_id,
            connection.telemetry,
            models=connection.hello.models,
            running_jobs=len(connection.leases) + len(connection.stopping) + connection.reserved,
            accepting_jobs=connection.accepting_jobs and not connection.barred,
            download_bytes_per_second=connection.network.download_bytes_per_second,
        )
        if self.connections.get(connection.node_id) is connection and has_free_slot(connection):
            self.free.setdefault(connection.node_id, connection)
        else:
            self.free.pop(connection.node_id, None)

    async def stop_leases(self, stops: Iterable[StopOnNode]) -> None:
        """Tell each node to stop a lease; its slot stays taken until it says how the job ended."""
        for stop in stops:
            connection = self.connections.get(stop.node_id)
            if connection is None:
                continue
            connection.stopping[stop.lease_id] = time.monotonic() + STOPPING_GRACE_SECONDS
            self.end_lease(connection, stop.lease_id)
            await connection.send(
                protocol.Cancel(job_id=stop.job_id, lease_id=stop.lease_id, reason=stop.reason)
            )

    async def refresh_standing(self, accounts: NodeAccounts) -> None:
        """Verification moves nodes in and out of trust and quarantine, and ops approve nodes and
        lift quarantines: follow it, and tell each node whose standing changed at once."""
        trusted, barred = await asyncio.to_thread(accounts.standing)
        for node_id, connection in list(self.connections.items()):
            standing = barred.get(node_id, ACTIVE)
            if (node_id in trusted, standing) != (connection.trusted, connection.standing):
                connection.trusted = node_id in trusted
                if standing != connection.standing:
                    connection.standing = standing
                    await connection.send(standing)
                self.refresh_snapshot(connection)
                self.slot_freed()


def has_free_slot(connection: Connection) -> bool:
    snapshot = connection.snapshot
    return (
        not connection.resting
        and snapshot is not None
        and snapshot.accepting_jobs
        and snapshot.running_jobs < snapshot.capacity
    )
