"""Live inference across replicas: a buyer's request lands on one coordinator, and the best node to
serve it may hold its websocket on another (transport.replicas carries the messages between them).

Each replica tells the others, once a second, what its serving nodes can take (the fields inference
routing reads), and the relay routes over its own nodes and the others' alike. A request for another
replica's node goes to that replica, which hands it to the node and sends back what the node answers;
the buyer's replica keeps everything else (the bounds on what a node may send, the token count, the
charge), as for its own nodes. A replica that stops telling its capacity is gone: the requests on its
nodes fail over before their first token, or end with an error and no charge.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass

from pydantic import ValidationError

from compute_swarm import protocol
from compute_swarm.coordinator.domain.scheduler import InferenceCandidate, NodeSnapshot
from compute_swarm.coordinator.transport.hub.registry import Registry
from compute_swarm.coordinator.transport.relay import Relay
from compute_swarm.coordinator.transport.replicas import Replicas

logger = logging.getLogger("compute_swarm.coordinator.transport.hub")

CAPACITY_SECONDS = 1.0  # how often each replica tells its capacity
CAPACITY_EXPIRES_SECONDS = 3.5  # a replica silent this long is gone (its nodes too)
# The serving nodes a replica tells the others of each second, those with the most free slots first:
# enough to route to, and a bounded message however large the swarm.
CAPACITY_MOST = 200


@dataclass(frozen=True)
class _RemoteCandidate:
    replica: str  # the instance id of the replica holding the node's websocket
    candidate: InferenceCandidate
    received_at: float  # monotonic


@dataclass(frozen=True)
class _Carried:
    """A request another replica's buyer sent to a node here."""

    origin: str  # that replica's instance id
    node_id: str
    adapter_sha256: str | None


class RemoteNodes:
    """The other replicas' serving nodes for this replica's relay, and the requests this replica
    carries between its nodes and the other replicas' buyers. Event loop only, except `receive`."""

    def __init__(self, replicas: Replicas, registry: Registry, local: Callable[[], list[InferenceCandidate]]):
        self.replicas = replicas
        self.registry = registry
        self._local = local  # this replica's candidates, its carried requests counted in
        self.relay: Relay | None = None
        self._remote: dict[str, _RemoteCandidate] = {}  # node id → its latest report
        self.carried: dict[str, _Carried] = {}  # request id → where it came from
        # (node id, adapter sha256) of each carried request: read by the adapter download's check.
        self.adapters_in_use: frozenset[tuple[str, str]] = frozenset()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Future] = set()  # the loop keeps only weak references to tasks

    def attach(self, relay: Relay, loop: asyncio.AbstractEventLoop) -> None:
        self.relay, self._loop = relay, loop

    def carried_by_node(self) -> Counter[str]:
        return Counter(carried.node_id for carried in self.carried.values())

    # ---- routing, on the buyer's replica

    def candidates(self, in_flight: Counter[str]) -> list[InferenceCandidate]:
        """The other replicas' nodes, with this replica's own requests to them counted in (their
        replica's figure may be a second old)."""
        now = time.monotonic()
        return [
            _with_in_flight(remote.candidate, remote.candidate.in_flight + in_flight[node_id])
            for node_id, remote in self._remote.items()
            if now - remote.received_at < CAPACITY_EXPIRES_SECONDS
            and node_id not in self.registry.connections
        ]

    def send(self, node_id: str, message: protocol.CoordinatorMessage) -> bool:
        """Send a request (or its stop) to a node another replica holds; False when none does now."""
        remote = self._remote.get(node_id)
        if remote is None or time.monotonic() - remote.received_at >= CAPACITY_EXPIRES_SECONDS:
            return False
        self.replicas.send(
            remote.replica,
            {"kind": "to_node", "node_id": node_id, "message": message.model_dump_json()},
        )
        return True

    # ---- carrying, on the node's replica

    def forward(
        self,
        node_id: str,
        message: protocol.InferenceDelta | protocol.InferenceDone | protocol.InferenceFailed,
    ) -> bool:
        """Send a node's words to the replica whose buyer asked, if the request came from one."""
        carried = self.carried.get(message.request_id)
        if carried is None or carried.node_id != node_id:
            return False
        if not isinstance(message, protocol.InferenceDelta):
            self._forget(message.request_id)
        self.replicas.send(
            carried.origin,
            {"kind": "from_node", "node_id": node_id, "message": message.model_dump_json()},
        )
        return True

    def node_left(self, node_id: str) -> None:
        """A node here disconnected: the replicas whose requests it served hear it."""
        for request_id, carried in list(self.carried.items()):
            if carried.node_id == node_id:
                self._forget(request_id)
                self.replicas.send(carried.origin, {"kind": "node_left", "node_id": node_id})

    # ---- messages from the other replicas

    def receive(self, sender: str, message: dict) -> None:
        """From the replicas' listening thread: handled on the event loop."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._handle, sender, message)

    def _handle(self, sender: str, message: dict) -> None:
        try:
            kind = message.get("kind")
            if kind == "capacity":
                self._capacity(sender, message.get("nodes"))
            elif kind == "to_node":
                request = protocol.parse_coordinator_message(str(message.get("message")))
                task = asyncio.ensure_future(self._to_node(sender, str(message.get("node_id")), request))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif kind == "from_node":
                words = protocol.parse_node_message(str(message.get("message")))
                node_id = str(message.get("node_id"))
                remote = self._remote.get(node_id)
                # Only the replica holding the node speaks for it, and only of requests.
                if (
                    self.relay is not None
                    and remote is not None
                    and remote.replica == sender
                    and isinstance(
                        words, protocol.InferenceDelta | protocol.InferenceDone | protocol.InferenceFailed
                    )
                ):
                    self.relay.on_message(node_id, words)
            elif kind == "node_left":
                if self.relay is not None:
                    self.relay.node_left(str(message.get("node_id")))
            else:
                raise ValueError(f"unknown kind {kind!r}")
        except (protocol.ProtocolViolation, ValidationError, ValueError, TypeError, KeyError) as error:
            logger.warning("replica %s sent a message this one cannot use: %s", sender, str(error)[:300])

    async def _to_node(self, origin: str, node_id: str, message: protocol.CoordinatorMessage) -> None:
        connection = self.registry.connections.get(node_id)
        if isinstance(message, protocol.InferenceStop):
            self._forget(message.request_id)
            if connection is not None:
                await connection.send(message)
            return
        if not isinstance(message, protocol.InferenceRequest):
            raise ValueError(f"a {message.type} is not for another replica to send")
        if connection is None or node_id not in self.registry.serving:
            unavailable = protocol.InferenceFailed(
                request_id=message.request_id, kind="unavailable", message="the node left its coordinator"
            )
            self.replicas.send(
                origin,
                {"kind": "from_node", "node_id": node_id, "message": unavailable.model_dump_json()},
            )
            return
        self.carried[message.request_id] = _Carried(origin, node_id, message.adapter_sha256)
        self._note_adapters()
        if not await connection.send(message):
            self.node_left(node_id)

    def _capacity(self, sender: str, nodes: object) -> None:
        if not isinstance(nodes, list):
            raise ValueError("capacity without a list of nodes")
        now = time.monotonic()
        told = {}
        for value in nodes[:CAPACITY_MOST]:
            candidate = _candidate(value)
            told[candidate.snapshot.node_id] = _RemoteCandidate(sender, candidate, now)
        gone = [
            node_id
            for node_id, remote in self._remote.items()
            if remote.replica == sender and node_id not in told
        ]
        for node_id in gone:
            del self._remote[node_id]
            if self.relay is not None:
                self.relay.node_left(node_id)  # its requests from here fail over, or end uncharged
        self._remote.update(told)
        if told and self.relay is not None:
            self.relay.capacity_changed()  # requests waiting for a node may find one there

    # ---- telling the others

    async def tell_capacity_forever(self) -> None:
        while True:
            try:
                self._expire()
                local = sorted(self._local(), key=lambda candidate: candidate.in_flight - candidate.slots)
                nodes = [_encoded(candidate) for candidate in local[:CAPACITY_MOST]]
                self.replicas.send(None, {"kind": "capacity", "nodes": nodes})
            except Exception:
                logger.exception("could not tell the other replicas this one's capacity")
            await asyncio.sleep(CAPACITY_SECONDS)

    def _expire(self) -> None:
        """A replica that stopped telling its capacity is gone, and its nodes with it."""
        now = time.monotonic()
        for node_id, remote in list(self._remote.items()):
            if now - remote.received_at >= CAPACITY_EXPIRES_SECONDS:
                del self._remote[node_id]
                if self.relay is not None:
                    self.relay.node_left(node_id)

    def _forget(self, request_id: str) -> None:
        if self.carried.pop(request_id, None) is not None:
            self._note_adapters()

    def _note_adapters(self) -> None:
        self.adapters_in_use = frozenset(
            (carried.node_id, carried.adapter_sha256)
            for carried in self.carried.values()
            if carried.adapter_sha256 is not None
        )


def _with_in_flight(candidate: InferenceCandidate, in_flight: int) -> InferenceCandidate:
    return InferenceCandidate(
        snapshot=candidate.snapshot,
        slots=candidate.slots,
        in_flight=in_flight,
        loaded_models=candidate.loaded_models,
        crashed_models=candidate.crashed_models,
        round_trip_seconds=candidate.round_trip_seconds,
    )


def _encoded(candidate: InferenceCandidate) -> dict:
    snapshot = asdict(candidate.snapshot)
    snapshot["backends"], snapshot["models"] = list(snapshot["backends"]), sorted(snapshot["models"])
    return {
        "snapshot": snapshot,
        "slots": candidate.slots,
        "in_flight": candidate.in_flight,
        "loaded_models": sorted(candidate.loaded_models),
        "crashed_models": dict(candidate.crashed_models),
        "round_trip_seconds": candidate.round_trip_seconds,
    }


def _candidate(value: object) -> InferenceCandidate:
    """A candidate another replica encoded; ValueError or TypeError for anything else."""
    if not isinstance(value, dict) or not isinstance(value.get("snapshot"), dict):
        raise ValueError("not a serving node")
    snapshot = dict(value["snapshot"])
    snapshot["backends"], snapshot["models"] = tuple(snapshot["backends"]), frozenset(snapshot["models"])
    round_trip = value.get("round_trip_seconds")
    return InferenceCandidate(
        snapshot=NodeSnapshot(**snapshot),
        slots=int(value["slots"]),
        in_flight=int(value["in_flight"]),
        loaded_models=frozenset(str(key) for key in value["loaded_models"]),
        crashed_models={str(key): str(report) for key, report in dict(value["crashed_models"]).items()},
        round_trip_seconds=None if round_trip is None else float(round_trip),
    )
