"""Jobs in the database: submission, leases, reports from nodes, settlement.

Every state change commits together with its ledger entries and its event, in one transaction, so a
coordinator killed at any instant restarts consistent. Reports from nodes are identified by
(job id, lease id): one that does not match the job's current lease changes nothing.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from compute_swarm import protocol
from compute_swarm.coordinator import accounts, batch, ledger, lifecycle, pricing, provenance, trials
from compute_swarm.coordinator.adapter_check import AdapterRejected, check_adapter
from compute_swarm.coordinator.artifacts import ArtifactStore
from compute_swarm.coordinator.database import Database
from compute_swarm.coordinator.inference import InferenceError, resolve_model
from compute_swarm.coordinator.job_events import record as record_event
from compute_swarm.coordinator.lifecycle import (
    CANCELLED,
    COMPLETED,
    FAILED,
    HELD_STATES,
    LEASED,
    OPEN_STATES,
    QUEUED,
    RUNNING,
    VERIFYING,
)
from compute_swarm.coordinator.scheduler import QueuedJob, inference_memory_bytes, required_memory_bytes
from compute_swarm.coordinator.settings import Settings
from compute_swarm.coordinator.tables import Artifact, Buyer, File, Job, JobProgressPoint, Node, Sweep, Upload
from compute_swarm.coordinator.tokens import TokenCounter, TokenCounters
from compute_swarm.coordinator.verification import is_trusted
from compute_swarm.coordinator.verifier import Verifier, node_record
from compute_swarm.engine.catalogue import fetch_catalogue_model
from compute_swarm.engine.jobs import CATALOGUE, InferenceJobSpec, LoraJobSpec, parse_job_spec
from compute_swarm.protocol import finite_or_none

logger = logging.getLogger(__name__)


class JobError(Exception):
    """A request about a job that cannot be met; status_code is the HTTP answer. `fields` names the
    spec fields at fault, each with its problem, so a form can show each next to its field."""

    def __init__(self, message: str, status_code: int = 400, fields: dict[str, str] | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.fields = fields or {}


@dataclass(frozen=True)
class Quote:
    """What a job would cost and need, before it is submitted."""

    spec: LoraJobSpec | InferenceJobSpec
    base_model: str
    dataset: File
    price_micro: int
    required_memory_bytes: int
    required_memory_bytes_16bit: int
    input_adapter_sha256: str | None


@dataclass(frozen=True)
class Grant:
    """A lease just granted: what the node needs to start."""

    node_id: str
    message: protocol.Lease
    queued_at: float


@dataclass(frozen=True)
class Revocation:
    """A lease that ended while a node may still be working on it: tell the node to stop."""

    node_id: str
    job_id: str
    lease_id: str
    reason: str


@dataclass(frozen=True)
class EarningsHistory:
    """A node's earnings now and what it was credited for work, per UTC hour, since `since`."""

    earnings: protocol.Earnings
    since: int  # the start of the first hour in the window, epoch seconds
    hourly: list[tuple[int, int]]  # (hour start, micro-credits credited), ascending; empty hours left out
    total_credited_micro: int  # all time


@dataclass(frozen=True)
class AdapterVerdict:
    """What the coordinator found of a delivered llama.cpp adapter: checked (offered from now on),
    rejected (the result is refused), or neither (unchecked: the result stands, the adapter is not
    offered)."""

    checked: bool
    rejected: bool = False
    reason: str = ""


# Verification re-runs read besides the oldest queued jobs at each dispatch (see JobService.queued).
RERUNS_PER_DISPATCH = 256


def new_lease_id() -> str:
    return f"lease_{secrets.token_hex(8)}"


class JobService:
    def __init__(
        self,
        database: Database,
        settings: Settings,
        store: ArtifactStore | None = None,
        *,
        verification_draw: Callable[[], float] | None = None,
        model_file: Callable[[str], Path] = fetch_catalogue_model,
        tokens: TokenCounters | None = None,
    ):
        self.database = database
        self.settings = settings
        self.store = store or ArtifactStore(settings.artifacts_dir)
        # A catalogue model's verified file: delivered adapters are checked against it.
        self.model_file = model_file
        # Each model's tokenizer: a batch's answers are charged the tokens counted with it.
        self.tokens = tokens
        self.verifier = Verifier(
            settings, self.store, **({"draw": verification_draw} if verification_draw else {}), tokens=tokens
        )

    # ---- buyers

    def submit(
        self, buyer_id: str, spec_data: Any, max_attempts: int | None, *, model_suffix: str | None = None
    ) -> Job:
        """Queue a LoRA fine-tune (the default type) or a batch inference job, holding its price."""
        attempts = self.attempts(max_attempts)
        spec = parse_spec(spec_data)
        with self.database.transaction() as session:
            return self.queue_in(session, buyer_id, spec, attempts, model_suffix=model_suffix)

    def attempts(self, max_attempts: int | None) -> int:
        attempts = max_attempts if max_attempts is not None else self.settings.default_max_attempts
        if not 1 <= attempts <= 20:
            raise JobError("max_attempts must be between 1 and 20", 422, {"max_attempts": "1 to 20"})
        return attempts

    def queue_in(
        self,
        session: Session,
        buyer_id: str,
        spec: LoraJobSpec | InferenceJobSpec,
        attempts: int,
        *,
        model_suffix: str | None = None,
        sweep_id: str | None = None,
        sweep_parameters: dict | None = None,
        price_cap_micro: int | None = None,
    ) -> Job:
        """Queue one job in the caller's transaction, holding its price (at most price_cap_micro)."""
        # One submission at a time per buyer reads and spends the balance (PostgreSQL runs
        # transactions side by side; SQLite's BEGIN IMMEDIATE serializes them anyway). Locked
        # first, before the job row's foreign key takes a weaker lock on it.
        session.scalar(select(Buyer.id).where(Buyer.id == buyer_id).with_for_update())
        quote = _quote(session, buyer_id, spec)
        if price_cap_micro is not None and quote.price_micro > price_cap_micro:
            raise JobError(
                f"this costs {ledger.format_credits(quote.price_micro)} credits, more than the "
                f"{ledger.format_credits(price_cap_micro)} allowed",
                422,
            )
        now = time.time()
        job = Job(
            id=accounts.new_id("job"),
            buyer_id=buyer_id,
            kind=spec.type,
            spec=spec.model_dump(mode="json", exclude_none=isinstance(spec, InferenceJobSpec)),
            base_model=quote.base_model,
            dataset_sha256=quote.dataset.sha256,
            dataset_size=quote.dataset.size,
            dataset_lines=quote.dataset.lines,
            required_memory_bytes=quote.required_memory_bytes,
            required_memory_bytes_16bit=quote.required_memory_bytes_16bit,
            price_micro=quote.price_micro,
            state=QUEUED,
            attempt=0,
            max_attempts=attempts,
            queued_at=now,
            excluded_nodes=[],
            input_adapter_sha256=quote.input_adapter_sha256,
            model_suffix=model_suffix,
            sweep_id=sweep_id,
            sweep_parameters=sweep_parameters,
            created_at=now,
            updated_at=now,
        )
        session.add(job)
        session.flush()
        try:
            ledger.hold_in_escrow(session, buyer_id, job.id, quote.price_micro)
        except ledger.InsufficientCredits as error:
            raise JobError(str(error), 402) from None
        record_event(
            session, job, f"submitted; {ledger.format_credits(quote.price_micro)} credits held in escrow"
        )
        return job

    def submit_sweep(self, buyer_id: str, spec_data: Any) -> tuple[Sweep, list[Job]]:
        """Queue a sweep's trials, all of them or (a trial refused, a cap passed) none."""
        spec = trials.parse(spec_data)
        specs = trials.trial_specs(spec)
        with self.database.transaction() as session:
            sweep = Sweep(
                id=accounts.new_id("sweep"),
                buyer_id=buyer_id,
                spec=spec.model_dump(mode="json"),
                created_at=time.time(),
            )
            session.add(sweep)
            session.flush()
            queued: list[Job] = []
            for number, (data, values) in enumerate(specs, 1):
                settings = ", ".join(f"{name}={value}" for name, value in values.items())
                try:
                    queued.append(
                        self.queue_in(
                            session,
                            buyer_id,
                            parse_spec(data),
                            self.attempts(None),
                            model_suffix=f"trial{number}",
                            sweep_id=sweep.id,
                            sweep_parameters=values,
                            price_cap_micro=spec.max_price_per_trial_micro,
                        )
                    )
                except JobError as error:
                    raise trials.SweepError(
                        f"trial {number} ({settings}): {error}", error.status_code
                    ) from None
            total = sum(trial.price_micro for trial in queued)
            if spec.max_total_price_micro is not None and total > spec.max_total_price_micro:
                raise trials.SweepError(
                    f"the {len(queued)} trials cost {ledger.format_credits(total)} credits, more than the "
                    f"{ledger.format_credits(spec.max_total_price_micro)} allowed in total"
                )
            return sweep, queued

    def quote(self, buyer_id: str, spec_data: Any) -> tuple[Quote, int]:
        """What submitting this spec would hold, and the buyer's available balance, changing nothing."""
        spec = parse_spec(spec_data)
        with self.database.reading() as session:
            return _quote(session, buyer_id, spec), ledger.balance(session, ledger.buyer_account(buyer_id))

    def cancel(self, job_id: str) -> tuple[Job, Revocation | None]:
        """Cancel a job (its owner was checked by the caller) and refund its escrow."""
        with self.database.transaction() as session:
            job = _locked_job(session, job_id)
            if job is None:
                raise JobError(f"no job {job_id!r}", 404)
            if job.state not in OPEN_STATES:
                raise JobError(f"job {job_id} is {job.state} already", 409)
            if job.verifies_job_id is not None:
                raise JobError(
                    f"job {job_id} verifies job {job.verifies_job_id} and cannot be cancelled", 409
                )
            revocation = (
                Revocation(job.node_id, job.id, job.lease_id, "the buyer cancelled the job")
                if job.state in HELD_STATES and job.node_id and job.lease_id
                else None
            )
            self._finish(session, job, CANCELLED, "cancelled by the buyer", refund=True)
            return job, revocation

    # ---- scheduling

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
        return [
            QueuedJob(
                job_id=row.id,
                base_model=row.base_model,
                required_memory_bytes=row.required_memory_bytes,
                required_memory_bytes_16bit=row.required_memory_bytes_16bit,
                queued_at=row.queued_at,
                excluded_nodes=frozenset(row.excluded_nodes or ()),
                inference=row.kind == "inference",
                verification=row.verifies_job_id is not None,
            )
            for row in rows
        ]

    def lease(self, assignments: Iterable[tuple[str, str]]) -> list[Grant]:
        """Lease each (job id, node id) whose job is still queued, all in one transaction."""
        now = time.time()
        grants = []
        assignments = list(assignments)
        with self.database.transaction() as session:
            jobs = {
                job.id: job
                for job in session.scalars(
                    select(Job).where(Job.id.in_([job_id for job_id, _ in assignments])).with_for_update()
                )
            }
            for job_id, node_id in assignments:
                job = jobs.get(job_id)
                if job is None or job.state != QUEUED:
                    continue
                job.state = LEASED
                job.attempt += 1
                job.node_id = node_id
                job.lease_id = new_lease_id()
                job.lease_expires_at = now + self.settings.lease_seconds
                job.updated_at = now
                record_event(
                    session, job, f"leased to {node_id} (attempt {job.attempt} of {job.max_attempts})"
                )
                start_over = provenance.reason_to_start_over(session, job, node_id)
                if start_over is not None:
                    job.checkpoint_sha256, job.checkpoint_step = None, 0
                    record_event(session, job, start_over)
                job.resumed_from_sha256 = job.checkpoint_sha256
                grants.append(
                    Grant(node_id=node_id, message=self._lease_message(session, job), queued_at=job.queued_at)
                )
        return grants

    def _lease_message(self, session: Session, job: Job) -> protocol.Lease:
        # The node receives the dataset (and a fine-tuned model's adapter) as artifacts to fetch: never
        # the buyer's file id, name or model id. With each, its stored size: the node downloads no more.
        spec = {**job.spec, "base_model": job.base_model, "dataset": job.dataset_sha256}
        evaluate_result_sha256 = job.delivered_result_sha256 if job.kind == "lora" else None
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
            adapter_sha256=job.input_adapter_sha256,
            adapter_size=_artifact_size(session, job.input_adapter_sha256),
            evaluate_result_sha256=evaluate_result_sha256,
            evaluate_result_size=_artifact_size(session, evaluate_result_sha256),
            lease_seconds=self.settings.lease_seconds,
        )

    # ---- leases: renewal, loss, recovery

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

    def expire_leases(self) -> list[Revocation]:
        with self.database.transaction() as session:
            jobs = session.scalars(
                select(Job)
                .where(Job.state.in_(HELD_STATES), Job.lease_expires_at < time.time())
                .with_for_update()
            ).all()
            stalled_since = time.time() - self.settings.lease_progress_seconds
            return [
                self._lose_lease(
                    session,
                    job,
                    f"no progress for {self.settings.lease_progress_seconds:.0f} s"
                    if job.updated_at < stalled_since
                    else "the lease expired",
                )
                for job in jobs
            ]

    def _lose_lease(self, session: Session, job: Job, reason: str) -> Revocation:
        revocation = Revocation(job.node_id or "", job.id, job.lease_id or "", reason)
        outcome = lifecycle.after_lost_lease(job.attempt, job.max_attempts, reason)
        self._apply(session, job, outcome)
        return revocation

    def adopt(
        self, node_id: str, running: Iterable[protocol.LeaseReference]
    ) -> tuple[list[str], list[Revocation]]:
        """A node (re)connected saying what it is running. Returns the leases it may keep, and the ones
        it must stop. Jobs leased to it that it does not mention are queued again."""
        claimed = {reference.lease_id: reference.job_id for reference in running}
        kept, revoked = [], []
        with self.database.transaction() as session:
            for lease_id, job_id in claimed.items():
                job = _locked_job(session, job_id)
                if (
                    job is not None
                    and job.lease_id == lease_id
                    and job.node_id == node_id
                    and job.state in HELD_STATES
                ):
                    if job.updated_at > time.time() - self.settings.lease_progress_seconds:
                        job.lease_expires_at = time.time() + self.settings.lease_seconds
                    kept.append(lease_id)
                else:
                    revoked.append(Revocation(node_id, job_id, lease_id, "this lease is no longer valid"))
            forgotten = session.scalars(
                select(Job)
                .where(
                    Job.node_id == node_id,
                    Job.state.in_(HELD_STATES),
                    Job.lease_id.not_in(list(claimed) or [""]),
                )
                .with_for_update()
            ).all()
            for job in forgotten:
                self._lose_lease(session, job, "the node reconnected without it")
        return kept, revoked

    def return_lease(self, job_id: str, lease_id: str) -> None:
        """A lease that never reached its node goes back to the queue; the attempt does not count."""
        with self.database.transaction() as session:
            job = _locked_job(session, job_id)
            if job is not None and job.lease_id == lease_id and job.state in HELD_STATES:
                outcome = lifecycle.AttemptOutcome(
                    QUEUED, "the node left before its lease arrived", attempt_counts=False
                )
                self._apply(session, job, outcome)

    def recover_after_restart(self) -> int:
        """At start-up: give nodes one lease period to reconnect and claim the jobs they still run."""
        with self.database.transaction() as session:
            result = session.execute(
                update(Job)
                .where(Job.state.in_(HELD_STATES))
                .values(lease_expires_at=time.time() + self.settings.restart_grace_seconds)
            )
            return result.rowcount or 0

    # ---- reports from nodes

    def progress(self, node_id: str, report: protocol.JobProgress) -> str | None:
        """Record a node's report; the reason the node must stop the job, if it must."""
        with self.database.transaction() as session:
            job = self._current(session, node_id, report.job_id, report.lease_id)
            if job is None:
                # A trial stopped when its checkpoint arrived hears why in answer to its next report.
                ended = session.get(Job, report.job_id)
                stopped = ended is not None and ended.error_kind == trials.STOPPED_EARLY
                if stopped and ended.node_id == node_id and ended.error_message:
                    return ended.error_message
                return "this lease is no longer valid"
            now = time.time()
            previous = _running(session, job, node_id)
            latest = report.model_dump(mode="json", exclude={"type", "job_id", "lease_id", "learning_rate"})
            if trials.RESUMED_FROM_STEP in previous:
                latest[trials.RESUMED_FROM_STEP] = previous[trials.RESUMED_FROM_STEP]
            job.progress = latest
            loss, eval_loss = finite_or_none(report.loss), finite_or_none(report.eval_loss)
            # Nodes repeat the latest held-out loss on every report: it is a new point only when it changes.
            if eval_loss is not None and eval_loss == previous.get("eval_loss"):
                eval_loss = None
            if report.step != previous.get("step") and (loss is not None or eval_loss is not None):
                session.add(
                    JobProgressPoint(
                        job_id=job.id,
                        attempt=job.attempt,
                        step=report.step,
                        loss=loss,
                        eval_loss=eval_loss,
                        at=now,
                    )
                )
            # Only a new step is progress, and renews the lease: a stalled lease is lost (see renew).
            if report.step > previous.get("step", -1):
                job.updated_at = now
                job.lease_expires_at = now + self.settings.lease_seconds
            if job.sweep_id is not None and eval_loss is not None:
                session.flush()  # the point just added counts for the other trials, not against this one
                return trials.after_evaluation(
                    session, job, report.step, eval_loss, self.settings, self.verifier
                )
            return None

    def checkpoint(self, node_id: str, report: protocol.CheckpointUploaded) -> protocol.Acknowledged:
        with self.database.transaction() as session:
            job = self._current(session, node_id, report.job_id, report.lease_id)
            if job is None:
                return self._stale(session, report, "checkpoint")
            problem = _check_upload(session, node_id, job, "checkpoint", report.sha256)
            max_steps = job.spec.get("max_steps")
            if not problem and max_steps is not None and report.step > max_steps:
                problem = f"step {report.step} is past the job's {max_steps} steps"
            if problem:
                return _ack(report, "checkpoint", False, job.state, problem)
            _running(session, job, node_id)
            if report.step > job.checkpoint_step:
                provenance.record(session, job, node_id, report.sha256, report.step)
                job.checkpoint_sha256 = report.sha256
                job.checkpoint_step = report.step
                job.updated_at = time.time()
                record_event(session, job, f"checkpoint at step {report.step}")
                if job.sweep_id is not None:
                    stopped = trials.after_checkpoint(session, job, report.step, self.settings, self.verifier)
                    if stopped is not None:
                        return _ack(report, "checkpoint", True, job.state, stopped)
            return _ack(report, "checkpoint", True, job.state)

    def result(self, node_id: str, report: protocol.JobResult) -> protocol.Acknowledged:
        # A batch's completions are read before the transaction: reading a file must not hold the
        # write lock. The archive is content-addressed, so what is read is what the report names.
        usage, usage_problem = self._batch_usage(node_id, report)
        adapter = self._adapter_verdict(node_id, report)
        with self.database.transaction() as session:
            job = self._current(session, node_id, report.job_id, report.lease_id)
            if job is None:
                return self._stale(session, report, "result")
            problem = _check_result(session, node_id, job, report)
            if not problem and job.kind == "inference" and usage is None:
                # Read before this lease was visible (it is checked first): counted on the next report.
                problem = usage_problem or "the result was not counted yet: report it again"
            if not problem and report.gguf_sha256 is not None and adapter is None:
                problem = "the adapter was not checked yet: report it again"
            if not problem and adapter is not None and adapter.rejected:
                problem = f"the llama.cpp adapter is refused: {adapter.reason}"
            if problem:
                return _ack(report, "result", False, job.state, problem)
            job.result_sha256 = report.sha256
            job.result_gguf_sha256 = report.gguf_sha256 if adapter is not None and adapter.checked else None
            if adapter is not None and not adapter.checked:
                record_event(session, job, f"its llama.cpp adapter is not offered: {adapter.reason}"[:500])
            job.metrics = {
                "steps": report.steps,
                "final_loss": finite_or_none(report.final_loss),
                "eval_loss": finite_or_none(report.eval_loss),
                "train_tokens": report.train_tokens,
                "seconds": report.seconds,
            }
            if job.kind == "inference":
                assert usage is not None
                held = job.price_micro
                job.price_micro = batch.price_micro(CATALOGUE[job.base_model], usage, held)
                job.metrics |= {
                    "prompt_tokens": usage.prompt_tokens,
                    "completion_tokens": usage.completion_tokens,
                }
                record_event(
                    session,
                    job,
                    f"{usage.prompt_tokens} prompt and {usage.completion_tokens} completion tokens: "
                    f"{ledger.format_credits(job.price_micro)} of the {ledger.format_credits(held)} credits held",
                )
            node = session.get(Node, node_id)
            if node is not None:
                node.jobs_completed += 1
            if job.verifies_job_id is not None:
                # A verification re-run: the platform pays for it, and it settles the job it checks.
                self._finish(session, job, COMPLETED, f"completed on {node_id}", refund=False)
                self.verifier.conclude(session, job, report, node_id)
                return _ack(report, "result", True, job.state)
            node_share, fee = pricing.split_payment(job.price_micro, self.settings.platform_fee_basis_points)
            # A batch held its most possible price: what it did not use goes back to the buyer.
            refund_to = job.buyer_id if job.kind == "inference" else None
            ledger.charge(session, job.id, node_id, node_share, fee, buyer_id=refund_to)
            built_on = provenance.foreign_base(session, job)
            if built_on is not None:
                message = (
                    f"completed on {node_id}, from a checkpoint another node made: its result is held "
                    f"until a trusted node verifies it"
                )
                self._finish(session, job, VERIFYING, message, refund=False)
            else:
                self._finish(session, job, COMPLETED, f"completed on {node_id}", refund=False)
            self.verifier.after_completion(session, job, built_on)
            return _ack(report, "result", True, job.state)

    def _adapter_verdict(self, node_id: str, report: protocol.JobResult) -> AdapterVerdict | None:
        """A LoRA result's llama.cpp adapter, checked against its base model before anyone is offered
        it (other sellers' llama.cpp loads it, buyers download it). Read outside the transaction and
        only for the node's current lease, as a batch's archive is. None: nothing to check (yet)."""
        if report.gguf_sha256 is None:
            return None
        with self.database.reading() as session:
            job = session.get(Job, report.job_id)
            if job is None or job.lease_id != report.lease_id or job.node_id != node_id:
                return None  # the transaction answers it as stale
            if job.state not in HELD_STATES or _check_result(session, node_id, job, report):
                return None  # the transaction says why
            base_model = job.base_model
        try:
            base_file = self.model_file(base_model)
        except Exception as error:  # the coordinator cannot fetch the base model now
            return AdapterVerdict(
                checked=False, reason=f"the coordinator could not read {base_model}: {error}"
            )
        try:
            check_adapter(self.store.blob_path(report.gguf_sha256), base_file)
        except AdapterRejected as error:
            return AdapterVerdict(checked=False, rejected=True, reason=str(error))
        return AdapterVerdict(checked=True)

    def _batch_usage(
        self, node_id: str, report: protocol.JobResult
    ) -> tuple[batch.BatchUsage | None, str | None]:
        """For a batch inference job's result: the tokens it is charged for, or why it cannot count.
        Nothing is read unless the report is the node's current lease's and names a result it uploaded
        for that lease: else any node could make the coordinator parse any stored blob."""
        with self.database.reading() as session:
            job = session.get(Job, report.job_id)
            if job is None or job.kind != "inference":
                return None, None
            if job.lease_id != report.lease_id or job.node_id != node_id or job.state not in HELD_STATES:
                return None, None  # the transaction answers it as stale
            problem = _check_result(session, node_id, job, report)
            if problem:
                return None, problem
            spec = parse_job_spec(job.spec)
            assert isinstance(spec, InferenceJobSpec)
            max_tokens, lines, dataset_size = spec.sampling.max_tokens, job.dataset_lines, job.dataset_size
            base_model, prompts = job.base_model, job.dataset_sha256
        if not self.store.has(report.sha256):
            return None, "upload the result for this lease before reporting it"
        counter = self.tokens.get(base_model) if self.tokens is not None else None
        try:
            usage = batch.count_usage(
                self.store.blob_path(report.sha256),
                lines=lines or 0,
                max_tokens=max_tokens,
                dataset_bytes=dataset_size,
                count_tokens=counter.count if counter is not None else None,
                prompt_tokens=self._prompt_tokens(prompts, counter) if counter is not None else None,
            )
        except batch.BatchResultError as error:
            return None, str(error)
        return usage, None

    def _prompt_tokens(self, prompts_sha256: str, counter: TokenCounter) -> int | None:
        """A batch's prompt tokens as the model reads them, counted here; None if they cannot be."""
        try:
            return batch.count_prompt_tokens(self.store.blob_path(prompts_sha256), counter)
        except (OSError, ValueError) as error:  # UnicodeDecodeError and a bad line are ValueErrors
            logger.warning("the prompts %s could not be counted: %s", prompts_sha256, error)
            return None

    def failure(self, node_id: str, report: protocol.JobFailure) -> protocol.Acknowledged:
        with self.database.transaction() as session:
            job = self._current(session, node_id, report.job_id, report.lease_id)
            if job is None:
                return self._stale(session, report, "failure")
            outcome = lifecycle.after_failure(
                report.kind,
                report.message,
                job.attempt,
                job.max_attempts,
                invalid_before=job.error_kind == "invalid_spec",
            )
            job.error_kind = report.kind
            self._apply(session, job, outcome)
            return _ack(report, "failure", True, job.state)

    def earnings(self, node_id: str) -> protocol.Earnings:
        with self.database.reading() as session:
            return _earnings(session, node_id)

    def earnings_history(self, node_id: str, days: int, now: float | None = None) -> EarningsHistory:
        """The last `days` days of a node's credits for work, hour by hour, beside its balances: read
        in one session, so the hours, the total and the balances agree."""
        since = ledger.hour_start((time.time() if now is None else now) - days * 86_400)
        accounts = ledger.node_accounts(node_id)
        with self.database.reading() as session:
            return EarningsHistory(
                earnings=_earnings(session, node_id),
                since=since,
                hourly=ledger.hourly_credits(session, accounts, since),
                total_credited_micro=ledger.total_credited(session, accounts),
            )

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
            return self._current(session, node_id, job_id, lease_id) is not None

    def mark_seen(self, node_ids: Iterable[str]) -> None:
        node_ids, now = list(node_ids), time.time()
        with self.database.transaction() as session:
            for start in range(0, len(node_ids), 500):
                session.execute(
                    update(Node).where(Node.id.in_(node_ids[start : start + 500])).values(last_seen_at=now)
                )

    def revoked_nodes(self, node_ids: Iterable[str]) -> list[str]:
        node_ids = list(node_ids)
        revoked: list[str] = []
        with self.database.reading() as session:
            for start in range(0, len(node_ids), 500):
                revoked += session.scalars(
                    select(Node.id).where(
                        Node.id.in_(node_ids[start : start + 500]), Node.revoked_at.is_not(None)
                    )
                ).all()
        return revoked

    def release_due_credits(self, now: float | None = None) -> int:
        """Release the pending credit of jobs whose verification window passed."""
        with self.database.transaction() as session:
            return self.verifier.release_due(session, time.time() if now is None else now)

    def standing(self) -> tuple[set[str], dict[str, protocol.Standing]]:
        """The nodes that may verify others (trusted), and those barred from work, each with why, as
        its seller is told (waiting for ops' approval, or quarantined): few, read in one query."""
        trusted: set[str] = set()
        barred: dict[str, protocol.Standing] = {}
        policy = self.verifier.policy
        with self.database.reading() as session:
            for node in session.scalars(
                select(Node).where(
                    Node.revoked_at.is_(None),
                    Node.trusted | Node.quarantined_at.is_not(None) | Node.approved_at.is_(None),
                )
            ):
                record = node_record(node, policy)
                if node.approved_at is None:
                    barred[node.id] = protocol.Standing(
                        state="awaiting_approval",
                        reason="the swarm operator approves each new computer before it gets work; it "
                        "stays connected and takes jobs as soon as they do",
                    )
                elif record.quarantined:
                    times = f" ({node.mismatches} times)" if node.mismatches > 1 else ""
                    barred[node.id] = protocol.Standing(
                        state="quarantined",
                        reason=f"this computer's results did not match trusted re-runs of the same "
                        f"jobs{times}; it gets no work until the swarm operator looks into it and lifts "
                        f"the quarantine",
                    )
                elif is_trusted(record, policy):
                    trusted.add(node.id)
        return trusted, barred

    def counts(self) -> dict[str, int]:
        with self.database.reading() as session:
            rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        return {state: count for state, count in rows}

    # ---- helpers

    def _current(self, session: Session, node_id: str, job_id: str, lease_id: str) -> Job | None:
        job = _locked_job(session, job_id)
        if job is None or job.lease_id != lease_id or job.node_id != node_id or job.state not in HELD_STATES:
            return None
        return job

    def _stale(self, session: Session, report: Any, about: str) -> protocol.Acknowledged:
        job = session.get(Job, report.job_id)
        state = job.state if job is not None else "unknown"
        return _ack(report, about, False, state, "not the job's current lease: nothing changed")

    def _apply(self, session: Session, job: Job, outcome: lifecycle.AttemptOutcome) -> None:
        if outcome.exclude_node and job.node_id and job.node_id not in job.excluded_nodes:
            job.excluded_nodes = [*job.excluded_nodes, job.node_id]
        if not outcome.attempt_counts:
            job.attempt -= 1
        if outcome.state == FAILED:
            job.error_message = outcome.message
            job.error_kind = job.error_kind or "attempts_exhausted"
            self._finish(session, job, FAILED, outcome.message, refund=True)
            return
        job.state = QUEUED
        job.queued_at = job.updated_at = time.time()
        job.node_id = job.lease_id = job.lease_expires_at = None
        job.progress = None
        record_event(session, job, outcome.message)

    def _finish(self, session: Session, job: Job, state: str, message: str, *, refund: bool) -> None:
        if refund and job.verifies_job_id is None:  # a re-run holds nothing
            ledger.refund(session, job.id, job.buyer_id, memo=f"job {state}: {message}"[:500])
        job.state = state
        job.finished_at = job.updated_at = time.time()
        job.lease_id = job.lease_expires_at = None
        record_event(session, job, message)
        if job.verifies_job_id is not None and state != COMPLETED:
            self.verifier.check_failed(session, job)


def parse_spec(spec_data: Any) -> LoraJobSpec | InferenceJobSpec:
    if not isinstance(spec_data, dict):
        raise JobError("spec must be a JSON object", 422)
    try:
        spec = parse_job_spec({"type": "lora", **spec_data})
    except ValidationError as error:
        raise JobError(_describe(error), 422, _fields(error)) from None
    if isinstance(spec, InferenceJobSpec) and spec.adapter is not None:
        raise JobError(
            "adapter is chosen by the model: give base_model an ft: model id instead",
            422,
            {"adapter": "not allowed"},
        )
    if isinstance(spec, LoraJobSpec) and spec.evaluate_adapter is not None:
        raise JobError(
            "evaluate_adapter is set by the coordinator for verification re-runs only",
            422,
            {"evaluate_adapter": "not allowed"},
        )
    if isinstance(spec, LoraJobSpec) and spec.base_model not in CATALOGUE:
        raise JobError(
            f"unknown base_model {spec.base_model!r}; this coordinator offers: {', '.join(sorted(CATALOGUE))}",
            422,
            {"base_model": "not in this coordinator's catalogue"},
        )
    return spec


def _quote(session: Session, buyer_id: str, spec: LoraJobSpec | InferenceJobSpec) -> Quote:
    purpose = "prompts" if isinstance(spec, InferenceJobSpec) else "dataset"
    dataset = session.get(File, spec.dataset)
    if dataset is None or dataset.buyer_id != buyer_id or dataset.purpose != purpose:
        raise JobError(
            f"no {purpose} file {spec.dataset!r}: upload it with purpose {purpose!r} first and give its file id",
            422,
            {"dataset": f"choose one of your {purpose} files"},
        )
    if isinstance(spec, InferenceJobSpec):
        try:
            served = resolve_model(session, buyer_id, spec.base_model)
        except InferenceError as error:
            raise JobError(str(error), 422, {"base_model": str(error)}) from None
        memory = inference_memory_bytes(served.base, served.adapter_size)
        return Quote(
            spec=spec,
            base_model=served.base.name,
            dataset=dataset,
            price_micro=batch.hold_micro(served.base, spec, dataset.size, dataset.lines),
            required_memory_bytes=memory,
            required_memory_bytes_16bit=memory,
            input_adapter_sha256=served.adapter_sha256,
        )
    model = CATALOGUE[spec.base_model]
    try:
        price = pricing.price_micro(spec, model, dataset.lines)
    except ValueError as error:
        raise JobError(str(error), 422) from None
    return Quote(
        spec=spec,
        base_model=model.name,
        dataset=dataset,
        price_micro=price,
        required_memory_bytes=required_memory_bytes(spec, model, backend="cpu"),
        required_memory_bytes_16bit=required_memory_bytes(spec, model, backend="cuda"),
        input_adapter_sha256=None,
    )


def _running(session: Session, job: Job, node_id: str) -> dict[str, Any]:
    """The job's progress before this report; the lease's first report marks the job running. A sweep
    trial's progress keeps the checkpoint step its lease started from: a trial stopped early is paid
    only for the steps after it (trials.checked_work)."""
    if job.state == LEASED:
        job.state = RUNNING
        record_event(session, job, f"running on {node_id}")
        if job.sweep_id is not None:
            job.progress = {trials.RESUMED_FROM_STEP: job.checkpoint_step}
    return job.progress or {}


def _locked_job(session: Session, job_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.id == job_id).with_for_update())


def _artifact_size(session: Session, sha256: str | None) -> int | None:
    artifact = session.get(Artifact, sha256) if sha256 is not None else None
    return artifact.size if artifact is not None else None


def _check_upload(session: Session, node_id: str, job: Job, purpose: str, sha256: str) -> str | None:
    """Why a reported artifact cannot count, or None: it must be bytes this node uploaded for this
    lease, and not one of the job's own inputs handed back."""
    if sha256 in (job.dataset_sha256, job.checkpoint_sha256):
        return f"that {purpose} is one of the job's inputs"
    uploaded = session.scalar(
        select(Upload.id).where(
            Upload.holder == f"node:{node_id}",
            Upload.job_id == job.id,
            Upload.lease_id == job.lease_id,
            Upload.purpose == purpose,
            Upload.sha256 == sha256,
            Upload.completed_at.is_not(None),
        )
    )
    return None if uploaded is not None else f"upload the {purpose} for this lease before reporting it"


def _check_result(session: Session, node_id: str, job: Job, report: protocol.JobResult) -> str | None:
    problem = _check_upload(session, node_id, job, "result", report.sha256)
    if not problem and report.gguf_sha256 is not None:
        problem = _check_upload(session, node_id, job, "adapter", report.gguf_sha256)
    if not problem and job.kind == "inference" and report.gguf_sha256 is not None:
        problem = "a batch inference job delivers completions, not an adapter"
    if problem:
        return problem
    # Work the coordinator can check: a fixed-length job takes exactly its steps, and no job ends
    # before the checkpoint it was resumed from.
    max_steps = job.spec.get("max_steps")
    if max_steps is not None and report.steps != max_steps:
        return f"the job takes {max_steps} steps, not {report.steps}"
    if report.steps < max(1, job.checkpoint_step):
        return f"{report.steps} steps is fewer than the job's checkpoint at step {job.checkpoint_step}"
    return None


def _earnings(session: Session, node_id: str) -> protocol.Earnings:
    node = session.get(Node, node_id)
    return protocol.Earnings(
        pending_micro=ledger.balance(session, ledger.node_pending_account(node_id)),
        available_micro=ledger.balance(session, ledger.node_available_account(node_id)),
        jobs_completed=node.jobs_completed if node else 0,
    )


def _ack(report: Any, about: str, accepted: bool, state: str, message: str = "") -> protocol.Acknowledged:
    return protocol.Acknowledged(
        job_id=report.job_id,
        lease_id=report.lease_id,
        about=about,
        accepted=accepted,
        state=state,
        message=message,
    )


def _fields(error: ValidationError) -> dict[str, str]:
    """Each faulty top-level field with its first problem."""
    fields: dict[str, str] = {}
    for problem in error.errors():
        location = [str(part) for part in problem["loc"] if part not in ("lora", "inference")]
        if location:
            fields.setdefault(location[0], problem["msg"].removeprefix("Value error, "))
    return fields


def _describe(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in problem['loc']) or 'spec'}: {problem['msg'].removeprefix('Value error, ')}"
        for problem in error.errors()
    )
