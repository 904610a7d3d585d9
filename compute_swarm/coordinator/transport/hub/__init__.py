"""The hub: the nodes' websockets and the loops that feed them. It holds the registry of connected nodes
(registry), the dispatcher (queued jobs → leases), the lease sweeper (renewals and expiries) and the
inference relay, and it carries out the effects the services commit (coordinator.domain.effects).

Everything here runs on the server's event loop; database work goes to threads. The one thread-safe
entry point is `carry_out`: the database hands it each committed transaction's effects, from whichever
thread committed.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable

from compute_swarm import protocol
from compute_swarm.coordinator.domain.effects import (
    Effect,
    NodeConnected,
    NodeRevoked,
    StandingChanged,
    StopOnNode,
    WakeDispatcher,
)
from compute_swarm.coordinator.domain.scheduler import InferenceCandidate
from compute_swarm.coordinator.service.inference import InferenceService
from compute_swarm.coordinator.service.leases import Leases
from compute_swarm.coordinator.service.node_accounts import NodeAccounts
from compute_swarm.coordinator.service.reports import Reports
from compute_swarm.coordinator.settings import Settings
from compute_swarm.coordinator.transport.hub.dispatcher import Dispatcher
from compute_swarm.coordinator.transport.hub.reachability import ReachabilityTests
from compute_swarm.coordinator.transport.hub.registry import ACTIVE, Connection, Registry, has_free_slot
from compute_swarm.coordinator.transport.hub.remote import RemoteNodes
from compute_swarm.coordinator.transport.hub.sweeper import LeaseSweeper
from compute_swarm.coordinator.transport.metrics import Metrics
from compute_swarm.coordinator.transport.relay import Relay
from compute_swarm.coordinator.transport.replicas import Replicas
from compute_swarm.protocol import CloseCode

logger = logging.getLogger("compute_swarm.coordinator.transport.hub")

__all__ = ["Connection", "Hub"]


class Hub:
    def __init__(
        self,
        leases: Leases,
        reports: Reports,
        accounts: NodeAccounts,
        settings: Settings,
        metrics: Metrics,
        inference: InferenceService,
        replicas: Replicas,
    ):
        self.leases = leases
        self.reports = reports
        self.accounts = accounts
        self.settings = settings
        self.metrics = metrics
        self.inference = inference
        self.replicas = replicas
        self.dispatcher = Dispatcher(
            Registry(metrics, slot_freed=lambda: self.dispatcher.wake()), leases, accounts, settings, metrics
        )
        self.registry = self.dispatcher.registry
        self.sweeper = LeaseSweeper(self.registry, leases, accounts, inference, settings, replicas)
        self.reachability = ReachabilityTests(
            settings,
            lambda node_id, state, address: self.accounts.record_reachability(node_id, state, address),
        )
        self.relay: Relay | None = None  # made on the event loop, in start()
        # Nodes on the other replicas sharing this one's PostgreSQL database, for live inference.
        self.remote = (
            RemoteNodes(replicas, self.registry, self._local_candidates)
            if replicas is not None and replicas.shared
            else None
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Future] = set()  # effects under way (kept from the collector)

    @property
    def connections(self) -> dict[str, Connection]:
        return self.registry.connections

    # ---- life

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.relay = Relay(self.inference, self.settings, self._inference_candidates, self._send_to)
        # Listening to the other replicas (and holding its own liveness lock) before anything else.
        if self.remote is not None:
            self.remote.attach(self.relay, self._loop)
            await asyncio.to_thread(self.replicas.start, self.carry_out, self.remote.receive)
        else:
            await asyncio.to_thread(self.replicas.start, self.carry_out)
        refunded = await asyncio.to_thread(self.inference.fail_orphaned, self.replicas.alive)
        if refunded:
            logger.warning("refunded %d inference requests cut off by a coordinator's stop", refunded)
        recovered = await asyncio.to_thread(self.leases.recover_after_restart)
        if recovered:
            logger.warning(
                "%d jobs were leased when the coordinator stopped; waiting for their nodes", recovered
            )
        self._tasks = [
            asyncio.create_task(self.dispatcher.run_forever(), name="dispatch"),
            asyncio.create_task(self.sweeper.run_forever(), name="sweep"),
        ]
        if self.remote is not None:
            self._tasks.append(asyncio.create_task(self.remote.tell_capacity_forever(), name="capacity"))
        if self.inference.tokens is not None:
            self._tasks.append(
                asyncio.create_task(
                    asyncio.to_thread(self.inference.tokens.preload, self.inference.catalogue.names()),
                    name="tokenizers",
                )
            )
        self.dispatcher.wake()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.to_thread(self.replicas.stop)
        for connection in list(self.connections.values()):
            await connection.close_quietly(CloseCode.GOING_AWAY, "the coordinator is shutting down")

    # ---- the thread-safe entry point

    def carry_out(self, effects: list[Effect]) -> None:
        """Do what committed transactions decided (any thread; see coordinator.domain.effects)."""
        if self._loop is not None and effects:
            self._loop.call_soon_threadsafe(self._carry_out, effects)

    def _carry_out(self, effects: list[Effect]) -> None:
        stops = [effect for effect in effects if isinstance(effect, StopOnNode)]
        if stops:
            self._spawn(self.registry.stop_leases(stops))
        for effect in effects:
            if isinstance(effect, StandingChanged):
                self.dispatcher.standing_stale = True
            elif isinstance(effect, NodeRevoked) and effect.node_id in self.connections:
                connection = self.connections[effect.node_id]
                self._spawn(connection.close_quietly(CloseCode.UNAUTHORIZED, "this node's token was revoked"))
            elif isinstance(effect, NodeConnected):
                connection = self.connections.get(effect.node_id)
                if (
                    connection is not None
                    and connection.token != effect.connection
                    and connection.greeted_at < effect.greeted_at
                ):
                    # It connected again (through another replica): this socket is one it gave up on.
                    self.registry.remove(connection)
                    self._spawn(connection.close_quietly(CloseCode.REPLACED, "the node connected again"))
        if any(isinstance(effect, WakeDispatcher) for effect in effects):
            self.dispatcher.job_queued()
        elif any(isinstance(effect, StandingChanged) for effect in effects):
            self.dispatcher.wake()

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- connections

    async def connect(self, connection: Connection) -> None:
        """Register a greeted node and welcome it; adopt the jobs it says it still runs, stop the others."""
        previous = self.connections.get(connection.node_id)
        if previous is not None:
            self.registry.remove(previous)
            await previous.close_quietly(CloseCode.REPLACED, "the node connected again")
        connection.greeted_at = time.time()
        greeting = await self.accounts.greet(
            connection.node_id,
            connection.hello,
            self.leases,
            NodeConnected(connection.node_id, connection.token, connection.greeted_at),
        )
        connection.leases = {
            reference.lease_id: reference.job_id
            for reference in connection.hello.running
            if reference.lease_id in greeting.kept
        }
        connection.trusted = greeting.trusted
        connection.standing = greeting.barred or ACTIVE
        connection.crashed_models = _crash_reports(connection.hello.crashed_models)
        await connection.send(
            protocol.Welcome(
                protocol_version=protocol.PROTOCOL_VERSION,
                node_id=connection.node_id,
                heartbeat_interval_seconds=protocol.HEARTBEAT_INTERVAL_SECONDS,
                lease_seconds=self.settings.lease_seconds,
                earnings=greeting.earnings,
                standing=connection.standing,
                minimum_agent_version=self.settings.minimum_agent_version or None,
                latest_agent_version=self.settings.offered_agent_version,
                credit_value=self.settings.credit_value_for_nodes,
            )
        )
        # Registered only once welcomed: while the greeting committed (a thread, so the loop ran on), a
        # registered connection could be handed a lease or a chat request before its welcome, which
        # the node refuses as out of order (seen once in a full run under load).
        self.registry.add(connection)
        await self.registry.stop_leases(greeting.revoked)
        self.dispatcher.wake()
        await self._time_round_trip(connection)  # known before its first chat request, not 30 s later
        self.reachability.start(connection)

    async def disconnect(self, connection: Connection, reason: str) -> None:
        if not self.registry.remove(connection):
            return  # replaced by a newer connection, which now owns the node's jobs
        self.reachability.forget(connection)
        if self.relay is not None:
            self.relay.node_left(connection.node_id)
        if self.remote is not None:
            self.remote.node_left(connection.node_id)
        # Its leases stay until they expire (the sweeper stops renewing them now): a node back within
        # the lease period, after a network blip, claims them in its hello and loses no work.
        if connection.leases:
            logger.info(
                "node %s left holding %d leases: %s", connection.node_id, len(connection.leases), reason
            )

    async def handle(self, connection: Connection, message: protocol.NodeMessage) -> None:
        connection.last_message_at = time.monotonic()
        if isinstance(message, protocol.Heartbeat):
            was_free = has_free_slot(connection)
            connection.telemetry, connection.accepting_jobs = message.telemetry, message.accepting_jobs
            ports_changed = (message.network.transfer_port, message.network.tunnel_port) != (
                connection.network.transfer_port,
                connection.network.tunnel_port,
            )
            connection.network = message.network
            connection.loaded_models = frozenset(message.loaded_models)
            connection.crashed_models = _crash_reports(message.crashed_models)
            connection.resting = False
            now = time.monotonic()
            connection.stopping = {
                lease: until for lease, until in connection.stopping.items() if until > now
            }
            self.registry.refresh_snapshot(connection)
            if has_free_slot(connection) and not was_free:
                self.dispatcher.wake()
            if self.relay is not None:
                self.relay.capacity_changed()
            if connection.ping_due(now):
                await self._time_round_trip(connection)
            if ports_changed:
                self.reachability.start(connection)  # tested again
        elif isinstance(message, protocol.Pong):
            if not connection.timed_pong(message.nonce, time.monotonic()):
                logger.debug("node %s: a pong that answers no ping waiting", connection.node_id)
        elif isinstance(message, protocol.InferenceDelta | protocol.InferenceDone | protocol.InferenceFailed):
            if self.remote is not None and self.remote.forward(connection.node_id, message):
                return  # another replica's buyer asked: the bounds and the charge are that replica's
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
            self.registry.end_lease(connection, message.lease_id)
            self.registry.refresh_snapshot(connection)
            await connection.send(acknowledgement)
            if acknowledgement.accepted and isinstance(message, protocol.JobResult):
                await connection.send(await asyncio.to_thread(self.accounts.earnings, connection.node_id))

    async def _time_round_trip(self, connection: Connection) -> None:
        connection.ping_nonce, connection.pinged_at = secrets.token_urlsafe(12), time.monotonic()
        await connection.send(protocol.Ping(nonce=connection.ping_nonce))

    # ---- inference

    def _inference_candidates(self) -> list[InferenceCandidate]:
        """The nodes the relay may route a request to: this replica's, and the other replicas'."""
        local = self._local_candidates()
        if self.remote is None:
            return local
        assert self.relay is not None
        return local + self.remote.candidates(self.relay.in_flight_by_node())

    def _local_candidates(self) -> list[InferenceCandidate]:
        assert self.relay is not None
        in_flight = self.relay.in_flight_by_node()
        if self.remote is not None:
            in_flight += self.remote.carried_by_node()  # other replicas' requests on nodes here
        now = time.monotonic()
        return [
            InferenceCandidate(
                snapshot=connection.snapshot,
                slots=connection.hello.inference_slots,
                in_flight=in_flight[node_id],
                loaded_models=connection.loaded_models,
                crashed_models=connection.crashed_models,
                round_trip_seconds=connection.round_trip_seconds(now),
            )
            for node_id, connection in self.registry.serving.items()
            if connection.snapshot is not None
        ]

    def peer_address(self, node_id: str) -> tuple[str, int] | None:
        """Where a connected node's peers reach it, as its reachability test found (any thread)."""
        connection = self.connections.get(node_id)
        return None if connection is None else connection.peer_address

    def serves_adapter(self, node_id: str, sha256: str) -> bool:
        """Whether the node serves a request now that needs this adapter (any thread: the HTTP download
        handler asks from a worker thread; the relay keeps the answer in an immutable set)."""
        relay, remote = self.relay, self.remote
        return (relay is not None and (node_id, sha256) in relay.adapters_in_use) or (
            remote is not None and (node_id, sha256) in remote.adapters_in_use
        )

    async def _send_to(self, node_id: str, message: protocol.CoordinatorMessage) -> bool:
        connection = self.connections.get(node_id)
        if connection is not None:
            return await connection.send(message)
        return self.remote is not None and self.remote.send(node_id, message)


def _crash_reports(crashed: tuple[protocol.CrashedModel, ...]) -> dict[str, str]:
    return {crash.model: crash.message for crash in crashed}
