"""The connected nodes, and the loops that feed them: dispatch (queued jobs → leases) and the lease
sweeper (renewals and expiries).

Everything here runs on the server's event loop; database work goes to threads. The services tell
the hub what to do through the effects their transactions commit (coordinator.effects): the database
hands them to `carry_out`, the one thread-safe entry point, from whichever thread committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from compute_swarm import protocol
from compute_swarm.coordinator.effects import Effect, NodeRevoked, StandingChanged, StopOnNode, WakeDispatcher
from compute_swarm.coordinator.inference import InferenceService, Relay
from compute_swarm.coordinator.leases import Grant, Leases
from compute_swarm.coordinator.metrics import Metrics
from compute_swarm.coordinator.node_accounts import NodeAccounts
from compute_swarm.coordinator.reports import Reports
from compute_swarm.coordinator.scheduler import (
    Assignment,
    InferenceCandidate,
    NodeSnapshot,
    QueuedJob,
    node_snapshot,
    plan,
)
from compute_swarm.coordinator.settings import Settings
from compute_swarm.engine.jobs import CATALOGUE
from compute_swarm.protocol import CloseCode

logger = logging.getLogger("compute_swarm.coordinator.hub")
# How long a cancelled job may take to stop on its node (the runner kills it after 60 s) before the
# node's slot counts as free again without word from the node.
STOPPING_GRACE_SECONDS = 90.0
DISPATCH_GATHER_SECONDS = 0.005
LEASE_BATCH = 256
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
    snapshot: NodeSnapshot | None = None
    leases: dict[str, str] = field(default_factory=dict)  # lease id → job id
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


class Hub:
    def __init__(
        self,
        leases: Leases,
        reports: Reports,
        accounts: NodeAccounts,
        settings: Settings,
        metrics: Metrics,
        inference: InferenceService,
    ):
        self.leases = leases
        self.reports = reports
        self.accounts = accounts
        self.settings = settings
        self.metrics = metrics
        self.inference = inference
        self.connections: dict[str, Connection] = {}
        # Connected nodes that serve inference: routing looks at these only.
        self._serving: dict[str, Connection] = {}
        self.relay: Relay | None = None  # made on the event loop, in start()
        # Nodes with a free slot, longest-free first: dispatch offers jobs to the front of this
        # order, which spreads work and keeps a round's cost in proportion to the jobs, not the swarm.
        self._free: dict[str, Connection] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._work_waiting = asyncio.Event()
        # Set when a verdict or ops may have moved a node's standing: the next dispatch reads it
        # first, so a node quarantined a moment ago is not handed the job submitted just after.
        self._standing_stale = False
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Future] = set()  # effects under way (kept from the collector)

    # ---- life

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.relay = Relay(self.inference, self.settings, self._inference_candidates, self._send_to)
        refunded = await asyncio.to_thread(self.inference.recover_after_restart)
        if refunded:
            logger.warning("refunded %d inference requests cut off by the restart", refunded)
        recovered = await asyncio.to_thread(self.leases.recover_after_restart)
        if recovered:
            logger.warning(
                "%d jobs were leased when the coordinator stopped; waiting for their nodes", recovered
            )
        self._tasks = [
            asyncio.create_task(self._dispatch_forever(), name="dispatch"),
            asyncio.create_task(self._sweep_forever(), name="sweep"),
        ]
        if self.inference.tokens is not None:
            self._tasks.append(
                asyncio.create_task(
                    asyncio.to_thread(self.inference.tokens.preload, list(CATALOGUE)), name="tokenizers"
                )
            )
        self._work_waiting.set()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for connection in list(self.connections.values()):
            await connection.close_quietly(CloseCode.GOING_AWAY, "the coordinator is shutting down")

    # ---- the thread-safe entry point

    def carry_out(self, effects: list[Effect]) -> None:
        """Do what committed transactions decided (any thread; see coordinator.effects)."""
        if self._loop is not None and effects:
            self._loop.call_soon_threadsafe(self._carry_out, effects)

    def _carry_out(self, effects: list[Effect]) -> None:
        stops = [effect for effect in effects if isinstance(effect, StopOnNode)]
        if stops:
            self._spawn(self._send_cancels(stops))
        for effect in effects:
            if isinstance(effect, StandingChanged):
                # A verdict or ops moved a node's standing: dispatch reads it first, so a node
                # quarantined a moment ago is not handed the job submitted just after.
                self._standing_stale = True
            elif isinstance(effect, NodeRevoked) and effect.node_id in self.connections:
                connection = self.connections[effect.node_id]
                self._spawn(connection.close_quietly(CloseCode.UNAUTHORIZED, "this node's token was revoked"))
        if any(isinstance(effect, WakeDispatcher | StandingChanged) for effect in effects):
            self._work_waiting.set()

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- connections

    async def connect(self, connection: Connection) -> None:
        """Register a greeted node and welcome it; adopt the jobs it says it still runs, stop the others."""
        previous = self.connections.pop(connection.node_id, None)
        if previous is not None:
            await previous.close_quietly(CloseCode.REPLACED, "the node connected again")
        kept, revoked = await asyncio.to_thread(
            self.leases.adopt, connection.node_id, connection.hello.running
        )
        connection.leases = {
            reference.lease_id: reference.job_id
            for reference in connection.hello.running
            if reference.lease_id in kept
        }
        trusted, barred = await asyncio.to_thread(self.accounts.standing)
        connection.trusted = connection.node_id in trusted
        connection.standing = barred.get(connection.node_id, ACTIVE)
        connection.crashed_models = _crash_reports(connection.hello.crashed_models)
        self.connections[connection.node_id] = connection
        if connection.hello.inference_slots > 0:
            self._serving[connection.node_id] = connection
        self._refresh_snapshot(connection)
        self.metrics.nodes_connected.set(len(self.connections))
        earnings = await asyncio.to_thread(self.accounts.earnings, connection.node_id)
        await connection.send(
            protocol.Welcome(
                protocol_version=protocol.PROTOCOL_VERSION,
                node_id=connection.node_id,
                heartbeat_interval_seconds=protocol.HEARTBEAT_INTERVAL_SECONDS,
                lease_seconds=self.settings.lease_seconds,
                earnings=earnings,
                standing=connection.standing,
            )
        )
        await self._send_cancels(revoked)
        self._work_waiting.set()

    async def disconnect(self, connection: Connection, reason: str) -> None:
        if self.connections.get(connection.node_id) is not connection:
            return  # replaced by a newer connection, which now owns the node's jobs
        del self.connections[connection.node_id]
        self._free.pop(connection.node_id, None)
        self._serving.pop(connection.node_id, None)
        if self.relay is not None:
            self.relay.node_left(connection.node_id)
        self.metrics.nodes_connected.set(len(self.connections))
        # Its leases stay until they expire (the sweeper stops renewing them now): a node back within
        # the lease period, after a network blip, claims them in its hello and loses no work.
        if connection.leases:
            logger.info(
                "node %s left holding %d leases: %s", connection.node_id, len(connection.leases), reason
            )

    async def handle(self, connection: Connection, message: protocol.NodeMessage) -> None:
        connection.last_message_at = time.monotonic()
        if isinstance(message, protocol.Heartbeat):
            was_free = self._has_free_slot(connection)
            connection.telemetry, connection.accepting_jobs = message.telemetry, message.accepting_jobs
            connection.loaded_models = frozenset(message.loaded_models)
            connection.crashed_models = _crash_reports(message.crashed_models)
            connection.resting = False
            now = time.monotonic()
            connection.stopping = {
                lease: until for lease, until in connection.stopping.items() if until > now
            }
            self._refresh_snapshot(connection)
            if self._has_free_slot(connection) and not was_free:
                self._work_waiting.set()
            if self.relay is not None:
                self.relay.capacity_changed()
        elif isinstance(message, protocol.InferenceDelta | protocol.InferenceDone | protocol.InferenceFailed):
            if self.relay is not None:
                crash = self.relay.on_message(connection.node_id, message)
                if crash is not None:
                    logger.warning("node %s: %s", crash.node_id, crash.message)
                    connection.crashed_models = {**connection.crashed_models, crash.model_key: crash.message}
        elif isinstance(message, protocol.JobProgress):
            try:
                stop = await asyncio.to_thread(self.reports.progress, connection.node_id, message)
            except Exception:
                # A progress report is answered by nothing and superseded by the next: one that cannot
                # be handled (a bug) is logged and dropped, and the node keeps its connection and job.
                logger.exception(
                    "node %s: progress of job %s not recorded", connection.node_id, message.job_id
                )
                return
            if stop is not None:
                await connection.send(
                    protocol.Cancel(job_id=message.job_id, lease_id=message.lease_id, reason=stop[:500])
                )
        elif isinstance(message, protocol.CheckpointUploaded):
            await connection.send(
                await asyncio.to_thread(self.reports.checkpoint, connection.node_id, message)
            )
        elif isinstance(message, protocol.JobResult | protocol.JobFailure):
            settle = self.reports.result if isinstance(message, protocol.JobResult) else self.reports.failure
            acknowledgement = await asyncio.to_thread(settle, connection.node_id, message)
            connection.stopping.pop(message.lease_id, None)
            if isinstance(message, protocol.JobFailure) and message.kind == "released":
                connection.resting = True
            self._end_lease(connection, message.lease_id)
            self._refresh_snapshot(connection)
            await connection.send(acknowledgement)
            if acknowledgement.accepted and isinstance(message, protocol.JobResult):
                await connection.send(await asyncio.to_thread(self.accounts.earnings, connection.node_id))

    # ---- inference

    def _inference_candidates(self) -> list[InferenceCandidate]:
        assert self.relay is not None
        in_flight = self.relay.in_flight_by_node()
        return [
            InferenceCandidate(
                snapshot=connection.snapshot,
                slots=connection.hello.inference_slots,
                in_flight=in_flight[node_id],
                loaded_models=connection.loaded_models,
                crashed_models=connection.crashed_models,
            )
            for node_id, connection in self._serving.items()
            if connection.snapshot is not None
        ]

    def serves_adapter(self, node_id: str, sha256: str) -> bool:
        """Whether the node serves a request now that needs this adapter (thread-safe: the HTTP
        download handler asks from a worker thread)."""
        relay = self.relay
        return relay is not None and any(
            request.node_id == node_id and request.model.adapter_sha256 == sha256
            for request in list(relay.pending.values())
        )

    async def _send_to(self, node_id: str, message: protocol.CoordinatorMessage) -> bool:
        connection = self.connections.get(node_id)
        return connection is not None and await connection.send(message)

    def _end_lease(self, connection: Connection, lease_id: str) -> None:
        if connection.leases.pop(lease_id, None) is not None:
            self._refresh_snapshot(connection)
            self._work_waiting.set()

    def _refresh_snapshot(self, connection: Connection) -> None:
        connection.snapshot = node_snapshot(
            connection.node_id,
            connection.telemetry,
            models=connection.hello.models,
            running_jobs=len(connection.leases) + len(connection.stopping),
            accepting_jobs=connection.accepting_jobs and not connection.barred,
        )
        if self.connections.get(connection.node_id) is connection and self._has_free_slot(connection):
            self._free.setdefault(connection.node_id, connection)
        else:
            self._free.pop(connection.node_id, None)

    @staticmethod
    def _has_free_slot(connection: Connection) -> bool:
        snapshot = connection.snapshot
        return (
            not connection.resting
            and snapshot is not None
            and snapshot.accepting_jobs
            and snapshot.running_jobs < snapshot.capacity
        )

    # ---- dispatch

    async def _dispatch_forever(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._work_waiting.wait(), timeout=5.0)
            # Let a burst of submissions gather, so one round (one plan, one commit) serves them all.
            await asyncio.sleep(DISPATCH_GATHER_SECONDS)
            self._work_waiting.clear()
            try:
                await self.dispatch_once()
            except Exception:
                logger.exception("dispatch failed; retrying")
                await asyncio.sleep(1.0)

    async def dispatch_once(self) -> int:
        if self._standing_stale:
            self._standing_stale = False
            await self._refresh_standing()
        if not self._free:
            return 0
        # A few more than there are free nodes, so that jobs no free node can take (a batch with no
        # node serving inference, a job every free node refused) do not hide the ones behind them.
        queued = await asyncio.to_thread(self.leases.queued, min(len(self._free) + 64, 5000))
        if not queued:
            return 0
        free = [connection.snapshot for connection in self._free.values() if connection.snapshot is not None]
        # Re-runs that verify others' jobs go to trusted nodes first, then the swarm's jobs to any node.
        checks = [job for job in queued if job.verification]
        assignments = []
        if checks:
            trusted = [snapshot for snapshot in free if self.connections[snapshot.node_id].trusted]
            assignments += self._plan([job for job in checks if not job.inference], trusted)
            assignments += self._plan(
                [job for job in checks if job.inference],
                self._available(trusted, assignments, serving_only=True),
            )
        assignments += self._plan(
            [job for job in queued if not job.inference and not job.verification],
            self._available(free, assignments),
        )
        batches = [job for job in queued if job.inference and not job.verification]
        if batches:
            assignments += self._plan(batches, self._available(free, assignments, serving_only=True))
        # Leased and sent in batches: the first nodes get their jobs while later batches commit.
        granted = 0
        for start in range(0, len(assignments), LEASE_BATCH):
            batch = assignments[start : start + LEASE_BATCH]
            grants = await asyncio.to_thread(
                self.leases.lease, [(assignment.job_id, assignment.node_id) for assignment in batch]
            )
            await asyncio.gather(*(self._deliver(grant) for grant in grants))
            granted += len(grants)
        return granted

    def _available(
        self, free: list[NodeSnapshot], taken: list[Assignment], *, serving_only: bool = False
    ) -> list[NodeSnapshot]:
        """The free nodes no assignment of this round took (and that serve inference, if asked)."""
        busy = {assignment.node_id for assignment in taken}
        return [
            snapshot
            for snapshot in free
            if snapshot.node_id not in busy and (not serving_only or snapshot.node_id in self._serving)
        ]

    def _plan(self, queued: list[QueuedJob], free: list[NodeSnapshot]) -> list[Assignment]:
        """Plan over a sample of the free nodes first (the longest free, a few per job), then over all
        of them for the jobs the sample could not place (large jobs wanting a particular node)."""
        if not queued or not free:
            return []
        sample = free[: max(256, 4 * len(queued))]
        assignments = plan(queued, sample, allowed_backends=self.settings.allowed_backends)
        if len(assignments) < len(queued) and len(sample) < len(free):
            placed = {assignment.job_id for assignment in assignments}
            busy = {assignment.node_id for assignment in assignments}
            assignments += plan(
                [job for job in queued if job.job_id not in placed],
                [snapshot for snapshot in free if snapshot.node_id not in busy],
                allowed_backends=self.settings.allowed_backends,
            )
        return assignments

    async def _deliver(self, grant: Grant) -> None:
        connection = self.connections.get(grant.node_id)
        if connection is None:
            # It left between planning and leasing.
            await asyncio.to_thread(self.leases.return_lease, grant.message.job_id, grant.message.lease_id)
            return
        connection.leases[grant.message.lease_id] = grant.message.job_id
        self._refresh_snapshot(connection)
        if await connection.send(grant.message):
            self.metrics.leases_granted.inc()
            self.metrics.dispatch_latency.observe(max(0.0, time.time() - grant.queued_at))

    # ---- leases

    async def _sweep_forever(self) -> None:
        last_seen_written = 0.0
        while True:
            await asyncio.sleep(self.settings.sweep_interval_seconds)
            try:
                await self.sweep_once()
                # For ops (`admin nodes`): when each node was last connected, to the half minute.
                if time.monotonic() - last_seen_written > 30:
                    await asyncio.to_thread(self.accounts.mark_seen, list(self.connections))
                    last_seen_written = time.monotonic()
            except Exception:
                logger.exception("lease sweep failed; retrying")

    async def sweep_once(self) -> None:
        # A node that is connected and sending heartbeats keeps its leases (websocket pings close the
        # connection of one that stops answering); a node whose loop hangs misses heartbeats.
        now = time.monotonic()
        alive = [
            lease_id
            for connection in self.connections.values()
            if now - connection.last_message_at < 3 * protocol.HEARTBEAT_INTERVAL_SECONDS
            for lease_id in connection.leases
        ]
        await asyncio.to_thread(self.leases.renew, alive)
        # Ops revoke tokens from another process (`admin revoke-node`): drop those nodes here.
        for node_id in await asyncio.to_thread(self.accounts.revoked_nodes, list(self.connections)):
            connection = self.connections.get(node_id)
            if connection is not None:
                await connection.close_quietly(CloseCode.UNAUTHORIZED, "this node's token was revoked")
        await self._refresh_standing()
        await asyncio.to_thread(self.accounts.release_due_credits)
        # The nodes of leases that ran out are told to stop, and the dispatcher woken (effects).
        await asyncio.to_thread(self.leases.expire_leases)

    async def _refresh_standing(self) -> None:
        """Verification moves nodes in and out of trust and quarantine, and ops approve nodes and
        lift quarantines: follow it, and tell each node whose standing changed at once."""
        trusted, barred = await asyncio.to_thread(self.accounts.standing)
        for node_id, connection in list(self.connections.items()):
            standing = barred.get(node_id, ACTIVE)
            if (node_id in trusted, standing) != (connection.trusted, connection.standing):
                connection.trusted = node_id in trusted
                if standing != connection.standing:
                    connection.standing = standing
                    await connection.send(standing)
                self._refresh_snapshot(connection)
                self._work_waiting.set()

    async def _send_cancels(self, revocations: Iterable[StopOnNode]) -> None:
        for revocation in revocations:
            connection = self.connections.get(revocation.node_id)
            if connection is None:
                continue
            connection.stopping[revocation.lease_id] = time.monotonic() + STOPPING_GRACE_SECONDS
            self._end_lease(connection, revocation.lease_id)
            await connection.send(
                protocol.Cancel(
                    job_id=revocation.job_id, lease_id=revocation.lease_id, reason=revocation.reason
                )
            )


def _crash_reports(crashed: tuple[protocol.CrashedModel, ...]) -> dict[str, str]:
    return {crash.model: crash.message for crash in crashed}
