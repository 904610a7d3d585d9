"""Dispatch: queued jobs → leases on free nodes, in rounds. A round reads the queue, plans it over the
free nodes (coordinator.domain.scheduler), leases what it planned in one transaction per batch and
sends each lease to its node. Runs on the event loop; database work goes to threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from compute_swarm.coordinator.domain.scheduler import Assignment, NodeSnapshot, QueuedJob, plan
from compute_swarm.coordinator.service.leases import Grant, Leases
from compute_swarm.coordinator.service.node_accounts import NodeAccounts
from compute_swarm.coordinator.settings import Settings
from compute_swarm.coordinator.transport.hub.registry import Registry
from compute_swarm.coordinator.transport.metrics import Metrics

logger = logging.getLogger("compute_swarm.coordinator.transport.hub")
DISPATCH_GATHER_SECONDS = 0.005
LEASE_BATCH = 256


class Dispatcher:
    def __init__(
        self, registry: Registry, leases: Leases, accounts: NodeAccounts, settings: Settings, metrics: Metrics
    ):
        self.registry = registry
        self.leases = leases
        self.accounts = accounts
        self.settings = settings
        self.metrics = metrics
        self.work_waiting = asyncio.Event()
        # Set when a verdict or ops may have moved a node's standing: the next round reads it first,
        # so a node quarantined a moment ago is not handed the job submitted just after.
        self.standing_stale = False

    def wake(self) -> None:
        """Something may be dispatchable now (a job was queued, a node freed up). Event loop only."""
        self.work_waiting.set()

    async def run_forever(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.work_waiting.wait(), timeout=5.0)
            # Let a burst of submissions gather, so one round (one plan, one commit) serves them all.
            await asyncio.sleep(DISPATCH_GATHER_SECONDS)
            self.work_waiting.clear()
            try:
                await self.dispatch_once()
            except Exception:
                logger.exception("dispatch failed; retrying")
                await asyncio.sleep(1.0)

    async def dispatch_once(self) -> int:
        if self.standing_stale:
            self.standing_stale = False
            await self.registry.refresh_standing(self.accounts)
        if not self.registry.free:
            return 0
        # A few more than there are free nodes, so that jobs no free node can take (a batch with no
        # node serving inference, a job every free node refused) do not hide the ones behind them.
        queued = await asyncio.to_thread(self.leases.queued, min(len(self.registry.free) + 64, 5000))
        if not queued:
            return 0
        # Re-runs that verify others' jobs go to trusted nodes first, then the swarm's jobs to any node.
        checks = [job for job in queued if job.verification]
        assignments: list[Assignment] = []
        if checks:
            assignments += self._plan([job for job in checks if not job.inference], assignments, trusted=True)
            assignments += self._plan(
                [job for job in checks if job.inference], assignments, trusted=True, serving=True
            )
        assignments += self._plan(
            [job for job in queued if not job.inference and not job.verification], assignments
        )
        batches = [job for job in queued if job.inference and not job.verification]
        if batches:
            assignments += self._plan(batches, assignments, serving=True)
        # Leased and sent in batches: the first nodes get their jobs while later batches commit.
        granted = 0
        for start in range(0, len(assignments), LEASE_BATCH):
            batch = assignments[start : start + LEASE_BATCH]
            grants = await self.leases.lease(
                [(assignment.job_id, assignment.node_id) for assignment in batch]
            )
            await asyncio.gather(*(self._deliver(grant) for grant in grants))
            granted += len(grants)
        if granted < len(assignments):
            # Some planned jobs were gone when leased: another replica leased them (or a buyer
            # cancelled). The queue behind them may still fit the nodes left free: plan again.
            self.wake()
        return granted

    def _free(
        self, taken: set[str], *, trusted: bool, serving: bool, most: int | None = None
    ) -> list[NodeSnapshot]:
        """Free nodes' snapshots, longest free first, but those in `taken` (and, if asked, only trusted
        nodes or nodes that serve inference); at most `most`, so a round looks at as many nodes as
        its jobs need, not at the whole swarm."""
        found = []
        for connection in self.registry.free.values():
            snapshot = connection.snapshot
            if (
                snapshot is None
                or snapshot.node_id in taken
                or (trusted and not connection.trusted)
                or (serving and snapshot.node_id not in self.registry.serving)
            ):
                continue
            found.append(snapshot)
            if most is not None and len(found) >= most:
                break
        return found

    def _plan(
        self,
        queued: list[QueuedJob],
        taken: list[Assignment],
        *,
        trusted: bool = False,
        serving: bool = False,
    ) -> list[Assignment]:
        """Plan over a sample of the free nodes no assignment took yet (the longest free, a few per job),
        then over all of them for the jobs the sample could not place (large jobs wanting a particular
        node)."""
        if not queued:
            return []
        busy = {assignment.node_id for assignment in taken}
        most = max(256, 4 * len(queued))
        sample = self._free(busy, trusted=trusted, serving=serving, most=most)
        assignments = plan(queued, sample, allowed_backends=self.settings.allowed_backends)
        if len(assignments) < len(queued) and len(sample) == most:
            placed = {assignment.job_id for assignment in assignments}
            busy |= {assignment.node_id for assignment in assignments}
            assignments += plan(
                [job for job in queued if job.job_id not in placed],
                self._free(busy, trusted=trusted, serving=serving),
                allowed_backends=self.settings.allowed_backends,
            )
        return assignments

    async def _deliver(self, grant: Grant) -> None:
        connection = self.registry.connections.get(grant.node_id)
        if connection is None:
            # It left between planning and leasing.
            await asyncio.to_thread(self.leases.return_lease, grant.message.job_id, grant.message.lease_id)
            return
        connection.leases[grant.message.lease_id] = grant.message.job_id
        self.registry.refresh_snapshot(connection)
        if await connection.send(grant.message):
            self.metrics.leases_granted.inc()
            self.metrics.dispatch_latency.observe(max(0.0, time.time() - grant.queued_at))
