"""Whether other nodes can reach a node: the coordinator connects to its transfer port from outside
(at `hello`, and whenever its network report changes), through its tunnel when it has one, and tells
the node what it found (protocol.Reachability). A node found unreachable is offered the tunnel server
ops run (`compute-swarm tunnel-server`), when there is one. The verdict goes on the connection (the
tracker names the node at `peer_address`), into the node's record and onto the ops page.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from compute_swarm import protocol
from compute_swarm.coordinator.settings import Settings
from compute_swarm.coordinator.transport.hub.registry import Connection

logger = logging.getLogger(__name__)

CONNECT_SECONDS = 3.0


async def accepts_connections(host: str, port: int, timeout: float = CONNECT_SECONDS) -> bool:
    """Whether a TCP connection to host:port opens within the timeout (then it is closed at once)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError, asyncio.TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 1.0)
    return True


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ReachabilityTests:
    """Runs the tests, one at a time per connection (a newer report cancels an older test)."""

    def __init__(self, settings: Settings, record: Callable[[str, str | None, str | None], None]):
        self.settings = settings
        self.record = record  # (node id, state, address) into the node's row; called in a thread
        self._tests: dict[str, asyncio.Task] = {}

    @property
    def tunnel_server(self) -> protocol.TunnelServer | None:
        return self.settings.tunnel_server_for_nodes

    def start(self, connection: Connection) -> None:
        previous = self._tests.pop(connection.node_id, None)
        if previous is not None:
            previous.cancel()
        task = asyncio.ensure_future(self._test(connection))
        self._tests[connection.node_id] = task

        def finished(done: asyncio.Task) -> None:
            if self._tests.get(connection.node_id) is done:
                del self._tests[connection.node_id]

        task.add_done_callback(finished)

    def forget(self, connection: Connection) -> None:
        task = self._tests.pop(connection.node_id, None)
        if task is not None:
            task.cancel()

    async def _test(self, connection: Connection) -> None:
        network = connection.network
        if network.transfer_port is None:
            connection.reachability, connection.peer_address = None, None
            return
        state: protocol.ReachabilityState = protocol.UNREACHABLE
        address: tuple[str, int] | None = None
        tunnel = self.tunnel_server
        if network.tunnel_port is not None and tunnel is not None:
            host = self.settings.tunnel_public_host_for_peers
            if await accepts_connections(host, network.tunnel_port):
                state, address = protocol.TUNNELLED, (host, network.tunnel_port)
        direct = (connection.remote_host, network.transfer_port)
        if address is None and connection.remote_host and await accepts_connections(*direct):
            state, address = protocol.REACHABLE, direct
        connection.reachability, connection.peer_address = state, address
        text = None if address is None else format_address(*address)
        logger.info("node %s: %s%s", connection.node_id, state, f" at {text}" if text else "")
        await asyncio.to_thread(self.record, connection.node_id, state, text)
        await connection.send(
            protocol.Reachability(
                state=state,
                address=text,
                tunnel=tunnel if state == protocol.UNREACHABLE else None,
            )
        )
