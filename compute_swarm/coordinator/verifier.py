"""Verification in the database, inside the transactions JobService opens.

When a job completes, it may be sampled (coordinator.verification) for a re-run on a trusted node: a
new job, with no price of its own, that names the job it checks and the result delivered for it. When
the re-run reports, the two are compared and the checked job is settled:
- passed: the job is `verified` and its node's pending credit is released;
- mismatch: the credit is clawed back, the buyer's result is replaced with the trusted one, and the
  node's record falls (quarantine after repeated mismatches).
The platform pays the trusted node the checked job's node share, out of its fees. A job nobody
verifies (not sampled, or no trusted node in time) has its credit released when its window passes.

A sweep trial stopped early and paid for the steps up to a checkpoint (coordinator.trials) is sampled
the same way. Its re-run trains the trial's spec to the checkpoint's step and measures the checkpoint's
held-out loss (the checkpoint holds the adapter in peft's layout, as a result does); it delivered no
result, so a pass leaves it stopped (credit released) and a mismatch claws the credit back and gives
the buyer back what the trial was charged.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from compute_swarm import protocol
from compute_swarm.coordinator import accounts, batch, ledger, verification
from compute_swarm.coordinator.artifacts import ArtifactStore
from compute_swarm.coordinator.job_events import record as record_event
from compute_swarm.coordinator.lifecycle import CANCELLED, COMPLETED, QUEUED, VERIFIED
from compute_swarm.coordinator.settings import Settings
from compute_swarm.coordinator.tables import Job, JobProgressPoint, Node
from compute_swarm.coordinator.trials import STOPPED_EARLY
from compute_swarm.coordinator.verification import MISMATCH, PASSED, NodeRecord, Verdict, VerificationPolicy

logger = logging.getLogger(__name__)

PENDING, SKIPPED, UNAVAILABLE = "pending", "skipped", "unavailable"
VERIFICATION_ATTEMPTS = 3


def node_record(node: Node, policy: VerificationPolicy) -> NodeRecord:
    return NodeRecord(
        error_rate=node.error_rate if node.error_rate is not None else policy.initial_error_rate,
        clean_streak=node.clean_streak,
        mismatches=node.mismatches,
        trusted_by_ops=node.trusted,
        quarantined=node.quarantined_at is not None,
    )


def store_record(node: Node, record: NodeRecord) -> None:
    node.error_rate = record.error_rate
    node.clean_streak = record.clean_streak
    node.mismatches = record.mismatches
    node.trusted = record.trusted_by_ops
    if record.quarantined and node.quarantined_at is None:
        node.quarantined_at = time.time()
    elif not record.quarantined:
        node.quarantined_at = None


class Verifier:
    def __init__(self, settings: Settings, store: ArtifactStore, draw: Callable[[], float] = random.random):
        self.policy = settings.verification_policy()
        self.window_seconds = settings.verification_window_seconds
        self.store = store
        self.draw = draw  # uniform in [0, 1): injected, so tests and the bench decide what is sampled
        self.budget = verification.OverheadBudget(self.policy.overhead_budget)

    # ---- a job completed

    def after_completion(self, session: Session, job: Job) -> Job | None:
        """Decide whether the job just completed (by job.node_id) is re-run; returns the re-run queued."""
        job.credit_release_at = time.time() + self.window_seconds
        if job.kind == "inference" and job.spec.get("sampling", {}).get("temperature", 1.0) != 0:
            # A sampled answer depends on the machine's exact numbers: a re-run elsewhere differs.
            self.not_to_verify(job, "sampled answers (temperature above 0) are not replayed")
            return None
        return self._sample(session, job, job.spec, job.result_sha256, f"completed on {job.node_id}")

    def after_stop(self, session: Session, job: Job, checked_step: int, checkpoint_sha256: str) -> Job | None:
        """Decide whether a sweep trial stopped early, and paid for the steps up to its checkpoint at
        `checked_step`, is re-run; returns the re-run queued. The re-run trains the trial's spec to that
        step and evaluates the checkpoint as the adapter delivered."""
        job.credit_release_at = time.time() + self.window_seconds
        warmup = job.spec.get("warmup_steps") or 0
        if warmup >= checked_step:
            # A job must end after its warm-up (LoraJobSpec): a re-run to this step is not a valid job.
            self.not_to_verify(job, f"stopped within its {warmup} warm-up steps: not replayed")
            return None
        spec = {**job.spec, "max_steps": checked_step}
        what = f"stopped early on {job.node_id}, checkpoint at step {checked_step}"
        return self._sample(session, job, spec, checkpoint_sha256, what)

    def not_to_verify(self, job: Job, detail: str) -> None:
        job.verification = SKIPPED
        job.verification_detail = detail

    def _sample(
        self, session: Session, job: Job, spec: dict, delivered_sha256: str | None, what: str
    ) -> Job | None:
        """Draw whether `job` is re-run (`spec`, checking `delivered_sha256`); queue the re-run if so."""
        node = session.get(Node, job.node_id) if job.node_id else None
        record = node_record(node, self.policy) if node is not None else verification.new_record(self.policy)
        rate = self.budget.rate(verification.sampling_rate(record, self.policy))
        if self.draw() >= rate:
            self.not_to_verify(job, f"not sampled (this node's jobs are re-run at {rate:.0%})")
            return None
        now = time.time()
        check = Job(
            id=accounts.new_id("job"),
            buyer_id=job.buyer_id,
            kind=job.kind,
            spec=spec,
            base_model=job.base_model,
            dataset_sha256=job.dataset_sha256,
            dataset_size=job.dataset_size,
            dataset_lines=job.dataset_lines,
            required_memory_bytes=job.required_memory_bytes,
            required_memory_bytes_16bit=job.required_memory_bytes_16bit,
            price_micro=0,
            state=QUEUED,
            attempt=0,
            max_attempts=VERIFICATION_ATTEMPTS,
            queued_at=now,
            # Never the node being checked.
            excluded_nodes=[job.node_id] if job.node_id else [],
            input_adapter_sha256=job.input_adapter_sha256,
            verifies_job_id=job.id,
            delivered_result_sha256=delivered_sha256,
            created_at=now,
            updated_at=now,
        )
        session.add(check)
        session.flush()
        job.verification = PENDING
        job.verification_detail = f"sampled (at {rate:.0%}): re-run {check.id} waits for a trusted node"
        record_event(session, check, f"re-runs {job.id} ({what}) to verify it")
        record_event(session, job, f"to be verified: re-run {check.id} queued for a trusted node")
        return check

    # ---- a re-run reported

    def conclude(
        self, session: Session, check: Job, report: protocol.JobResult, trusted_node_id: str
    ) -> Verdict:
        """Compare a re-run's result with the checked job's and settle the checked job."""
        job = session.scalar(select(Job).where(Job.id == check.verifies_job_id).with_for_update())
        assert job is not None, "a re-run always names the job it checks"
        verdict = self._compare(session, job, check, report)
        share = ledger.node_credit_for_job(session, job.id, job.node_id) if job.node_id else 0
        ledger.pay_for_verification(
            session, check.id, trusted_node_id, share, memo=f"verified {job.id}: {verdict.outcome}"
        )
        node = session.get(Node, job.node_id) if job.node_id else None
        stopped = job.error_kind == STOPPED_EARLY
        if verdict.outcome == PASSED:
            if not stopped:  # a stopped trial delivered no result: it stays stopped
                job.state = VERIFIED
            if job.node_id:
                ledger.release(session, job.id, job.node_id, memo="verified")
        else:
            if job.node_id:
                ledger.clawback(
                    session, job.id, job.node_id, memo=f"verification mismatch: {verdict.reason}"[:500]
                )
            if stopped:
                # The buyer paid for steps its checkpoint does not show, and got no result for them.
                memo = f"verification mismatch: the stopped trial's charge goes back ({verdict.reason})"
                ledger.post(
                    session,
                    kind="refund",
                    idempotency_key=f"mismatch-refund:{job.id}",
                    job_id=job.id,
                    entries={
                        ledger.FEES: -job.price_micro,
                        ledger.buyer_account(job.buyer_id): job.price_micro,
                    },
                    memo=memo[:500],
                )
            else:
                # The buyer gets the trusted run's result in place of the one delivered.
                job.result_sha256 = check.result_sha256
                job.result_gguf_sha256 = check.result_gguf_sha256
                job.metrics = check.metrics
        job.verification = verdict.outcome
        job.verification_detail = verdict.reason[:2000]
        job.credit_release_at = None
        job.updated_at = time.time()
        if node is not None:
            before = node_record(node, self.policy)
            after = verification.after_verification(before, verdict.outcome, self.policy)
            store_record(node, after)
            node.verifications += 1
            if after.quarantined and not before.quarantined:
                record_event(
                    session, job, f"node {node.id} is quarantined after {after.mismatches} mismatches"
                )
        if verdict.outcome == PASSED:
            what = "verified"
        elif stopped:
            what = "mismatch: the node's credit is taken back and the buyer's charge refunded"
        else:
            what = "mismatch: the trusted run's result replaces the delivered one"
        record_event(session, job, f"{what} ({verdict.reason})")
        return verdict

    def _compare(self, session: Session, job: Job, check: Job, report: protocol.JobResult) -> Verdict:
        if job.kind == "inference":
            try:
                delivered = [
                    text
                    for _, _, text in batch.read_answers(
                        self._blob(job.result_sha256), lines=job.dataset_lines or 0
                    )
                ]
                trusted = [
                    text
                    for _, _, text in batch.read_answers(
                        self._blob(check.result_sha256), lines=job.dataset_lines or 0
                    )
                ]
            except batch.BatchResultError as error:
                return Verdict(MISMATCH, f"the delivered answers cannot be read: {error}")
            return verification.compare_completions(delivered, trusted, self.policy)
        if job.error_kind == STOPPED_EARLY:
            return verification.compare_stopped_trial(
                delivered_eval_loss=report.delivered_eval_loss,
                trusted_eval_loss=report.eval_loss,
                reported_losses=_losses_by_step(session, job.id),
                trusted_losses=_losses_by_step(session, check.id),
                # The re-run's schedule ends at the checkpoint's step, the trial's at its own max_steps.
                same_learning_rates=job.spec.get("schedule") == "constant"
                or check.spec.get("max_steps") == job.spec.get("max_steps"),
                policy=self.policy,
            )
        return verification.compare_lora(
            delivered_eval_loss=report.delivered_eval_loss,
            trusted_eval_loss=report.eval_loss,
            reported_losses=_losses_by_step(session, job.id),
            trusted_losses=_losses_by_step(session, check.id),
            policy=self.policy,
        )

    def _blob(self, sha256: str | None):
        if sha256 is None or not self.store.has(sha256):
            raise batch.BatchResultError("the result is not in the store")
        return self.store.blob_path(sha256)

    def check_failed(self, session: Session, check: Job) -> None:
        """A re-run that ended without a result (no trusted node could finish it): the checked job's
        credit waits out its window, as an unsampled job's does."""
        job = session.get(Job, check.verifies_job_id)
        if job is not None and job.verification == PENDING:
            job.verification = UNAVAILABLE
            job.verification_detail = (
                f"the re-run {check.id} could not finish: {check.error_message or check.state}"
            )
            record_event(session, job, "not verified: the trusted re-run could not finish")

    # ---- windows

    def release_due(self, session: Session, now: float, limit: int = 500) -> int:
        """Release the pending credit of jobs whose window passed; returns how many."""
        due = session.scalars(
            select(Job)
            .where(
                Job.credit_release_at.is_not(None),
                Job.credit_release_at <= now,
                # A cancelled job with credit pending is a trial stopped early and paid for its steps.
                Job.state.in_((COMPLETED, VERIFIED, CANCELLED)),
            )
            .limit(limit)
            .with_for_update()
        ).all()
        for job in due:
            if job.node_id:
                ledger.release(session, job.id, job.node_id, memo="verification window passed")
            job.credit_release_at = None
            if job.verification == PENDING:
                # A re-run no trusted node took in time is dropped; one that runs may still decide.
                for check in session.scalars(
                    select(Job).where(Job.verifies_job_id == job.id, Job.state == QUEUED).with_for_update()
                ):
                    check.state = CANCELLED
                    check.finished_at = check.updated_at = now
                    record_event(session, check, "no trusted node took it within the verification window")
                    job.verification = UNAVAILABLE
                    job.verification_detail = "no trusted node re-ran it within the verification window"
                    record_event(
                        session, job, "not verified: no trusted node re-ran it in time; credit released"
                    )
        return len(due)


def _losses_by_step(session: Session, job_id: str) -> dict[int, float]:
    """The training loss reported at each step; a retried job's latest report of a step wins."""
    points = session.scalars(
        select(JobProgressPoint).where(JobProgressPoint.job_id == job_id).order_by(JobProgressPoint.id)
    ).all()
    return {point.step: point.loss for point in points if point.loss is not None}
