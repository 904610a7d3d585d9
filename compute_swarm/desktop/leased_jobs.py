"""The leases this node holds and the jobs that run them. `LeasedJobs` takes a lease (or declines it:
busy, paused, stopping) and hands it to a desktop.job.JobRun, cancels a job on the coordinator's word
or for a pause, tidies a job's files once its end is acknowledged, and at shutdown lets the running job
checkpoint, or kills it. Fetching inputs, running the engine and uploading are JobRun's.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

from compute_swarm import protocol
from compute_swarm.desktop.agent_status import StatusBoard
from compute_swarm.desktop.availability import Availability
from compute_swarm.desktop.background_tasks import BackgroundTasks, cancel_all, wait_until
from compute_swarm.desktop.economics import Economics, Measurement
from compute_swarm.desktop.job import JobHost, JobOutcome, JobRun, StopSignal
from compute_swarm.desktop.job_reports import failure_message
from compute_swarm.desktop.workspace import Workspace

# The agent's parts log under one name, so the seller's log reads as one agent.
logger = logging.getLogger("compute_swarm.desktop.agent")


class LeasedJobs:
    """Runs on the agent's event loop, one leased job at a time."""

    def __init__(
        self,
        workspace: Workspace,
        status: StatusBoard,
        availability: Availability,
        *,
        client: Callable[[], Any],  # the agent's NodeClient, for the jobs' downloads and uploads
        runner_factory: Callable[..., Any],
        device: str | None,
        rng: random.Random,
        stop: StopSignal,
        post: Callable[[protocol.NodeMessage], None],
        tasks: BackgroundTasks,
        economics: Economics,
    ):
        self.current: JobRun | None = None  # the lease this node holds now
        self.live: set[JobRun] = set()  # with any whose child is still exiting
        self._workspace = workspace
        self._status = status
        self._availability = availability
        self._client = client
        self._runner_factory = runner_factory
        self._device = device
        self._rng = rng
        self._stop = stop
        self._post = post
        self._tasks = tasks
        self._economics = economics

    def running(self) -> tuple[protocol.LeaseReference, ...]:
        job = self.current
        return (job.reference,) if job is not None and job.holds_lease else ()

    def take(self, lease: protocol.Lease) -> None:
        current = self.current
        if current is not None and current.lease.lease_id == lease.lease_id:
            return  # the same lease again
        if current is not None and not current.reported:
            refusal = f"node busy with job {current.lease.job_id}"
        else:
            refusal = self._availability.refusal()
        if refusal is not None:
            logger.warning("declined job %s: %s", lease.job_id, refusal)
            # Released, not failed: the job did nothing wrong, so it costs the buyer no attempt.
            self._post(failure_message(lease, "released", refusal))
            return
        unprofitable = self._economics.decline_reason(lease)
        if unprofitable is not None:
            logger.info("declined job %s: %s", lease.job_id, unprofitable)
            # Declined: another node takes it, and this one is not offered it again.
            self._post(failure_message(lease, "declined", unprofitable))
            self._status.update(last_declined=f"job {lease.job_id}: {unprofitable}")
            return
        resuming = f", resuming from step {lease.checkpoint_step}" if lease.checkpoint_sha256 else ""
        logger.info(
            "leased job %s (attempt %d of %d)%s", lease.job_id, lease.attempt, lease.max_attempts, resuming
        )
        job = JobRun(lease, self._job_host(self._economics.started(lease)), previous=current)
        self.current = job
        self.live.add(job)
        self._status.update(job=job.status)
        job.task = self._tasks.spawn(self._run(job), name=f"job-{lease.job_id}")

    def cancel(self, cancel: protocol.Cancel) -> None:
        job = self.current
        if job is None or (job.lease.job_id, job.lease.lease_id) != (cancel.job_id, cancel.lease_id):
            logger.debug("ignored a cancel for lease %s, which this node does not hold", cancel.lease_id)
            return
        logger.info("job %s cancelled by the coordinator: %s", cancel.job_id, cancel.reason)
        job.cancel("coordinator")

    def hand_back(self, reason: str) -> None:
        """Stop the running job for a pause: it checkpoints and its lease is released."""
        if self.current is not None:
            self.current.cancel("paused", pause_reason=reason)

    def end_acknowledged(self, ack: protocol.Acknowledged) -> None:
        """The coordinator acknowledged a report of a job: once its end is, the job's files go."""
        if ack.about not in ("result", "failure"):
            return
        job = self.current
        if job is None or job.lease.job_id != ack.job_id:
            self._tidy_later(ack.job_id)
        elif job.lease.lease_id == ack.lease_id:
            job.tidy_when_done = True  # its child may still be exiting, writing its log
        # else: a newer lease of the same job runs here now, in a directory cleared for it

    def kill_all(self) -> None:
        for job in self.live:
            job.kill()

    async def stop_for_shutdown(self) -> None:
        """Let the running job checkpoint and report, until the stop's deadline or until it is abandoned."""
        job = self.current
        if job is not None and not job.reported and not self._stop.abandoned:
            logger.info("stopping: job %s saves a checkpoint first", job.lease.job_id)
            job.cancel("shutdown")
        assert self._stop.deadline is not None
        await wait_until(lambda: not self.live or self._stop.abandoned, self._stop.deadline)

    async def abandon(self) -> None:
        """Kill every job's child and wait until their tasks have ended."""
        jobs = list(self.live)
        for job in jobs:
            job.kill()
        await cancel_all([job.task for job in jobs if job.task is not None])

    def _job_host(self, measurement: Measurement) -> JobHost:
        return JobHost(
            workspace=self._workspace,
            client=self._client(),
            runner_factory=self._runner_factory,
            device=self._device,
            rng=self._rng,
            stop=self._stop,
            post=self._post,
            status_changed=self._job_status_changed,
            ended=lambda outcome: self._ended(measurement, outcome),
            spawn=lambda coroutine, name: self._tasks.spawn(coroutine, name=name),
        )

    async def _run(self, job: JobRun) -> None:
        try:
            await job.run()
        finally:
            self.live.discard(job)
            if self.current is job:
                self.current = None
                self._status.update(job=None)
            if job.tidy_when_done:
                self._tidy_later(job.lease.job_id)

    def _ended(self, measurement: Measurement, outcome: JobOutcome) -> None:
        entry = self._economics.ended(measurement, outcome.outcome)
        self._status.update(last_job=outcome)
        logger.info(
            "job %s used %.1f Wh (%s)",
            outcome.job_id,
            entry.energy_millijoules / 3_600_000,
            entry.energy_source,
        )

    def _job_status_changed(self, job: JobRun) -> None:
        if self.current is job:
            self._status.update(job=job.status)

    def _tidy_later(self, job_id: str) -> None:
        running = frozenset(job.lease.job_id for job in self.live)
        self._tasks.spawn(asyncio.to_thread(self._workspace.tidy_job, job_id, running), name=f"tidy-{job_id}")
