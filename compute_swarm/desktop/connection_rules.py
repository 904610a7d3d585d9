"""The rules of the node's websocket to the coordinator, as plain functions tested without a socket:
where the websocket is for a coordinator URL, what to tell the seller when the coordinator refuses the
node's token, and what a close code means (stop for good, reconnect, or reconnect slowly).
desktop.connection does the I/O that follows them.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from compute_swarm import protocol
from compute_swarm.desktop import token_store


def websocket_url(coordinator: str) -> str:
    """ws(s)://HOST[/prefix]/node for an http(s) coordinator URL."""
    parts = urlsplit(token_store.normalize_coordinator_url(coordinator))
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/node", "", ""))


def sell_page(coordinator: str) -> str:
    """The coordinator's page for sellers, which offers the app version it works with."""
    return token_store.normalize_coordinator_url(coordinator).rstrip("/") + "/sell"


def unsupported_version_message(coordinator: str, agent_version: str, reason: str) -> str:
    return (
        f"the coordinator at {coordinator} does not work with this version of compute-swarm, "
        f"{agent_version} ({reason or 'unsupported version'}): install the version it offers at "
        f"{sell_page(coordinator)}"
    )


def refused_token_message(coordinator: str, reason: str) -> str:
    return (
        f"the coordinator at {coordinator} refused this node's token "
        f"({reason or 'unknown or revoked'}); run `compute-swarm node --coordinator {coordinator} "
        "--forget` and start again to register this machine anew"
    )


@dataclass(frozen=True)
class ConnectionEnd:
    problem: str  # why the connection ended, in words
    fatal: bool = False  # reconnecting cannot help: the agent stops, saying `problem`
    unsupported_version: bool = False  # fatal until the seller installs the version the coordinator offers
    slow_reconnect: bool = False  # the coordinator welcomed the node and then objected


def connection_end(code: int | None, reason: str, coordinator: str, agent_version: str) -> ConnectionEnd:
    """What a connection's close code means for the agent."""
    if code == protocol.CloseCode.UNAUTHORIZED:
        return ConnectionEnd(refused_token_message(coordinator, reason), fatal=True)
    if code == protocol.CloseCode.UNSUPPORTED_VERSION:
        return ConnectionEnd(
            unsupported_version_message(coordinator, agent_version, reason),
            fatal=True,
            unsupported_version=True,
        )
    if code in protocol.FATAL_CLOSE_CODES:  # any added later
        return ConnectionEnd(
            f"the coordinator at {coordinator} closed the connection ({reason or code}): update compute-swarm",
            fatal=True,
        )
    # Reconnecting at once would only repeat what the coordinator objected to.
    slow = code in (
        protocol.CloseCode.REPLACED,
        protocol.CloseCode.MALFORMED,
        protocol.CloseCode.POLICY_VIOLATION,
    )
    if code == protocol.CloseCode.REPLACED:
        problem = (
            "another agent connected with this node's token and replaced this connection "
            "(is the node running twice?)"
        )
    elif code in (None, 1006):  # 1006: the connection dropped without a close frame
        problem = "lost the connection to the coordinator (it dropped without a close)"
    else:
        problem = (
            f"lost the connection to the coordinator (close code {code}{': ' + reason if reason else ''})"
        )
    return ConnectionEnd(problem, slow_reconnect=slow)
