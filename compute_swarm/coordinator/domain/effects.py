"""What must happen outside the database once a transaction commits: the services decide these, and
the transport (the hub) carries them out. Routers and pages never poke the hub themselves.

A service queues effects on the session it works in (`database.after_commit`); the database hands
them to its `on_commit` callback after the commit, and drops them with a rollback, so a node is never
told to stop a job whose cancellation did not happen.
"""

from __future__ import annotations

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


Effect = WakeDispatcher | StopOnNode | StandingChanged | NodeRevoked
