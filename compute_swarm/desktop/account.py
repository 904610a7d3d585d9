"""This node's account as the seller sees it: its earnings (asked of the coordinator, or pushed by it
after each result) and its standing (whether the coordinator gives it work), kept in the agent's status
for the tray and the CLI, and logged when they change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from compute_swarm import protocol
from compute_swarm.desktop.agent_status import StatusBoard
from compute_swarm.protocol import format_credits

# The agent's parts log under one name, so the seller's log reads as one agent.
logger = logging.getLogger("compute_swarm.desktop.agent")


class NodeAccount:
    """Runs on the agent's event loop; the coordinator's HTTP API is called in a worker thread."""

    def __init__(self, status: StatusBoard, client: Callable[[], Any]):
        self._status = status
        self._client = client  # the agent's NodeClient once it has registered, else None

    async def earnings_history(self, days: int) -> dict[str, Any]:
        client = self._registered_client()
        answer = await asyncio.to_thread(client.earnings_history, days)
        self._status.update(earnings=protocol.Earnings.model_validate(answer["earnings"], strict=False))
        return answer

    async def earnings(self) -> protocol.Earnings:
        client = self._registered_client()
        answer = await asyncio.to_thread(client.me)
        earnings = protocol.Earnings.model_validate(answer["earnings"], strict=False)
        self._status.update(earnings=earnings)
        return earnings

    def earnings_arrived(self, earnings: protocol.Earnings) -> None:
        logger.info(
            "earnings: %s credits pending verification, %s available, %d jobs completed",
            format_credits(earnings.pending_micro),
            format_credits(earnings.available_micro),
            earnings.jobs_completed,
        )
        self._status.update(earnings=earnings)

    def standing_arrived(self, standing: protocol.Standing) -> None:
        self.log_standing(standing)
        self._status.update(standing=standing)

    def log_standing(self, standing: protocol.Standing) -> None:
        """Say a change of standing in the log (the status is updated by the caller)."""
        previous = self._status.current.standing
        if standing == previous:
            return
        if standing.state == "active":
            if previous is not None:
                logger.info("the coordinator gives this node work again")
        else:
            logger.warning(
                "the coordinator gives this node no work (%s): %s", standing.state, standing.reason
            )

    def _registered_client(self) -> Any:
        client = self._client()
        if client is None:
            raise RuntimeError("the agent has not registered with the coordinator yet")
        return client
