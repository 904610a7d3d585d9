"""This node's credentials with the coordinator: the token stored by an earlier run, or a new
registration (retried while the coordinator is unreachable). Where the coordinator admits nodes by
invitation and refuses the code, an agent someone can answer (the tray) says so in its status and waits
for `set_invite_code`; a headless one raises `InviteCodeRefused`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from pathlib import Path

from compute_swarm.desktop import token_store
from compute_swarm.desktop.agent_status import StatusBoard
from compute_swarm.desktop.backoff import Backoff
from compute_swarm.desktop.failures import is_invite_code_refusal, is_transient
from compute_swarm.desktop.node_stopped import InviteCodeRefused, NodeStopped
from compute_swarm.sdk.client import SwarmError

# The agent's parts log under one name, so the seller's log reads as one agent.
logger = logging.getLogger("compute_swarm.desktop.agent")


class Registration:
    """Runs on the agent's event loop."""

    def __init__(
        self,
        coordinator: str,
        data_dir: Path,
        name: str,
        status: StatusBoard,
        *,
        register: Callable[..., tuple[str, str]],  # (coordinator, name, *, invite_code) -> (node id, token)
        invite_code: str | None,  # already normalized
        wait_for_invite_code: bool,
        rng: random.Random,
    ):
        self._coordinator = coordinator
        self._data_dir = data_dir
        self._name = name
        self._status = status
        self._register = register
        self._invite_code = invite_code
        self._wait_for_invite_code = wait_for_invite_code
        self._invite_code_given = asyncio.Event()
        self._rng = rng

    def set_invite_code(self, code: str) -> None:
        """A registration waiting for a code tries again with this one at once."""
        self._invite_code = code
        self._invite_code_given.set()

    async def credentials(self) -> token_store.Credentials:
        """The stored credentials, else those of a new registration (stored before they are returned)."""
        stored = await asyncio.to_thread(token_store.load, self._coordinator, self._data_dir)
        if stored is not None:
            return stored
        backoff = Backoff(rng=self._rng)
        while True:
            # Cleared before the code is read: a code given while this request is under way is tried next.
            self._invite_code_given.clear()
            invite_code = self._invite_code
            try:
                node_id, token = await asyncio.to_thread(
                    self._register, self._coordinator, self._name, invite_code=invite_code
                )
                break
            except SwarmError as error:
                if is_invite_code_refusal(error):
                    refusal = InviteCodeRefused(
                        self._coordinator, invite_code is not None, error.detail or str(error)
                    )
                    if not self._wait_for_invite_code:
                        raise refusal from None
                    logger.warning("%s; waiting for an invite code", refusal)
                    self._status.update(
                        invite_code_wanted="refused" if refusal.code_given else "missing",
                        problem=refusal.detail,
                    )
                    await self._invite_code_given.wait()
                    logger.info("registering with %s with the invite code given", self._coordinator)
                    self._status.update(invite_code_wanted=None, problem=None)
                    continue
                if not is_transient(error):
                    raise NodeStopped(
                        f"the coordinator at {self._coordinator} refused to register this node: {error}"
                    ) from None
                delay = backoff.next_delay()
                logger.warning(
                    "could not register with %s (%s); retrying in %.0f s", self._coordinator, error, delay
                )
                self._status.update(problem=str(error))
                await asyncio.sleep(delay)
        credentials = token_store.Credentials(self._coordinator, node_id, token)
        try:
            await asyncio.to_thread(token_store.save, credentials, self._data_dir)
        except OSError as error:
            raise NodeStopped(
                f"registered as node {node_id} but could not store its token: {error}"
            ) from None
        logger.info("registered with %s as node %s (%s)", self._coordinator, node_id, self._name)
        return credentials
