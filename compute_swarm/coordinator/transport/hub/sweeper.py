"""The lease sweeper: every few seconds it renews the leases of nodes that are alive, drops nodes whose
token ops revoked from another process, and follows the nodes' standing. On the leading replica
(transport.replicas) it also releases credit whose verification window passed, ends leases that ran
out (their nodes are told to stop through the effects the services commit, on whichever replica
holds them) and refunds the live requests of replicas that are gone. Runs on the event loop;
database work goes to threads.
"""

from __future__ import annotations

import asyncio
import logging
import time

from compute_swarm import protocol
from compute_swarm.coordinator.service.inference import InferenceService
from compute_swarm.coordinator.service.leases import Leases
from compute_swarm.coordinator.service.node_accounts import NodeAccounts
from compute_swarm.coordinator.settings import Settings
from compute_swarm.coordinator.transport.hub.registry import Registry
from compute_swarm.coordinator.transport.replicas import Replicas
from compute_swarm.protocol import CloseCode

logger = logging.getLogger("compute_swarm.coordinator.transport.hub")


class LeaseSweeper:
    def __init__(
        self,
        registry: Registry,
        leases: Leases,
        accounts: NodeAccounts,
        inference: InferenceService,
        settings: Settings,
        replicas: Replicas,
    ):
        self.registry = registry
        self.leases = leases
        self.accounts = accounts
        self.inference = inference
        self.settings = settings
        self.replicas = replicas

    async def run_forever(self) -> None:
        last_seen_written = 0.0
        while True:
            await asyncio.sleep(self.settings.sweep_interval_seconds)
            try:
                await self.sweep_once()
                # For ops (`admin nodes`): when each node was last connected, to the half minute.
                if time.monotonic() - last_seen_written > 30:
                    await asyncio.to_thread(self.accounts.mark_seen, list(self.registry.connections))
                    last_seen_written = time.monotonic()
            except Exception:
                logger.exception("lease sweep failed; retrying")

    async def sweep_once(self) -> None:
        # A node that is connected and sending heartbeats keeps its leases (websocket pings close the
        # connection of one that stops answering); a node whose loop hangs misses heartbeats.
        now = time.monotonic()
        alive = [
            lease_id
            for connection in self.registry.connections.values()
            if now - connection.last_message_at < 3 * protocol.HEARTBEAT_INTERVAL_SECONDS
            for lease_id in connection.leases
        ]
        await asyncio.to_thread(self.leases.renew, alive)
        # Ops revoke tokens from another process (`admin revoke-node`): drop those nodes here.
        for node_id in await asyncio.to_thread(self.accounts.revoked_nodes, list(self.registry.connections)):
            connection = self.registry.connections.get(node_id)
            if connection is not None:
                await connection.close_quietly(CloseCode.UNAUTHORIZED, "this node's token was revoked")
        await self.registry.refresh_standing(self.accounts)
        if not self.replicas.leading:
            return  # each replica renews its own nodes' leases; the leader does the rest, once
        await asyncio.to_thread(self.accounts.release_due_credits)
        # The nodes of leases that ran out are told to stop, and the dispatcher woken (effects).
        await asyncio.to_thread(self.leases.expire_leases)
        if self.replicas.shared:
            await asyncio.to_thread(self.inference.fail_orphaned, self.replicas.alive)
