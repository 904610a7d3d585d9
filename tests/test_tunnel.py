"""Reachability and the tunnel on loopback: the coordinator connects to a node's transfer port from
outside and says what it found; an unreachable node is offered the tunnel server; frpc, under the
node's supervision, opens a port there (token-authenticated, TLS), comes back when it dies, and never
opens with a wrong token. (tests/test_nat.py does the same across a real NAT, in network namespaces.)"""

from __future__ import annotations

import os
import random
import secrets
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from compute_swarm import protocol
from compute_swarm.desktop.tunnel import FrpTunnel
from compute_swarm.frp import FrpNotFound, find_program
from tests.coordinator.test_node_socket import TELEMETRY, ScriptedNode
from tests.swarm_processes import Coordinator, SwarmProcess, free_port, wait_for

# The scripted nodes keep their sockets open across calls (as in tests/coordinator/test_node_socket.py).
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager")
TOKEN = secrets.token_urlsafe(32)


def frpc_or_skip(directory: Path) -> Path:
    try:
        return find_program("frpc", directory)
    except FrpNotFound as error:
        pytest.skip(f"no frpc here: {error}")


@pytest.fixture(scope="module")
def tunnel_server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tunnel-server")
    try:
        find_program("frps", directory / "bin")
    except FrpNotFound as error:
        pytest.skip(f"no frps here: {error}")
    port = free_port()
    first = random.randrange(30000, 39000, 100)  # the ports frps hands out (any taken one is skipped)
    server = SwarmProcess(
        ["tunnel-server", "--host", "127.0.0.1", "--port", str(port), "--proxy-host", "127.0.0.1",
         "--ports", f"{first}-{first + 20}", "--data-dir", str(directory)],
        directory / "frps.log",
        {"SWARM_TUNNEL_TOKEN": TOKEN},
    ).start()  # fmt: skip
    wait_for(lambda: _accepts(port), timeout=20, message="frps to listen")
    yield port
    server.stop()


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory, tunnel_server):
    server = Coordinator(
        tmp_path_factory.mktemp("coordinator"),
        environment={"SWARM_TUNNEL_SERVER": f"127.0.0.1:{tunnel_server}", "SWARM_TUNNEL_TOKEN": TOKEN},
    ).start()
    yield server
    server.stop()


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


class EchoServer:
    """What a node's transfer port stands for: a TCP server that answers every line it gets."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with connection:
                data = connection.recv(1024)
                connection.sendall(b"echo:" + data)

    def close(self) -> None:
        self.listener.close()


def through(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(b"hello")
        return connection.recv(1024)


def heartbeat(node: ScriptedNode, network: dict) -> None:
    node.send({"type": "heartbeat", "telemetry": TELEMETRY, "network": network})


def test_a_reachable_node_is_named_at_its_address_and_an_unreachable_one_tunnels(coordinator, tmp_path):
    listening = EchoServer()
    reachable = ScriptedNode(coordinator, "reachable")
    reachable.connect(network={"transfer_port": listening.port})
    verdict = reachable.receive_type("reachability")
    assert verdict == {
        "type": "reachability",
        "state": "reachable",
        "address": f"127.0.0.1:{listening.port}",
        "tunnel": None,
    }
    reachable.disconnect()

    closed_port = free_port()  # nothing listens there: as behind a NAT
    hidden = ScriptedNode(coordinator, "hidden")
    hidden.connect(network={"transfer_port": closed_port})
    verdict = hidden.receive_type("reachability")
    assert verdict["state"] == "unreachable" and verdict["address"] is None
    tunnel_server = verdict["tunnel"]
    assert tunnel_server["token"] == TOKEN and tunnel_server["host"] == "127.0.0.1"

    # The node opens the tunnel it was offered, to its transfer port, and says the port it got.
    changes: list[int | None] = []
    tunnel = FrpTunnel(
        frpc_or_skip(tmp_path),
        protocol.TunnelServer(**tunnel_server),
        listening.port,
        name="transfer-test",
        on_change=changes.append,
    ).start()
    try:
        remote = tunnel.wait_until_up(20)
        assert remote is not None and through(remote) == b"echo:hello"
        heartbeat(hidden, {"transfer_port": closed_port, "tunnel_port": remote})
        verdict = hidden.receive_type("reachability")
        assert (verdict["state"], verdict["address"]) == ("tunnelled", f"127.0.0.1:{remote}")

        # frpc dies: the supervisor starts it again, and the tunnel comes back.
        process = tunnel._process
        assert process is not None
        os.kill(process.pid, signal.SIGKILL)
        wait_for(
            lambda: tunnel.restarts >= 1 and tunnel.remote_port is not None,
            timeout=30,
            message="the tunnel to come back",
        )
        assert through(tunnel.remote_port) == b"echo:hello"
        assert None in changes  # it said the tunnel went down before it came back
    finally:
        tunnel.stop()
        hidden.disconnect()
        listening.close()


def test_a_tunnel_with_the_wrong_token_never_opens(tunnel_server, tmp_path):
    listening = EchoServer()
    tunnel = FrpTunnel(
        frpc_or_skip(tmp_path),
        protocol.TunnelServer(host="127.0.0.1", port=tunnel_server, token="not-the-token-" + "x" * 20),
        listening.port,
        name="transfer-intruder",
        on_change=lambda port: None,
    ).start()
    try:
        time.sleep(4)
        assert tunnel.remote_port is None
    finally:
        tunnel.stop()
        listening.close()


def test_the_tunnel_server_refuses_a_short_token_and_bad_ports():
    from compute_swarm.coordinator.service.tunnel_server import configuration

    good = configuration("0.0.0.0", 7000, "0.0.0.0", "20000-20999", TOKEN)
    assert "transport.tls.force = true" in good and "start = 20000, end = 20999" in good
    assert f'auth.token = "{TOKEN}"' in good
    for ports, said in (("20000", "FIRST-LAST"), ("80-90", "between 1024"), ("30000-20000", "first to last")):
        with pytest.raises(ValueError, match=said):
            configuration("0.0.0.0", 7000, "0.0.0.0", ports, TOKEN)
    with pytest.raises(ValueError, match="at least 24"):
        configuration("0.0.0.0", 7000, "0.0.0.0", "20000-20999", "short")
