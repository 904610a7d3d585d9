"""What the node agent shows the seller: `AgentStatus`, one immutable snapshot (connected, paused and
why, the job, earnings, standing, the problem in words), and the `StatusBoard` that replaces it whole
on every change and tells the CLI or the tray. Any thread may read the snapshot.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from compute_swarm import protocol
from compute_swarm.desktop.electricity import ElectricitySettings
from compute_swarm.desktop.job import JobOutcome, JobStatus
from compute_swarm.desktop.work_journal import JobEntry

# The agent's parts log under one name, so the seller's log reads as one agent.
logger = logging.getLogger("compute_swarm.desktop.agent")


@dataclass(frozen=True)
class AgentStatus:
    """A snapshot; the agent replaces it whole on every change, so any thread may read it."""

    coordinator: str
    node_id: str | None = None
    connected: bool = False
    paused: bool = False
    pause_reason: str | None = None  # the seller's, else the first guard's
    paused_by: Literal["seller", "guard"] | None = None
    job: JobStatus | None = None
    last_job: JobOutcome | None = None
    telemetry: protocol.Telemetry | None = None
    earnings: protocol.Earnings | None = None
    problem: str | None = None  # why the agent is not connected, in words
    stopped: bool = False
    # Registration waits for an invite code: none was given ("missing"), or the coordinator refused
    # the one given ("refused"); `problem` then holds the coordinator's words. See set_invite_code.
    invite_code_wanted: Literal["missing", "refused"] | None = None
    # Whether the coordinator gives this node work, as it last said (None: not welcomed yet).
    standing: protocol.Standing | None = None
    # The newer agent version the coordinator offers on its sell page, when this one is older.
    newer_version: str | None = None
    # What this node has served to other nodes (swarm transfer); None while it does not share.
    served_bytes: int | None = None
    # Whether other nodes reach it, as the coordinator found (protocol.Reachability); None: not tested.
    reachability: str | None = None
    # The seller's economics (desktop.economics): what a credit is worth (from the welcome), the
    # electricity settings, the latest jobs' records and the electricity per local day (ISO date).
    credit_value: protocol.CreditValue | None = None
    electricity: ElectricitySettings | None = None
    recent_jobs: tuple[JobEntry, ...] = ()
    electricity_by_day: tuple[tuple[str, int], ...] = ()
    energy_source: str | None = None
    last_declined: str | None = None  # the last job the *only profitable work* guard turned down, and why


class StatusBoard:
    """The agent's current status. `update` runs on the agent's event loop and calls `on_change` with
    the new snapshot whenever something changed (a GUI hands it to its own thread)."""

    def __init__(self, coordinator: str, on_change: Callable[[AgentStatus], None] | None = None):
        self.current = AgentStatus(coordinator=coordinator)
        self._on_change = on_change

    def update(self, **changes: Any) -> None:
        new = replace(self.current, **changes)
        if new == self.current:
            return
        self.current = new
        if self._on_change is not None:
            try:
                self._on_change(new)
            except Exception:
                logger.exception("the status callback failed")
