"""This machine as the node agent sees it, read every few seconds whether connected or not: the GPUs
(engine.devices) and the seller's activity (desktop.activity) become the telemetry the hello and the
heartbeats carry, and the guards' decision (desktop.guards) that `Availability` applies.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
from collections.abc import Callable

from pydantic import ValidationError

from compute_swarm import protocol
from compute_swarm.desktop.activity import Activity
from compute_swarm.desktop.agent_status import StatusBoard
from compute_swarm.desktop.availability import Availability
from compute_swarm.desktop.economics import Economics
from compute_swarm.desktop.guards import GuardSettings, MachineReading, evaluate
from compute_swarm.desktop.node_description import telemetry_from_inventory
from compute_swarm.engine.devices import DeviceInventory

# The agent's parts log under one name, so the seller's log reads as one agent.
logger = logging.getLogger("compute_swarm.desktop.agent")


class MachineWatch:
    """Runs on the agent's event loop; the readings themselves run in a worker thread."""

    def __init__(
        self,
        status: StatusBoard,
        availability: Availability,
        *,
        economics: Economics,
        probe: Callable[[bool], DeviceInventory],  # (check_torch) -> the GPUs and the CPU
        activity: Callable[[], Activity],
        guards: GuardSettings,
        interval_seconds: float,
        clock: Callable[[], datetime.datetime],
    ):
        self.telemetry: protocol.Telemetry | None = None  # the last good reading
        self._backends: tuple[str, ...] | None = None  # what torch said at start-up it can use
        self._status = status
        self._availability = availability
        self._economics = economics
        self._probe = probe
        self._activity = activity
        self._guards = guards
        self._interval_seconds = interval_seconds
        self._clock = clock

    def use_guards(self, guards: GuardSettings) -> None:
        """New guard settings, applied at the next reading."""
        self._guards = guards

    async def first_reading(self) -> None:
        """The start-up probe, the one that asks torch which backends work (slow; the rest do not)."""
        inventory = await asyncio.to_thread(self._probe, True)
        self._backends = inventory.backends
        self.telemetry = telemetry_from_inventory(inventory, self._backends)
        self._status.update(telemetry=self.telemetry)
        self._economics.telemetry(self.telemetry)

    async def watch(self) -> None:
        """Read the GPUs and the seller's activity every few seconds, connected or not: the telemetry
        the heartbeats carry, and the guards' decision."""
        while True:
            try:
                await self.refresh()
            except Exception:  # one bad reading must not end the guards for the rest of the run
                logger.exception("could not read this machine for the guards")
            await asyncio.sleep(self._interval_seconds)

    async def refresh(self) -> None:
        try:
            reading = await asyncio.to_thread(self._read_machine)
            self.telemetry = telemetry_from_inventory(reading.inventory, self._backends)
        except (ValidationError, ValueError) as error:
            logger.debug("kept the previous telemetry: %s", error)
            return
        self._status.update(telemetry=self.telemetry)
        self._economics.telemetry(self.telemetry)
        self._availability.apply_guards(evaluate(self._guards, reading, self._availability.guard_decision))

    def _read_machine(self) -> MachineReading:
        inventory = self._probe(False)
        try:
            activity = self._activity()
        except Exception:
            logger.exception("could not read the seller's activity")
            activity = Activity(user_idle_seconds=None, fullscreen_application=None)
        return MachineReading(
            inventory=inventory,
            now=self._clock(),
            own_process_ids=_own_process_ids(),
            user_idle_seconds=activity.user_idle_seconds,
            full_screen_application=activity.fullscreen_application,
        )


def _own_process_ids() -> frozenset[int]:
    """This process and its children (the trainer, the inference server): on the GPU, but not a game."""
    own = {os.getpid()}
    try:
        import psutil

        own.update(child.pid for child in psutil.Process().children(recursive=True))
    except Exception as error:  # psutil missing, or a child gone while listed
        logger.debug("could not list this process's children: %r", error)
    return frozenset(own)
