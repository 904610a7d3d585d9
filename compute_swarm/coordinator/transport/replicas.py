"""This coordinator among the others that share its PostgreSQL database: several replicas behind one
load balancer serve one swarm, each holding the websockets of the nodes that landed on it.

- What a transaction decided for the hubs (coordinator.domain.effects: wake the dispatcher, stop a
  job on its node, close a revoked node's socket) reaches every replica. The transaction sends it
  with NOTIFY, which PostgreSQL delivers to every listening replica when, and only if, the
  transaction commits; each replica carries out what concerns its own nodes.
- The duties that must run once across the swarm (ending leases that ran out, releasing credit
  whose verification window passed) run on the leader: the replica that holds a session-level
  advisory lock. The lock lives with the connection that took it, so when a replica dies or loses
  the database, PostgreSQL frees it and another replica takes it within a second of noticing.
  The duties are transactions that check each row's state under its lock, so a leader that has not
  yet noticed it lost the lock does no harm by running them once more.
- Messages for one replica, or for all (`send`), go the same way outside transactions: the live
  requests one replica's buyers send to nodes another replica holds, their tokens coming back, and
  each replica's serving capacity once a second (transport.hub.remote). One sending connection keeps
  them in order; a message over PostgreSQL's payload limit travels in parts.
- Each replica also holds an advisory lock of its own instance for as long as it listens: a lock
  another session can take is a replica gone, whose buyers' live requests are refunded. (A replica
  that loses the database for a moment looks gone too: its requests are refunded, and the answers it
  still relays are not charged. A buyer is never charged twice.)

On SQLite the coordinator is alone: it leads, and its effects stay in the process.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import socket
import threading
import zlib
from collections.abc import Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from compute_swarm.coordinator.domain import effects as effect_types
from compute_swarm.coordinator.domain.effects import Effect, StandingChanged, WakeDispatcher
from compute_swarm.coordinator.store.database import Database

logger = logging.getLogger("compute_swarm.coordinator.replicas")

CHANNEL = "swarm_effects"
BROADCAST_CHANNEL = "swarm_replicas"  # messages for every replica
PART_CHARACTERS = 3_000  # of a long message's ASCII JSON: escaped, a part stays under NOTIFY_BYTES
INCOMPLETE_MOST = 256  # long messages being put together at once; the oldest is dropped past this
LEADER_LOCK = 0x5357_4152_4D01  # the advisory lock key the leader holds ("SWARM" and a version)
REPLICA_LOCKS = 0x5357  # the class of the two-key advisory locks each replica holds on its instance
NOTIFY_BYTES = 7_900  # PostgreSQL refuses a NOTIFY payload of 8000 bytes or more
LISTEN_SECONDS = 1.0  # how often the listener looks up from waiting: leadership, stopping
RECONNECT_SECONDS = (0.5, 1, 2, 5)


def default_replica_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Replicas:
    def __init__(self, database: Database, name: str = ""):
        self.database = database
        self.name = name or default_replica_name()
        # Tells this process's notifications from the others' (names are ops' to choose, and may clash).
        self.instance = secrets.token_hex(8)
        self.shared = not database.is_sqlite
        self._leading = not self.shared
        self._carry_out: Callable[[list[Effect]], None] = lambda _effects: None
        self._on_message: Callable[[str, dict], None] = lambda _sender, _message: None
        self._stopped = threading.Event()
        self._listener: threading.Thread | None = None
        self._sender: threading.Thread | None = None
        self._outbox: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._incomplete: dict[str, list[str]] = {}  # a long message's id → the parts received so far
        self.connected = threading.Event()  # the listener is listening (tests wait for it)

    @property
    def leading(self) -> bool:
        """Whether this replica runs the swarm-wide duties now (any thread)."""
        return self._leading

    def alive(self, instance: str) -> bool:
        """Whether the replica of that instance id still runs (any thread; a database round trip)."""
        if instance == self.instance:
            return True
        if not self.shared:
            return False  # on SQLite a coordinator is alone: any other instance is a former run
        lock = {"space": REPLICA_LOCKS, "key": _instance_key(instance)}
        with self.database.engine.connect() as connection:
            taken = connection.execute(text("SELECT pg_try_advisory_lock(:space, :key)"), lock).scalar()
            if taken:
                connection.execute(text("SELECT pg_advisory_unlock(:space, :key)"), lock)
            connection.commit()
        return not taken

    def start(
        self,
        carry_out: Callable[[list[Effect]], None],
        on_message: Callable[[str, dict], None] = lambda _sender, _message: None,
    ) -> None:
        """Send this replica's effects to the others, and carry out theirs with `carry_out`; hand the
        messages other replicas `send` here to `on_message(sender instance, message)`. Both are called
        from the listening thread."""
        if not self.shared:
            return
        self._carry_out, self._on_message = carry_out, on_message
        self.database.before_commit = effects_sender(self.instance)
        self._listener = threading.Thread(target=self._listen_forever, name="replicas", daemon=True)
        self._listener.start()
        self._sender = threading.Thread(target=self._send_forever, name="replicas-send", daemon=True)
        self._sender.start()
        # Until it listens, this replica would miss effects and look gone to the others.
        if not self.connected.wait(15):
            logger.warning("replica %s is not listening to the database yet; it keeps trying", self.name)

    def stop(self) -> None:
        self._stopped.set()
        for thread in (self._listener, self._sender):
            if thread is not None:
                thread.join(timeout=2 * LISTEN_SECONDS + 5)
        self.database.before_commit = None
        self._leading = not self.shared

    # ---- messages between replicas

    def send(self, instance: str | None, message: dict) -> None:
        """Send a JSON message to the replica of that instance id, or to every other one (None). Any
        thread; messages arrive in the order sent, or (the database gone a moment) not at all."""
        channel = BROADCAST_CHANNEL if instance is None else _replica_channel(instance)
        for payload in _message_parts(self.instance, message):
            self._outbox.put((channel, payload))

    def _send_forever(self) -> None:
        self._keep_connected(self._send_waiting, "could not send to the others")

    def _send_waiting(self, connection: Any) -> None:
        while not self._stopped.is_set():
            try:
                waiting = [self._outbox.get(timeout=LISTEN_SECONDS)]
            except queue.Empty:
                continue
            while len(waiting) < 256:
                try:
                    waiting.append(self._outbox.get_nowait())
                except queue.Empty:
                    break
            # One round trip for what waited, in order.
            with connection.pipeline():
                for channel, payload in waiting:
                    connection.execute("SELECT pg_notify(%s, %s)", (channel, payload))

    def _receive_message(self, payload: str) -> None:
        try:
            envelope = json.loads(payload)
            if not isinstance(envelope, dict) or not isinstance(envelope.get("from"), str):
                raise ValueError("no sender")
            if envelope["from"] == self.instance:
                return  # its own broadcast
            message = self._assembled(envelope)
            if message is None:
                return  # more parts to come
            if not isinstance(message, dict):
                raise ValueError("not a JSON object")
        except ValueError as error:
            logger.warning("a message from another replica that cannot be read: %s", error)
            return
        self._on_message(envelope["from"], message)

    def _assembled(self, envelope: dict) -> object | None:
        if "message" in envelope:
            return envelope["message"]
        identifier, part, parts, data = (envelope.get(key) for key in ("id", "part", "parts", "data"))
        if not (isinstance(identifier, str) and isinstance(part, int) and isinstance(parts, int)):
            raise ValueError("neither a message nor a part of one")
        if not isinstance(data, str) or not 0 <= part < parts <= 10_000:
            raise ValueError("a part out of range")
        received = self._incomplete.setdefault(identifier, [])
        if len(received) != part:
            del self._incomplete[identifier]
            raise ValueError(f"part {part} of {identifier} out of order (a part was lost)")
        received.append(data)
        if len(self._incomplete) > INCOMPLETE_MOST:
            self._incomplete.pop(next(iter(self._incomplete)))
        if len(received) < parts:
            return None
        del self._incomplete[identifier]
        return json.loads("".join(received))

    # ---- receiving, and leading

    def _listen_forever(self) -> None:
        self._keep_connected(self._listen, "lost the database's notifications")
        self.connected.clear()
        self._leading = False

    def _listen(self, connection: Any) -> None:
        connection.execute("SELECT pg_advisory_lock(%s, %s)", (REPLICA_LOCKS, _instance_key(self.instance)))
        for channel in (CHANNEL, BROADCAST_CHANNEL, _replica_channel(self.instance)):
            connection.execute(f"LISTEN {channel}")
        self.connected.set()
        # Notifications sent while this replica was not listening are lost: look again at the queue
        # and at the nodes' standing.
        self._carry_out([WakeDispatcher(), StandingChanged()])
        try:
            while not self._stopped.is_set():
                self._lead(connection)
                for notification in connection.notifies(timeout=LISTEN_SECONDS):
                    if notification.channel == CHANNEL:
                        self._receive(notification.payload)
                    else:
                        self._receive_message(notification.payload)
        finally:
            self.connected.clear()
            if self._leading and not self._stopped.is_set():
                logger.warning("replica %s no longer leads: its listening connection ended", self.name)
            self._leading = False

    def _keep_connected(self, work: Callable[[Any], None], trouble: str) -> None:
        """Run `work` on a connection of its own until this replica stops, connecting again (backing
        off) each time the connection is lost."""
        import psycopg

        attempt = 0
        while not self._stopped.is_set():
            try:
                with psycopg.connect(
                    _libpq_url(self.database), autocommit=True, connect_timeout=10
                ) as connection:
                    attempt = 0
                    work(connection)
            except psycopg.Error as error:
                delay = RECONNECT_SECONDS[min(attempt, len(RECONNECT_SECONDS) - 1)]
                attempt += 1
                logger.warning("replica %s %s (%s); again in %s s", self.name, trouble, error, delay)
                self._stopped.wait(delay)

    def _lead(self, connection: Any) -> None:
        if self._leading:
            connection.execute("SELECT 1")  # the lock is as alive as this connection
            return
        (taken,) = connection.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,)).fetchone()
        if taken:
            logger.info("replica %s leads the swarm's background duties", self.name)
            self._leading = True

    def _receive(self, payload: str) -> None:
        try:
            message = json.loads(payload)
            if not isinstance(message, dict) or not isinstance(message.get("instance"), str):
                raise ValueError("not an effects message")
            if message["instance"] == self.instance:
                return  # carried out here already, as it committed
            received = effect_types.decode(message.get("effects"))
        except ValueError as error:
            logger.warning("a notification on %s that is not effects: %s", CHANNEL, error)
            return
        if received:
            self._carry_out(received)


def effects_sender(instance: str) -> Callable[[Session, list[Any]], None]:
    """What sends a transaction's effects to the replicas (`Database.before_commit`): the coordinator's
    own, and an admin command's (a node revoked from the command line is dropped at once)."""

    def send(session: Session, queued: list[Any]) -> None:
        effects = [item for item in queued if isinstance(item, Effect)]
        for payload in payloads(instance, effects):
            session.execute(
                text("SELECT pg_notify(:channel, :payload)"), {"channel": CHANNEL, "payload": payload}
            )

    return send


def payloads(instance: str, effects: list[Effect]) -> list[str]:
    """The effects as NOTIFY payloads, each under PostgreSQL's limit (a payload over it would fail
    the transaction that sends it)."""
    envelope = len(json.dumps({"instance": instance, "effects": []}))
    messages, batch, size = [], [], envelope
    for value in effect_types.encode(effects):
        encoded = json.dumps(value)
        if len(encoded.encode()) > NOTIFY_BYTES - envelope - 1:
            # Only a reason is free text: the node is told a shorter one.
            value["reason"] = value.get("reason", "")[:500]
            encoded = json.dumps(value)
        if batch and size + len(encoded.encode()) + 1 > NOTIFY_BYTES:
            messages.append(json.dumps({"instance": instance, "effects": batch}))
            batch, size = [], envelope
        batch.append(value)
        size += len(encoded.encode()) + 2  # and its separator
    if batch:
        messages.append(json.dumps({"instance": instance, "effects": batch}))
    return messages


def _message_parts(instance: str, message: dict) -> list[str]:
    """A message as NOTIFY payloads: whole when it fits, else in numbered parts of its ASCII JSON."""
    whole = json.dumps({"from": instance, "message": message})
    if len(whole.encode()) <= NOTIFY_BYTES:
        return [whole]
    text = json.dumps(message)  # ASCII: every character is one byte, and escaping at most doubles it
    chunks = [text[start : start + PART_CHARACTERS] for start in range(0, len(text), PART_CHARACTERS)]
    identifier = secrets.token_hex(8)
    return [
        json.dumps({"from": instance, "id": identifier, "part": index, "parts": len(chunks), "data": chunk})
        for index, chunk in enumerate(chunks)
    ]


def _replica_channel(instance: str) -> str:
    return f"swarm_replica_{instance}"  # an instance id is hex: a valid channel name


def _instance_key(instance: str) -> int:
    """An instance id as the second key of a two-key advisory lock (a signed 32-bit integer)."""
    return zlib.crc32(instance.encode()) - 2**31


def _libpq_url(database: Database) -> str:
    """The database URL as libpq takes it (without SQLAlchemy's driver name)."""
    url = database.engine.url.set(drivername="postgresql")
    return url.render_as_string(hide_password=False)
