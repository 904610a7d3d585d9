"""Dispatch: queued jobs → leases on free nodes, in rounds. A round reads the queue, plans it over the
free nodes (coordinator.domain.scheduler), leases what it planned in one transaction per batch and
sends each lease to its node. Runs on the event loop; database work goes to threads.

A job submitted while nothing waits in the queue skips the round: its submission reserves a free node
(`reserve`) and leases the job to it in the transaction that queues it (Submissions.submit_async), and
the lease is sent once that commits (`hand_over`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from compute_swarm.coordinator.domain.scheduler import Assignment, NodeSnapshot, QueuedJob, plan
from compute_swarm.coordinator.service.leases import Grant, Leases
from compute_swarm.coordinator.service.node_accounts import NodeAccounts
from compute_swarm.coordinator.settings import Settings
from compute_swarm.coordinator.transport.hub.registry import Connection, Registry
from compute_swarm.coordinator.transport.metrics import Metrics

logger = logging.getLogger("compute_swarm.coordinator.transport.hub")
DISPATCH_GATHER_SECONDS = 0.005
LEASE_BATCH = 256
# A job being submitted is offered to this many of the longest-free nodes; one none of them takes
# waits for a round, which looks at every free node.
RESERVE_SAMPLE = 16


@dataclass(frozen=True)
class Reservation:
    """A free node's slot set aside for a job while its submission commits."""

    connection: Connection
    snapshot: NodeSnapshot  # the node as it was when reserved: the job's real needs are checked on it


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
        # What the dispatcher knows of the queue: whether jobs may have been queued since a round last
        # read it (then a submission may not pass them), how many it read that no free node took
        # (a freed node is offered to them), and a count of queueings, so a round that read the queue
        # knows whether another job was queued while it ran.
        self.queue_unread = True
        self.waiting = 0
        self.queueings = 0
        self._handing: set[asyncio.Future] = set()  # leases being sent (kept from the collector)

    def wake(self) -> None:
        """Something may be dispatchable now (a node freed up). Event loop only."""
        self.work_waiting.set()

    def job_queued(self) -> None:
        """A job may have been queued (submitted, put back, or on another replica). Event loop only."""
        self.queue_unread = True
        self.queueings += 1
        self.wake()

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
                self.queue_unread = True
                await asyncio.sleep(1.0)

    async def dispatch_once(self) -> int:
        if self.standing_stale:
            self.standing_stale = False
            await self.registry.refresh_standing(self.accounts)
        if not self.registry.free or not (self.queue_unread or self.waiting):
            return 0  # no node to offer, or nothing queued that it could take
        queueings = self.queueings
        # A few more than there are free nodes, so that jobs no free node can take (a batch with no
        # node serving inference, a job every free node refused) do not hide the ones behind them.
        limit = min(len(self.registry.free) + 64, 5000)
        queued = await asyncio.to_thread(self.leases.queued, limit)
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
        granted = await self._lease_and_send(assignments)
        gone = granted < len(assignments)
        if gone:
            # Some planned jobs were gone when leased: another replica leased them (or a buyer
            # cancelled). The queue behind them may still fit the nodes left free: plan again.
            self.wake()
        self.waiting = len(queued) - len(assignments)
        # Unless it was read to its end, with every lease granted and nothing queued since, a job
        # submitted now could pass one queued before it.
        self.queue_unread = gone or len(queued) >= limit or queueings != self.queueings
        return granted

    async def _lease_and_send(self, assignments: list[Assignment]) -> int:
        """Lease the planned jobs, in batches so the first nodes get their jobs while later batches
        commit. Their nodes' slots are reserved meanwhile: a job submitted now is not planned on them."""
        reserved = [self.registry.connections[assignment.node_id] for assignment in assignments]
        for connection in reserved:
            self.registry.reserve(connection)
        granted = 0
        try:
            while reserved:
                batch, assignments = assignments[:LEASE_BATCH], assignments[LEASE_BATCH:]
                grants = await self.leases.lease(
                    [(assignment.job_id, assignment.node_id) for assignment in batch]
                )
                for connection in reserved[: len(batch)]:
                    self.registry.release(connection)
                del reserved[: len(batch)]
                await asyncio.gather(*[self._send(self._record(grant), grant) for grant in grants])
                granted += len(grants)
        finally:
            for connection in reserved:  # a batch's lease failed: the nodes left are free again
                self.registry.release(connection)
        return granted

    # ---- a job leased as it is submitted

    def reserve(self, job: QueuedJob) -> Reservation | None:
        """A free node's slot for a job being submitted (its figures as the catalogue last said), or None
        when it should wait in the queue: jobs queued before it go first, a node's standing is about
        to be read again, or none of the longest-free nodes takes it."""
        if self.queue_unread or self.standing_stale or not self.registry.free:
            return None
        sample = self._free(set(), trusted=False, serving=job.inference, most=RESERVE_SAMPLE)
        assignments = plan([job], sample, allowed_backends=self.settings.allowed_backends)
        if not assignments:
            return None
        connection = self.registry.connections[assignments[0].node_id]
        reservation = Reservation(connection, connection.snapshot)
        self.registry.reserve(connection)
        return reservation

    def hand_over(self, reservation: Reservation, grant: Grant | None) -> None:
        """The submission committed (or failed): free the reserved slot, and send the lease it wrote."""
        self.registry.release(reservation.connection)
        if grant is None:
            self.wake()  # the slot is free again
            return
        self.metrics.leases_on_submission.inc()
        sending = asyncio.ensure_future(self._send(self._record(grant), grant))
        self._handing.add(sending)
        sending.add_done_callback(self._handing.discard)

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

    def _record(self, grant: Grant) -> Connection | None:
        """Record a committed lease on its node's connection, at once (no await between a reservation's
        release and this, so nothing is planned onto the slot meanwhile); None when the node left."""
        connection = self.registry.connections.get(grant.node_id)
        if connection is not None:
            connection.leases[grant.message.lease_id] = grant.message.job_id
            self.registry.refresh_snapshot(connection)
        return connection

    async def _send(self, connection: Connection | None, grant: Grant) -> None:
        if connection is None:  # it left between planning and leasing: the job goes back to the queue
            await asyncio.to_thread(self.leases.return_lease, grant.message.job_id, grant.message.lease_id)
            return
        if await connection.send(grant.message):
            self.metrics.leases_granted.inc()
            self.metrics.dispatch_latency.observe(max(0.0, time.time() - grant.queued_at))
