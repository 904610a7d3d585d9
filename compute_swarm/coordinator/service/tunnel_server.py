"""frp's server, frps, for the nodes other nodes cannot reach: its configuration, which
`compute-swarm tunnel-server` (coordinator/cli.py) writes before it becomes frps.

Ops run it beside the coordinator (a service unit: README, "Running a coordinator") and give the
coordinator its address and token (SWARM_TUNNEL_SERVER, SWARM_TUNNEL_TOKEN). A node found unreachable
starts frpc (desktop/tunnel.py), which logs in with the token over TLS (the server refuses anything
else) and gets one port of `ports` that forwards to the node's transfer port; the coordinator then
tests that port and names it to the node's peers.
"""

from __future__ import annotations

from compute_swarm.frp import toml_string

MINIMUM_TOKEN_LENGTH = 24


def port_range(text: str) -> tuple[int, int]:
    first, separator, last = text.partition("-")
    if not (separator and first.strip().isdigit() and last.strip().isdigit()):
        raise ValueError(f"--ports {text!r}: give FIRST-LAST, e.g. 20000-20999")
    low, high = int(first), int(last)
    if not 1024 <= low <= high <= 65535:
        raise ValueError(f"--ports {text!r}: the ports must lie between 1024 and 65535, first to last")
    return low, high


def configuration(host: str, port: int, proxy_host: str, ports: str, token: str) -> str:
    """frps's TOML; ValueError, saying what to change, for a bad option or a short token."""
    low, high = port_range(ports)
    if not 0 < port < 65536:
        raise ValueError(f"--port {port}: not a port")
    if len(token) < MINIMUM_TOKEN_LENGTH:
        raise ValueError(
            f"the token must be at least {MINIMUM_TOKEN_LENGTH} characters: e.g. the output of "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return "\n".join(
        [
            f"bindAddr = {toml_string(host)}",
            f"bindPort = {port}",
            f"proxyBindAddr = {toml_string(proxy_host)}",
            'auth.method = "token"',
            f"auth.token = {toml_string(token)}",
            "transport.tls.force = true",  # no frpc without TLS
            f"allowPorts = [{{ start = {low}, end = {high} }}]",
            "maxPortsPerClient = 1",
            'log.to = "console"',
            'log.level = "info"',
            "",
        ]
    )
