"""A tunnel for a node other nodes cannot reach (behind NAT, a firewall): frp's client, frpc, exposes
the node's transfer port on the frp server ops run beside the coordinator (`compute-swarm
tunnel-server`), token-authenticated over TLS. frpc is a separate program (compute_swarm.frp finds
it): this module writes its configuration, starts it, reads the port the server gave from frpc's own admin API, and
restarts it whenever it dies (with backoff), until stopped.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from compute_swarm.frp import toml_string
from compute_swarm.protocol import TunnelServer

logger = logging.getLogger(__name__)

UP_SECONDS = 20.0  # frpc has this long to log in and open the proxy before it is restarted
POLL_SECONDS = 0.25
FIRST_RETRY_SECONDS = 1.0
LONGEST_RETRY_SECONDS = 60.0


class TunnelError(Exception):
    """A tunnel that cannot be set up as asked."""


def _free_local_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class FrpTunnel:
    """frpc under supervision, exposing 127.0.0.1:`local_port` as a TCP port of the frp server.

    `on_change(remote_port)` is called (from the supervisor's thread) when the tunnel comes up with the
    server's port, and with None when it goes down."""

    def __init__(
        self,
        frpc: Path,
        server: TunnelServer,
        local_port: int,
        name: str,
        on_change: Callable[[int | None], None],
    ):
        if not 0 < local_port < 65536:
            raise TunnelError(f"no port to expose ({local_port})")
        self.frpc = frpc
        self.server = server
        self.local_port = local_port
        self.name = name
        self.on_change = on_change
        self.remote_port: int | None = None
        self.restarts = 0
        self._stop = threading.Event()
        self._process: subprocess.Popen | None = None
        self._directory = Path(tempfile.mkdtemp(prefix="compute-swarm-frpc-"))
        self._thread = threading.Thread(target=self._supervise, name="frpc", daemon=True)

    def start(self) -> FrpTunnel:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._end_process()
        self._thread.join(timeout=10)
        shutil.rmtree(self._directory, ignore_errors=True)

    def wait_until_up(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.remote_port is None and not self._stop.is_set():
            time.sleep(POLL_SECONDS)
        return self.remote_port

    # ---- the supervisor's thread

    def _supervise(self) -> None:
        delay = FIRST_RETRY_SECONDS
        while not self._stop.is_set():
            admin_port = _free_local_port()
            try:
                self._launch(admin_port)
                up_since = self._watch(admin_port)
            except OSError as error:
                logger.warning("could not start frpc (%s): %s", self.frpc, error)
                up_since = None
            finally:
                self._set_remote_port(None)
                self._end_process()
            if self._stop.is_set():
                return
            # A tunnel that stayed up a while had a reason to fall (a server restart): retry soon.
            if up_since is not None and time.monotonic() - up_since > LONGEST_RETRY_SECONDS:
                delay = FIRST_RETRY_SECONDS
            self.restarts += 1
            logger.warning("the tunnel is down; starting frpc again in %.0f s", delay)
            self._stop.wait(delay)
            delay = min(delay * 2, LONGEST_RETRY_SECONDS)

    def _launch(self, admin_port: int) -> None:
        configuration = self._directory / "frpc.toml"
        configuration.write_text(
            "\n".join(
                [
                    f"serverAddr = {toml_string(self.server.host)}",
                    f"serverPort = {self.server.port}",
                    'auth.method = "token"',
                    f"auth.token = {toml_string(self.server.token)}",
                    "transport.tls.enable = true",
                    "loginFailExit = true",
                    'webServer.addr = "127.0.0.1"',
                    f"webServer.port = {admin_port}",
                    'log.to = "console"',
                    'log.level = "warn"',
                    "",
                    "[[proxies]]",
                    f"name = {toml_string(self.name)}",
                    'type = "tcp"',
                    'localIP = "127.0.0.1"',
                    f"localPort = {self.local_port}",
                    "remotePort = 0",  # the server picks one of the ports ops allow
                    "",
                ]
            )
        )
        configuration.chmod(0o600)  # it holds the token
        log = open(self._directory / "frpc.log", "ab")  # noqa: SIM115 (the child keeps it)
        try:
            self._process = subprocess.Popen(
                [str(self.frpc), "-c", str(configuration)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()

    def _watch(self, admin_port: int) -> float | None:
        """Until frpc exits (or is stopped): read the proxy's state from its admin API. When the tunnel
        was up, the monotonic time it came up."""
        process = self._process
        assert process is not None
        started, up_since = time.monotonic(), None
        with httpx.Client(timeout=2.0) as client:
            while not self._stop.is_set() and process.poll() is None:
                port = self._proxy_port(client, admin_port)
                if port is not None and up_since is None:
                    up_since = time.monotonic()
                if port != self.remote_port and (port is not None or up_since is not None):
                    self._set_remote_port(port)
                if up_since is None and time.monotonic() - started > UP_SECONDS:
                    logger.warning(
                        "frpc did not open the tunnel within %.0f s: %s", UP_SECONDS, self._log_tail()
                    )
                    return None
                self._stop.wait(POLL_SECONDS if up_since is None else 2.0)
        if process.poll() is not None and not self._stop.is_set():
            logger.warning("frpc exited with %s: %s", process.returncode, self._log_tail())
        return up_since

    def _proxy_port(self, client: httpx.Client, admin_port: int) -> int | None:
        try:
            status = client.get(f"http://127.0.0.1:{admin_port}/api/status").json()
        except (httpx.HTTPError, ValueError):
            return None
        for proxy in status.get("tcp", []) if isinstance(status, dict) else []:
            if proxy.get("name") == self.name and proxy.get("status") == "running":
                _, _, port = str(proxy.get("remote_addr", "")).rpartition(":")
                if port.isdigit():
                    return int(port)
        return None

    def _set_remote_port(self, port: int | None) -> None:
        if port == self.remote_port:
            return
        self.remote_port = port
        if port is not None:
            logger.info(
                "tunnel up: %s:%d reaches this node's port %d", self.server.host, port, self.local_port
            )
        try:
            self.on_change(port)
        except Exception:
            logger.exception("the tunnel's change callback failed")

    def _end_process(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self._directory / "frpc.log").read_text(errors="replace").strip()[-500:]
        return ""
