"""Reports from nodes in the database: progress, checkpoints, results and failures, each for a lease.

A report is identified by (job id, lease id): one that does not match the job's current lease changes
nothing. Every state change commits together with its ledger entries and its event, in one
transaction, so a coordinator killed at any instant restarts consistent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from compute_swarm import protocol
from compute_swarm.coordinator.domain import lifecycle
from compute_swarm.coordinator.domain.lifecycle import HELD_STATES, LEASED, STOPPED_EARLY
from compute_swarm.coordinator.service import batch, provenance, trials
from compute_swarm.coordinator.service.adapter_check import AdapterRejected, check_adapter
from compute_swarm.coordinator.service.catalogue import Catalogue
from compute_swarm.coordinator.service.leases import current_job
from compute_swarm.coordinator.service.tokens import TokenCounter, TokenCounters
from compute_swarm.coordinator.service.verifier import Verifier
from compute_swarm.coordinator.settings import Settings
from compute_swarm.coordinator.store import ledger
from compute_swarm.coordinator.store.artifacts import ArtifactStore
from compute_swarm.coordinator.store.database import Database
from compute_swarm.coordinator.store.job_changes import change
from compute_swarm.coordinator.store.job_events import record as record_event
from compute_swarm.coordinator.store.tables import Job, JobProgressPoint, Node, Upload
from compute_swarm.engine.jobs import InferenceJobSpec
from compute_swarm.protocol import finite_or_none

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterVerdict:
    """What the coordinator found of a delivered llama.cpp adapter: checked (offered from now on),
    rejected (the result is refused), or neither (unchecked: the result stands, the adapter is not
    offered)."""

    checked: bool
    rejected: bool = False
    reason: str = ""


class Reports:
    def __init__(
        self,
        database: Database,
        settings: Settings,
        store: ArtifactStore,
        verifier: Verifier,
        *,
        model_file: Callable[[str], Path],
        tokens: TokenCounters | None = None,
        catalogue: Catalogue | None = None,
    ):
        self.database = database
        self.catalogue = catalogue or Catalogue(database)
        self.settings = settings
        self.store = store
        self.verifier = verifier
        # A catalogue model's verified file: delivered adapters are checked against it.
        self.model_file = model_file
        # Each model's tokenizer: a batch's answers are charged the tokens counted with it.
        self.tokens = tokens

    def progress(self, node_id: str, report: protocol.JobProgress) -> str | None:
        """Record a node's report; the reason the node must stop the job, if it must."""
        with self.database.transaction() as session:
            job = current_job(session, node_id, report.job_id, report.lease_id)
            if job is None:
                # A trial stopped when its checkpoint arrived hears why in answer to its next report.
                ended = session.get(Job, report.job_id)
                stopped = ended is not None and ended.error_kind == STOPPED_EARLY
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
            job = current_job(session, node_id, report.job_id, report.lease_id)
            if job is None:
                return self._stale(session, report, "checkpoint")
            problem = _check_upload(session, node_id, job, "checkpoint", report.sha256)
            max_steps = job.max_steps
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
            job = current_job(session, node_id, report.job_id, report.lease_id)
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
            if report.offload is not None:  # the node's report of where a batch's model ran
                job.metrics["offload"] = report.offload.model_dump() | {
                    "description": report.offload.describe()
                }
            price_micro = job.price_micro
            if job.kind == "inference":
                assert usage is not None
                price_micro = batch.price_micro(self.catalogue.get(job.base_model), usage, job.price_micro)
                job.metrics |= {
                    "prompt_tokens": usage.prompt_tokens,
                    "completion_tokens": usage.completion_tokens,
                }
                record_event(
                    session,
                    job,
                    f"{usage.prompt_tokens} prompt and {usage.completion_tokens} completion tokens: "
                    f"{ledger.format_credits(price_micro)} of the {ledger.format_credits(job.price_micro)} "
                    "credits held",
                )
            node = session.get(Node, node_id)
            if node is not None:
                node.jobs_completed += 1
            built_on = provenance.foreign_base(session, job) if job.verifies_job_id is None else None
            accepted = lifecycle.ResultAccepted(
                time.time(),
                node_id,
                price_micro,
                self.settings.platform_fee_basis_points,
                held_for_verification=built_on is not None,
            )
            change(session, job, accepted)
            if job.verifies_job_id is not None:
                # A verification re-run: the platform pays for it, and it settles the job it checks.
                self.verifier.conclude(session, job, report, node_id)
            else:
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
            spec = job.submitted_spec
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
            job = current_job(session, node_id, report.job_id, report.lease_id)
            if job is None:
                return self._stale(session, report, "failure")
            change(session, job, lifecycle.FailureReported(time.time(), report.kind, report.message))
            self.verifier.after_attempt(session, job)
            return _ack(report, "failure", True, job.state)

    def _stale(self, session: Session, report: Any, about: str) -> protocol.Acknowledged:
        job = session.get(Job, report.job_id)
        state = job.state if job is not None else "unknown"
        return _ack(report, about, False, state, "not the job's current lease: nothing changed")


def _running(session: Session, job: Job, node_id: str) -> dict[str, Any]:
    """The job's progress before this report; the lease's first report marks the job running. A sweep
    trial's progress keeps the checkpoint step its lease started from: a trial stopped early is paid
    only for the steps after it (trials.checked_work)."""
    if job.state == LEASED:
        change(session, job, lifecycle.Started(time.time(), node_id))
        if job.sweep_id is not None:
            job.progress = {trials.RESUMED_FROM_STEP: job.checkpoint_step}
    return job.progress or {}


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
    max_steps = job.max_steps
    if max_steps is not None and report.steps != max_steps:
        return f"the job takes {max_steps} steps, not {report.steps}"
    if report.steps < max(1, job.checkpoint_step):
        return f"{report.steps} steps is fewer than the job's checkpoint at step {job.checkpoint_step}"
    return None


def _ack(report: Any, about: str, accepted: bool, state: str, message: str = "") -> protocol.Acknowledged:
    return protocol.Acknowledged(
        job_id=report.job_id,
        lease_id=report.lease_id,
        about=about,
        accepted=accepted,
        state=state,
        message=message,
    )
