"""What must happen outside the database once a transaction commits: the services decide these, and
the transport (the hub) carries them out. Routers and pages never poke the hub themselves.

A service queues effects on the session it works in (`database.after_commit`); the database hands
them to its `on_commit` callback after the commit, and drops them with a rollback, so a node is never
told to stop a job whose cancellation did not happen.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class WakeDispatcher:
    """A job became dispatchable (submitted, queued again)."""


@dataclass(frozen=True)
class StopOnNode:
    """A lease ended while its node may still be working on it: tell the node to stop."""

    node_id: str
    job_id: str
    lease_id: str
    reason: str


@dataclass(frozen=True)
class StandingChanged:
    """A node's standing (trusted, approved, quarantined) may have changed: read it before the next
    dispatch, and tell the nodes whose standing did."""


@dataclass(frozen=True)
class NodeRevoked:
    """Ops revoked a node's token: close its connection."""

    node_id: str


@dataclass(frozen=True)
class NodeConnected:
    """A node's new connection was greeted (on this coordinator or another replica): any other
    connection of the node is stale, a socket its computer gave up on, and is closed."""

    node_id: str
    connection: str  # the new connection's token
    greeted_at: float  # wall-clock seconds: a connection greeted after this one is newer, and stays


Effect = WakeDispatcher | StopOnNode | StandingChanged | NodeRevoked | NodeConnected
_BY_NAME: dict[str, type] = {
    kind.__name__: kind for kind in (WakeDispatcher, StopOnNode, StandingChanged, NodeRevoked, NodeConnected)
}


def encode(effects: list[Effect]) -> list[dict]:
    """Effects as JSON values, for the coordinators that share a PostgreSQL database (each carries out
    those that concern its own nodes)."""
    return [{"effect": type(effect).__name__, **dataclasses.asdict(effect)} for effect in effects]


def decode(values: object) -> list[Effect]:
    """The effects another coordinator encoded; ValueError for anything else (a newer coordinator's
    effect this one does not know, during a rolling upgrade, is skipped)."""
    if not isinstance(values, list):
        raise ValueError("effects come as a JSON list")
    effects = []
    for value in values:
        if not isinstance(value, dict) or not isinstance(value.get("effect"), str):
            raise ValueError(f"not an effect: {json.dumps(value)[:200]}")
        kind = _BY_NAME.get(value["effect"])
        if kind is None:
            continue
        fields = {field.name for field in dataclasses.fields(kind)}
        arguments = {name: value[name] for name in fields if name in value}
        if set(arguments) != fields or not all(
            isinstance(item, str | float | int) and not isinstance(item, bool) for item in arguments.values()
        ):
            raise ValueError(f"not a {kind.__name__}: {json.dumps(value)[:200]}")
        effects.append(kind(**arguments))
    return effects
