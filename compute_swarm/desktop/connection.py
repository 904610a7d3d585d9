"""The node's `/node` websocket session with the coordinator: the handshake (hello, then welcome), the
one writer that sends what the agent posts in order, heartbeats, reading the coordinator's messages and
handing each to the agent, and reconnecting with backoff until the agent closes it. Reports that await
an acknowledgement wait in its `Outbox` and are sent again on every new connection. What a close code
means and where the websocket is are decided in desktop.connection_rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from compute_swarm import protocol
from compute_swarm.desktop.background_tasks import cancel_all, log_task_failure, wait_until, within
from compute_swarm.desktop.backoff import Backoff
from compute_swarm.desktop.connection_rules import (
    connection_end,
    refused_token_message,
    sell_page,
    unsupported_version_message,
    websocket_url,
)
from compute_swarm.desktop.failures import describe_error
from compute_swarm.desktop.node_description import agent_version
from compute_swarm.desktop.node_stopped import NodeStopped, UnsupportedVersion
from compute_swarm.desktop.outbox import Outbox, Reportable
from compute_swarm.protocol import CloseCode, ProtocolViolation

# The agent's parts log under one name, so the seller's log reads as one agent.
logger = logging.getLogger("compute_swarm.desktop.agent")

WELCOME_TIMEOUT_SECONDS = 30.0
SLOW_RECONNECT_AFTER = 5  # backoff failures after a close the coordinator chose: waits up to 32 s


@dataclass(frozen=True)
class ConnectionHost:
    """What the connection borrows from the agent that owns it; all called on the agent's event loop."""

    hello: Callable[[], Awaitable[protocol.Hello]]  # the first message of each connection
    heartbeat: Callable[[], protocol.Heartbeat | None]  # None until the machine has been read
    welcomed: Callable[[protocol.Welcome], None]
    handle: Callable[[protocol.CoordinatorMessage], None]  # raises ProtocolViolation for a wrong one
    ended: Callable[[], None]  # a welcomed connection closed
    reconnecting: Callable[[str], None]  # why the last try ended; the next comes after a delay


class CoordinatorConnection:
    """Runs on the agent's event loop. `stay_connected` returns once `close` has been called."""

    def __init__(self, coordinator: str, host: ConnectionHost, *, rng: random.Random):
        self.outbox = Outbox()
        self._coordinator = coordinator
        self._host = host
        self._rng = rng
        self._closing = False  # the agent itself is closing the websocket
        self._outgoing: asyncio.Queue | None = None  # the current connection's send queue
        self._websocket: ClientConnection | None = None

    def post(self, message: protocol.NodeMessage) -> None:
        """Send in order on the current connection; a report waits in the outbox for its acknowledgement."""
        if isinstance(message, Reportable):
            self.outbox.add(message)
        if self._outgoing is not None:
            self._outgoing.put_nowait(message)

    def heartbeat_at_once(self) -> None:
        """Tell the coordinator now (with the last telemetry) whether this node takes jobs."""
        if self._outgoing is None:
            return
        heartbeat = self._host.heartbeat()
        if heartbeat is not None:
            self.post(heartbeat)

    def settle(self, ack: protocol.Acknowledged) -> bool:
        """Take the acknowledged report out of the outbox; False when no report was waiting for it."""
        report = self.outbox.acknowledge(ack)
        if report is None:
            logger.debug("an acknowledgement of a %s of job %s nobody waited for", ack.about, ack.job_id)
            return False
        if not ack.accepted:
            logger.info(
                "the coordinator did not take the %s of job %s (the job is %s)%s",
                ack.about,
                ack.job_id,
                ack.state,
                f": {ack.message}" if ack.message else "",
            )
        return True

    async def stay_connected(self, token: str) -> None:
        """Connect with this node token and reconnect after every close, until `close`; raises
        NodeStopped when the coordinator will never take this node as it is."""
        backoff = Backoff(rng=self._rng)
        while True:
            problem = await self._connect_once(token, backoff)
            if self._closing:
                return
            delay = backoff.next_delay()
            logger.warning("%s; reconnecting in %.0f s", problem, delay)
            self._host.reconnecting(problem)
            await asyncio.sleep(delay)

    async def close(self, drain_seconds: float, given_up: Callable[[], bool]) -> None:
        """Wait up to `drain_seconds` for the outbox to be acknowledged (unless `given_up()`), then close
        the websocket normally; no reconnect follows."""
        await wait_until(
            lambda: not self.outbox or self._outgoing is None or given_up(),
            time.monotonic() + drain_seconds,
        )
        self._closing = True
        websocket = self._websocket
        if websocket is not None:
            with contextlib.suppress(Exception):
                await within(websocket.close(CloseCode.NORMAL, "the node is stopping"), 10)

    async def _connect_once(self, token: str, backoff: Backoff) -> str:
        """One connection, from handshake to close; returns why it ended."""
        url = websocket_url(self._coordinator)
        try:
            hello = await self._host.hello()
            async with connect(
                url,
                additional_headers={protocol.AUTHORIZATION_HEADER: f"{protocol.TOKEN_SCHEME} {token}"},
                user_agent_header=f"compute-swarm-node/{agent_version()}",
                max_size=protocol.MAX_FRAME_BYTES,
                ping_interval=protocol.PING_INTERVAL_SECONDS,
                ping_timeout=protocol.PING_TIMEOUT_SECONDS,
                open_timeout=WELCOME_TIMEOUT_SECONDS,
                close_timeout=10,
            ) as websocket:
                return await self._session(websocket, hello, backoff)
        except InvalidStatus as error:
            status = error.response.status_code
            if status in (401, 403):
                raise NodeStopped(refused_token_message(self._coordinator, f"HTTP {status}")) from None
            return f"the coordinator at {url} answered the websocket handshake with HTTP {status}"
        except (OSError, TimeoutError, WebSocketException) as error:
            return f"cannot reach the coordinator at {url} ({describe_error(error)})"

    async def _session(self, websocket: ClientConnection, hello: protocol.Hello, backoff: Backoff) -> str:
        outgoing: asyncio.Queue = asyncio.Queue()
        helpers: list[asyncio.Task] = []
        try:
            await websocket.send(hello.model_dump_json())
            welcome = protocol.parse_coordinator_message(
                await within(websocket.recv(), WELCOME_TIMEOUT_SECONDS)
            )
            if not isinstance(welcome, protocol.Welcome):
                raise ProtocolViolation(CloseCode.MALFORMED, f"expected welcome first, got {welcome.type}")
            if welcome.protocol_version != protocol.PROTOCOL_VERSION:
                await websocket.close(CloseCode.NORMAL, "unsupported protocol version")
                raise UnsupportedVersion(
                    unsupported_version_message(
                        self._coordinator,
                        agent_version(),
                        f"it speaks protocol version {welcome.protocol_version}, this app "
                        f"{protocol.PROTOCOL_VERSION}",
                    ),
                    sell_page(self._coordinator),
                )
            backoff.reset()
            if self._closing:  # stop() came during the handshake
                await websocket.close(CloseCode.NORMAL, "the node is stopping")
                return "stopped"
            self._websocket, self._outgoing = websocket, outgoing
            for message in self.outbox.for_new_connection():
                outgoing.put_nowait(message)
            helpers = [
                asyncio.create_task(self._write(websocket, outgoing), name="node-writer"),
                asyncio.create_task(
                    self._heartbeats(welcome.heartbeat_interval_seconds), name="node-heartbeat"
                ),
            ]
            for helper in helpers:
                helper.add_done_callback(log_task_failure)
            logger.info("connected to %s as node %s", self._coordinator, welcome.node_id)
            self._host.welcomed(welcome)
            async for text in websocket:
                try:
                    message = protocol.parse_coordinator_message(text)
                except protocol.UnusableLease as unusable:
                    # The job is refused, not the connection: the coordinator hears why at once.
                    logger.error("refused job %s: %s", unusable.failure.job_id, unusable.failure.message)
                    self.post(unusable.failure)
                    continue
                try:
                    self._host.handle(message)
                except ProtocolViolation:
                    raise
                except Exception:
                    logger.exception("could not handle the coordinator's %s message", message.type)
        except ProtocolViolation as violation:
            logger.error(
                "the coordinator sent a message this agent does not understand: %s", violation.reason
            )
            await websocket.close(violation.code, violation.reason)
            return f"the coordinator sent a malformed message ({violation.reason})"
        except TimeoutError:
            return f"the coordinator did not welcome this node within {WELCOME_TIMEOUT_SECONDS:.0f} s"
        except ConnectionClosed:
            pass
        finally:
            await cancel_all(helpers)
            if self._outgoing is outgoing:
                self._websocket, self._outgoing = None, None
            self._host.ended()
        end = connection_end(
            websocket.close_code, websocket.close_reason or "", self._coordinator, agent_version()
        )
        if end.unsupported_version:
            raise UnsupportedVersion(end.problem, sell_page(self._coordinator))
        if end.fatal:
            raise NodeStopped(end.problem)
        if end.slow_reconnect:
            backoff.failures = max(backoff.failures, SLOW_RECONNECT_AFTER)
        return end.problem

    async def _write(self, websocket: ClientConnection, outgoing: asyncio.Queue) -> None:
        """The connection's only writer, so messages leave in the order they were posted."""
        with contextlib.suppress(ConnectionClosed):
            while True:
                message = await outgoing.get()
                await websocket.send(message.model_dump_json())

    async def _heartbeats(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.heartbeat_at_once()  # with the telemetry the machine watch read last
