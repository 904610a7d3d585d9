"""Leases in the database: which jobs wait (for the dispatcher), leasing them to nodes, renewals,
losses and a node's reconnection. A node reads only the inputs of a job it holds now.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import ValidationError
from sqlalchemy import Row, bindparam, func, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from compute_swarm import protocol
from compute_swarm.coordinator.domain import lifecycle, pricing
from compute_swarm.coordinator.domain.effects import StopOnNode, WakeDispatcher
from compute_swarm.coordinator.domain.lifecycle import HELD_STATES, QUEUED
from compute_swarm.coordinator.domain.scheduler import (
    ALL_BACKENDS,
    NodeSnapshot,
    QueuedJob,
    backends_for_quantization,
    download_bytes,
    plan,
)
from compute_swarm.coordinator.service import batch, provenance
from compute_swarm.coordinator.service.catalogue import Catalogue
from compute_swarm.coordinator.service.verifier import Verifier
from compute_swarm.coordinator.settings import Settings
from compute_swarm.coordinator.store.database import Database, withdraw_after_commit
from compute_swarm.coordinator.store.job_changes import change
from compute_swarm.coordinator.store.job_events import record as record_event
from compute_swarm.coordinator.store.tables import Artifact, Job
from compute_swarm.engine.jobs import ContentHash, InferenceJobSpec, LoraJobSpec, relocated


@dataclass(frozen=True)
class Grant:
    """A lease just granted: what the node needs to start."""

    node_id: str
    message: protocol.Lease
    queued_at: float


# Verification re-runs read besides the oldest queued jobs at each dispatch (see Leases.queued).
RERUNS_PER_DISPATCH = 256


def new_lease_id() -> str:
    return f"lease_{secrets.token_hex(8)}"


def work_tokens(job: Job) -> int | None:
    """The tokens the job was priced by (an upper bound), less the steps a checkpoint already took; None
    where they cannot be counted (a spec an older coordinator stored without its line count)."""
    spec = job.submitted_spec
    try:
        if isinstance(spec, InferenceJobSpec):
            lines = job.dataset_lines or 0
            return batch.prompt_token_bound(job.dataset_size, lines) + lines * spec.sampling.max_tokens
        steps = pricing.planned_steps(spec, job.dataset_lines)
        budget = pricing.token_budget(spec, job.dataset_lines)
    except ValueError:
        return None
    return budget * max(steps - job.checkpoint_step, 0) // steps


def wire_spec(job: Job) -> LoraJobSpec[ContentHash] | InferenceJobSpec[ContentHash]:
    """The job's spec as a node reads it: its data named by content hash and its base model by
    catalogue name, never by the buyer's file id, file name or fine-tuned model id. Its adapter is a
    batch's llama.cpp adapter, or the result a verification re-run of a fine-tune evaluates."""
    return relocated(
        job.submitted_spec,
        ContentHash,
        dataset=job.dataset_sha256,
        adapter=job.input_adapter_sha256 if job.kind == "inference" else job.delivered_result_sha256,
        base_model=job.base_model,
    )


class Leases:
    def __init__(
        self, database: Database, settings: Settings, verifier: Verifier, catalogue: Catalogue | None = None
    ):
        self.database = database
        self.settings = settings
        self.verifier = verifier
        self.catalogue = catalogue or Catalogue(database)

    def queued(self, limit: int = 5000) -> list[QueuedJob]:
        """The oldest queued jobs, and besides them the oldest verification re-runs: only trusted nodes
        take those, so a backlog of ordinary jobs must not hide them from the dispatcher."""
        columns = (
            Job.id,
            Job.base_model,
            Job.required_memory_bytes,
            Job.required_memory_bytes_16bit,
            Job.queued_at,
            Job.excluded_nodes,
            Job.kind,
            Job.verifies_job_id,
            Job.spec,
        )
        with self.database.reading() as session:
            rows = session.execute(
                select(*columns).where(Job.state == QUEUED).order_by(Job.queued_at).limit(limit)
            ).all()
            seen = {row.id for row in rows}
            rows += [
                row
                for row in session.execute(
                    select(*columns)
                    .where(Job.state == QUEUED, Job.verifies_job_id.is_not(None))
                    .order_by(Job.queued_at)
                    .limit(RERUNS_PER_DISPATCH)
                ).all()
                if row.id not in seen
            ]
        return [self.queued_job(row) for row in rows]

    def queued_job(self, job: Job | Row) -> QueuedJob:
        """A queued job (its row, or the columns `queued` reads) as the scheduler sees it."""
        return QueuedJob(
            job_id=job.id,
            base_model=job.base_model,
            required_memory_bytes=job.required_memory_bytes,
            required_memory_bytes_16bit=job.required_memory_bytes_16bit,
            queued_at=job.queued_at,
            excluded_nodes=frozenset(job.excluded_nodes or ()),
            inference=job.kind == "inference",
            verification=job.verifies_job_id is not None,
            model_bytes=download_bytes(self.catalogue.get(job.base_model), lora=job.kind == "lora"),
            # A quantized base runs only where bitsandbytes does, unless the buyer allowed 16 bits.
            backends=backends_for_quantization(
                str(job.spec.get("quantization", "none")), bool(job.spec.get("allow_16bit_fallback"))
            )
            if job.kind == "lora"
            else ALL_BACKENDS,
        )

    async def lease(self, assignments: Iterable[tuple[str, str]]) -> list[Grant]:
        """Lease each (job id, node id) whose job is still queued, all in one transaction."""
        assignments = list(assignments)
        # Committed with the submissions of the moment: a busy swarm's leases and submissions share
        # their fsyncs.
        return await self.database.grouped_async(lambda session: self._lease_in(session, assignments))

    def _lease_in(self, session: Session, assignments: list[tuple[str, str]]) -> list[Grant]:
        now = time.time()
        jobs = {
            job.id: job
            for job in session.scalars(
                # Another replica leasing the same job now holds its row: skip it, it is taken.
                select(Job)
                .where(Job.id.in_([job_id for job_id, _ in assignments]))
                .with_for_update(skip_locked=True)
            )
        }
        grants = []
        for job_id, node_id in assignments:
            job = jobs.get(job_id)
            if job is not None and job.state == QUEUED:
                grant = self._lease_one(session, job, node_id, now)
                if grant is not None:
                    grants.append(grant)
        return grants

    def lease_on_submission(self, session: Session, job: Job, node: NodeSnapshot) -> Grant | None:
        """Lease a job just queued, in the transaction that queues it, to the node reserved for it (as
        the node was then), if the job's figures fit it; else it stays queued for the dispatcher."""
        if not plan([self.queued_job(job)], [node], allowed_backends=self.settings.allowed_backends):
            return None
        grant = self._lease_one(session, job, node.node_id, time.time())
        if grant is not None:
            # It starts at once: the dispatcher has nothing to do for it.
            withdraw_after_commit(session, WakeDispatcher())
        return grant

    def _lease_one(self, session: Session, job: Job, node_id: str, now: float) -> Grant | None:
        """Lease a queued job (its row locked, or just made) to a node; None when its spec can no longer
        be sent to any (it fails)."""
        try:
            spec = wire_spec(job)
        except ValidationError as error:
            # Validated when it was submitted: only a spec an older coordinator stored can fail.
            reason = f"its spec can no longer be sent to a node: {error.errors()[0]['msg']}"
            change(session, job, lifecycle.Unsendable(now, reason))
            return None
        change(session, job, lifecycle.Leased(now, node_id, new_lease_id(), self.settings.lease_seconds))
        start_over = provenance.reason_to_start_over(session, job, node_id)
        if start_over is not None:
            job.checkpoint_sha256, job.checkpoint_step = None, 0
            record_event(session, job, start_over)
        if job.resumed_from_sha256 != job.checkpoint_sha256:  # set only when it moves: a flush costs
            job.resumed_from_sha256 = job.checkpoint_sha256
        return Grant(
            node_id=node_id, message=self._lease_message(session, job, spec), queued_at=job.queued_at
        )

    def _lease_message(
        self, session: Session, job: Job, spec: LoraJobSpec[ContentHash] | InferenceJobSpec[ContentHash]
    ) -> protocol.Lease:
        # Each artifact the spec names comes with its stored size: the node downloads no more.
        adapter_sha256 = spec.adapter if isinstance(spec, InferenceJobSpec) else None
        evaluate_result_sha256 = spec.evaluate_adapter if isinstance(spec, LoraJobSpec) else None
        return protocol.Lease(
            job_id=job.id,
            lease_id=job.lease_id,
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            spec=spec,
            dataset_sha256=job.dataset_sha256,
            dataset_size=job.dataset_size,
            checkpoint_sha256=job.checkpoint_sha256,
            checkpoint_size=_artifact_size(session, job.checkpoint_sha256),
            checkpoint_step=job.checkpoint_step,
            adapter_sha256=adapter_sha256,
            adapter_size=_artifact_size(session, adapter_sha256),
            evaluate_result_sha256=evaluate_result_sha256,
            evaluate_result_size=_artifact_size(session, evaluate_result_sha256),
            lease_seconds=self.settings.lease_seconds,
            pay_micro=self._pay_micro(session, job),
            work_tokens=work_tokens(job),
            model=self.catalogue.files(job.base_model, with_weights=job.kind == "lora"),
        )

    def _pay_micro(self, session: Session, job: Job) -> int:
        """What completing the job credits its node: its price less the fee (a batch's most), or for a
        verification re-run what the checked job credited (pay_for_verification pays that)."""
        priced = session.get(Job, job.verifies_job_id) if job.verifies_job_id else job
        price = priced.price_micro if priced is not None else 0
        return pricing.split_payment(price, self.settings.platform_fee_basis_points)[0]

    def renew(self, lease_ids: Iterable[str]) -> None:
        lease_ids = list(lease_ids)
        if not lease_ids:
            return
        now = time.time()
        with self.database.transaction() as session:
            for start in range(0, len(lease_ids), 500):
                session.execute(
                    update(Job)
                    .where(
                        Job.lease_id.in_(lease_ids[start : start + 500]),
                        Job.state.in_(HELD_STATES),
                        # A job that moved lately: a stalled one's lease runs out (expire_leases).
                        Job.updated_at > now - self.settings.lease_progress_seconds,
                    )
                    .values(lease_expires_at=now + self.settings.lease_seconds)
                )

    def expire_leases(self) -> int:
        """Leases that ran out (or whose job stalled) end; their nodes are told to stop once this
        commits. Returns how many."""
        with self.database.transaction() as session:
            jobs = session.scalars(
                select(Job)
                .where(Job.state.in_(HELD_STATES), Job.lease_expires_at < time.time())
                .with_for_update()
            ).all()
            stalled_since = time.time() - self.settings.lease_progress_seconds
            for job in jobs:
                stalled = job.updated_at < stalled_since
                reason = (
                    f"no progress for {self.settings.lease_progress_seconds:.0f} s"
                    if stalled
                    else "the lease expired"
                )
                self._end_attempt(session, job, lifecycle.LeaseLost(time.time(), reason))
            return len(jobs)

    def adopt(
        self, session: Session, node_id: str, running: Iterable[protocol.LeaseReference]
    ) -> tuple[list[str], list[StopOnNode]]:
        """A node (re)connected saying what it is running. Returns the leases it may keep, and the ones
        it must stop (for the caller to tell it, once it is connected). Jobs leased to it that it does
        not mention are queued again. In the caller's transaction (NodeAccounts.greet)."""
        claimed = {reference.lease_id: reference.job_id for reference in running}
        kept, revoked = [], []
        for lease_id, job_id in claimed.items():
            job = locked_job(session, job_id)
            if (
                job is not None
                and job.lease_id == lease_id
                and job.node_id == node_id
                and job.state in HELD_STATES
            ):
                if job.updated_at > time.time() - self.settings.lease_progress_seconds:
                    _extend_lease(session, job, time.time() + self.settings.lease_seconds)
                kept.append(lease_id)
            else:
                revoked.append(StopOnNode(node_id, job_id, lease_id, "this lease is no longer valid"))
        held = session.scalars(_HELD_BY_NODE, {"node_id": node_id}).all()
        for job in (job for job in held if job.lease_id not in claimed):
            lost = lifecycle.LeaseLost(time.time(), "the node reconnected without it", node_may_run_it=False)
            self._end_attempt(session, job, lost)
        return kept, revoked

    def return_lease(self, job_id: str, lease_id: str) -> None:
        """A lease that never reached its node goes back to the queue; the attempt does not count."""
        with self.database.transaction() as session:
            job = locked_job(session, job_id)
            if job is not None and job.lease_id == lease_id and job.state in HELD_STATES:
                change(session, job, lifecycle.LeaseReturned(time.time()))

    def recover_after_restart(self) -> int:
        """At start-up: give nodes one lease period to reconnect and claim the jobs they still run."""
        with self.database.transaction() as session:
            result = session.execute(
                update(Job)
                .where(Job.state.in_(HELD_STATES))
                .values(lease_expires_at=time.time() + self.settings.restart_grace_seconds)
            )
            return result.rowcount or 0

    def may_download(self, node_id: str, sha256: str) -> bool:
        """A node reads only the inputs (dataset, checkpoint, adapter) of a job it holds now."""
        with self.database.reading() as session:
            return (
                session.scalar(
                    select(func.count())
                    .select_from(Job)
                    .where(
                        Job.node_id == node_id,
                        Job.state.in_(HELD_STATES),
                        (Job.dataset_sha256 == sha256)
                        | (Job.checkpoint_sha256 == sha256)
                        | (Job.input_adapter_sha256 == sha256)
                        | (Job.delivered_result_sha256 == sha256),
                    )
                )
                > 0
            )

    def holds_lease(self, node_id: str, job_id: str, lease_id: str) -> bool:
        with self.database.transaction() as session:
            return current_job(session, node_id, job_id, lease_id) is not None

    def counts(self) -> dict[str, int]:
        with self.database.reading() as session:
            rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        return {state: count for state, count in rows}

    def _end_attempt(self, session: Session, job: Job, event: lifecycle.LeaseLost) -> None:
        change(session, job, event)
        self.verifier.after_attempt(session, job)


def current_job(session: Session, node_id: str, job_id: str, lease_id: str) -> Job | None:
    """The job, locked, if `lease_id` is its current lease and `node_id` holds it; else None."""
    job = locked_job(session, job_id)
    if job is None or job.lease_id != lease_id or job.node_id != node_id or job.state not in HELD_STATES:
        return None
    return job


def locked_job(session: Session, job_id: str) -> Job | None:
    return session.scalar(_LOCKED_JOB, {"job_id": job_id})


def _extend_lease(session: Session, job: Job, until: float) -> None:
    """A held job's lease runs until `until`: one plain statement (the ORM's flush of the change cost
    more), and the row's object told the value written."""
    session.connection().execute(_EXTEND_LEASE, {"job_id": job.id, "until": until})
    set_committed_value(job, "lease_expires_at", until)


# Statements every hello (thousands in a reconnect storm) and every report run, built once: building
# one cost more than running it.
_LOCKED_JOB = select(Job).where(Job.id == bindparam("job_id")).with_for_update()
_EXTEND_LEASE = update(Job).where(Job.id == bindparam("job_id")).values(lease_expires_at=bindparam("until"))
_HELD_BY_NODE = (
    select(Job).where(Job.node_id == bindparam("node_id"), Job.state.in_(HELD_STATES)).with_for_update()
)


def _artifact_size(session: Session, sha256: str | None) -> int | None:
    artifact = session.get(Artifact, sha256) if sha256 is not None else None
    return artifact.size if artifact is not None else None
