"""Verification in the database, inside the transactions the services open (coordinator.service.reports,
coordinator.service.leases, coordinator.service.node_accounts).

When a job completes, it may be sampled (coordinator.domain.verification) for a re-run on a trusted node: a
new job, with no price of its own, that names the job it checks and the result delivered for it. When
the re-run reports, the two are compared and the checked job is settled:
- passed: the job is `verified` and its node's pending credit is released;
- mismatch: the credit is clawed back, the buyer's result is replaced with the trusted one, and the
  node's record falls (quarantine after repeated mismatches).
The platform pays the trusted node the checked job's node share, out of its fees. A job nobody
verifies (not sampled, or no trusted node in time) has its credit released when its window passes.

A sweep trial stopped early and paid for the steps up to a checkpoint (coordinator.service.trials) is sampled
the same way. Its re-run trains the trial's spec to the checkpoint's step and measures the checkpoint's
held-out loss (the checkpoint holds the adapter in peft's layout, as a result does); it delivered no
result, so a pass leaves it stopped (credit released) and a mismatch claws the credit back and gives
the buyer back what the trial was charged.

Work built on a checkpoint another untrusted node made is always re-run, and a mismatch on it looks
for the node that introduced the bad state before anyone is blamed (coordinator.service.provenance).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from compute_swarm import protocol
from compute_swarm.coordinator.domain import lifecycle, verification
from compute_swarm.coordinator.domain.effects import StandingChanged
from compute_swarm.coordinator.domain.lifecycle import (
    CANCELLED,
    COMPLETED,
    FAILED,
    QUEUED,
    STOPPED_EARLY,
    VERIFIED,
    VERIFYING,
)
from compute_swarm.coordinator.domain.verification import (
    MISMATCH,
    PASSED,
    NodeRecord,
    Verdict,
    VerificationPolicy,
)
from compute_swarm.coordinator.service import accounts, batch, provenance
from compute_swarm.coordinator.service.tokens import TokenCounters
from compute_swarm.coordinator.settings import Settings
from compute_swarm.coordinator.store import ledger
from compute_swarm.coordinator.store.artifacts import ArtifactStore
from compute_swarm.coordinator.store.database import after_commit
from compute_swarm.coordinator.store.job_changes import change
from compute_swarm.coordinator.store.job_events import record as record_event
from compute_swarm.coordinator.store.tables import Checkpoint, Job, JobProgressPoint, Node
from compute_swarm.engine.jobs import InferenceJobSpec

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
    def __init__(
        self,
        settings: Settings,
        store: ArtifactStore,
        draw: Callable[[], float] = random.random,
        tokens: TokenCounters | None = None,
    ):
        self.policy = settings.verification_policy()
        self.window_seconds = settings.verification_window_seconds
        self.store = store
        self.draw = draw  # uniform in [0, 1): injected, so tests and the bench decide what is sampled
        self.budget = verification.OverheadBudget(self.policy.overhead_budget)
        # Each model's tokenizer: batch answers are compared in tokens too (None: in bytes).
        self.tokens = tokens

    # ---- a job completed

    def after_completion(self, session: Session, job: Job, built_on: Checkpoint | None) -> Job | None:
        """Decide whether the job just completed (by job.node_id) is re-run; returns the re-run queued.
        `built_on`: the foreign checkpoint its work resumed from (provenance.foreign_base), if any."""
        job.credit_release_at = time.time() + self.window_seconds
        spec = job.submitted_spec
        if isinstance(spec, InferenceJobSpec) and spec.sampling.temperature != 0:
            # A sampled answer depends on the machine's exact numbers: a re-run elsewhere differs.
            self.not_to_verify(job, "sampled answers (temperature above 0) are not replayed")
            return None
        return self._sample(
            session,
            job,
            job.spec,
            job.result_sha256,
            f"completed on {job.node_id}",
            always_because=_built_on_foreign_checkpoint(built_on),
        )

    def after_stop(self, session: Session, job: Job, checked_step: int, checkpoint_sha256: str) -> Job | None:
        """Decide whether a sweep trial stopped early, and paid for the steps up to its checkpoint at
        `checked_step`, is re-run; returns the re-run queued. The re-run trains the trial's spec to that
        step and evaluates the checkpoint as the adapter delivered."""
        job.credit_release_at = time.time() + self.window_seconds
        warmup = job.submitted_spec.warmup_steps
        if warmup >= checked_step:
            # A job must end after its warm-up (LoraJobSpec): a re-run to this step is not a valid job.
            self.not_to_verify(job, f"stopped within its {warmup} warm-up steps: not replayed")
            return None
        spec = {**job.spec, "max_steps": checked_step}
        what = f"stopped early on {job.node_id}, checkpoint at step {checked_step}"
        return self._sample(
            session,
            job,
            spec,
            checkpoint_sha256,
            what,
            always_because=_built_on_foreign_checkpoint(provenance.foreign_base(session, job)),
        )

    def not_to_verify(self, job: Job, detail: str) -> None:
        job.verification = SKIPPED
        job.verification_detail = detail

    def _sample(
        self,
        session: Session,
        job: Job,
        spec: dict,
        delivered_sha256: str | None,
        what: str,
        *,
        always_because: str | None = None,
    ) -> Job | None:
        """Draw whether `job` is re-run (`spec`, checking `delivered_sha256`); queue the re-run if so.
        `always_because`: why it is re-run whatever the draw (outside the overhead budget)."""
        if always_because is None:
            node = session.get(Node, job.node_id) if job.node_id else None
            record = (
                node_record(node, self.policy) if node is not None else verification.new_record(self.policy)
            )
            rate = self.budget.rate(verification.sampling_rate(record, self.policy))
            if self.draw() >= rate:
                self.not_to_verify(job, f"not sampled (this node's jobs are re-run at {rate:.0%})")
                return None
            why = f"sampled (at {rate:.0%})"
        else:
            why = f"always verified: {always_because}"
        check = self._queue_rerun(
            session,
            job,
            spec,
            delivered_sha256,
            f"re-runs {job.id} ({what}) to verify it",
            excluded=[job.node_id] if job.node_id else [],
        )
        job.verification = PENDING
        job.verification_detail = f"{why}: re-run {check.id} waits for a trusted node"
        record_event(session, job, f"to be verified: re-run {check.id} queued for a trusted node")
        return check

    def _queue_rerun(
        self,
        session: Session,
        job: Job,
        spec: dict,
        delivered_sha256: str | None,
        what: str,
        *,
        excluded: list[str],
        checks_checkpoint: dict | None = None,
    ) -> Job:
        """Queue a re-run of `job` (`spec`) that checks `delivered_sha256`; `what` it does, for its log."""
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
            max_attempts=VERIFICATION_ATTEMPTS,
            # Never a node being checked.
            excluded_nodes=excluded,
            input_adapter_sha256=job.input_adapter_sha256,
            verifies_job_id=job.id,
            delivered_result_sha256=delivered_sha256,
            checks_checkpoint=checks_checkpoint,
            created_at=now,
        )
        change(session, check, lifecycle.Submitted(now, what))
        return check

    # ---- a re-run reported

    def conclude(
        self, session: Session, check: Job, report: protocol.JobResult, trusted_node_id: str
    ) -> Verdict:
        """Compare a re-run's result with the checked job's and settle the checked job."""
        job = session.scalar(select(Job).where(Job.id == check.verifies_job_id).with_for_update())
        assert job is not None, "a re-run always names the job it checks"
        if check.checks_checkpoint is not None:
            return self._conclude_checkpoint_check(session, job, check, report, trusted_node_id)
        verdict = self._compare(session, job, check, report)
        share = ledger.node_credit_for_job(session, job.id, job.node_id) if job.node_id else 0
        ledger.pay_for_verification(
            session, check.id, trusted_node_id, share, memo=f"verified {job.id}: {verdict.outcome}"
        )
        job.credit_release_at = None
        job.updated_at = time.time()
        if verdict.outcome == PASSED:
            job.verification, job.verification_detail = PASSED, verdict.reason[:2000]
            self._judge(session, job, job.node_id, PASSED, "verified")
            change(session, job, lifecycle.VerificationPassed(time.time(), verdict.reason))
            return verdict
        if job.error_kind != STOPPED_EARLY:
            # The buyer gets the trusted run's result in place of the one delivered (a stopped trial
            # delivered none: its charge goes back instead).
            job.result_sha256 = check.result_sha256
            job.result_gguf_sha256 = check.result_gguf_sha256
            job.metrics = check.metrics
        change(session, job, lifecycle.VerificationFailed(time.time(), verdict.reason))
        base = provenance.foreign_base(session, job)
        if base is not None and job.node_id is not None:
            # Built on another node's checkpoint: who introduced the bad state is found before anyone
            # is blamed.
            self._check_checkpoint(session, job, base, after=job.node_id, mismatch=verdict.reason)
            return verdict
        job.verification, job.verification_detail = MISMATCH, verdict.reason[:2000]
        self._judge(session, job, job.node_id, MISMATCH, f"verification mismatch: {verdict.reason}")
        return verdict

    def _judge(self, session: Session, job: Job, node_id: str | None, outcome: str, memo: str) -> None:
        """Settle one node's part in `job`: its credit for the job (if any) is released or clawed back,
        and its record moves; a mismatch may quarantine it."""
        if node_id is None:
            return
        if outcome == PASSED:
            ledger.release(session, job.id, node_id, memo=memo[:500])
        else:
            ledger.clawback(session, job.id, node_id, memo=memo[:500])
        node = session.get(Node, node_id)
        if node is None:
            return
        before = node_record(node, self.policy)
        after = verification.after_verification(before, outcome, self.policy)
        store_record(node, after)
        node.verifications += 1
        if (after.quarantined, verification.is_trusted(after, self.policy)) != (
            before.quarantined,
            verification.is_trusted(before, self.policy),
        ):
            after_commit(session, StandingChanged())  # the hub reads standing before its next dispatch
        if after.quarantined and not before.quarantined:
            record_event(session, job, f"node {node.id} is quarantined after {after.mismatches} mismatches")

    def _check_checkpoint(
        self, session: Session, job: Job, checkpoint: Checkpoint, *, after: str, mismatch: str
    ) -> None:
        """Queue a trusted re-run of `job`'s spec to `checkpoint`'s step that measures the checkpoint's
        held-out loss (as a stopped trial's is checked): a sound checkpoint puts the fault on `after`,
        the node whose work followed it; a bad one on its author, or further back."""
        author = checkpoint.node_id
        warmup = job.submitted_spec.warmup_steps
        if warmup >= checkpoint.step:
            # A re-run to this step would not be a valid job (it must end after its warm-up): the bad
            # state cannot be traced, and nobody is blamed for it.
            job.verification = MISMATCH
            job.verification_detail = (
                f"{mismatch}; it was built on node {author}'s checkpoint at step {checkpoint.step}, within "
                f"the {warmup} warm-up steps, which cannot be checked: no node is blamed"
            )[:2000]
            if job.node_id:
                ledger.release(
                    session, job.id, job.node_id, memo="not blamed: the bad state cannot be traced"
                )
            record_event(session, job, "the mismatch cannot be traced to a node: nobody is blamed")
            return
        excluded = sorted({node for node in (job.node_id, author, after) if node})
        plan = {
            "sha256": checkpoint.sha256,
            "step": checkpoint.step,
            "author": author,
            "after": after,
            "mismatch": mismatch[:1000],
        }
        check = self._queue_rerun(
            session,
            job,
            {**job.spec, "max_steps": checkpoint.step},
            checkpoint.sha256,
            f"checks node {author}'s checkpoint at step {checkpoint.step} of {job.id}",
            excluded=excluded,
            checks_checkpoint=plan,
        )
        job.verification = PENDING
        job.verification_detail = (
            f"{mismatch}; it was built on node {author}'s checkpoint at step {checkpoint.step}: re-run "
            f"{check.id} checks that checkpoint to find which node introduced the bad state"
        )[:2000]
        # The delivering node's credit waits for the finding, or for the window as any credit does.
        job.credit_release_at = time.time() + self.window_seconds
        record_event(
            session,
            job,
            f"built on node {author}'s checkpoint at step {checkpoint.step}: re-run {check.id} checks it "
            f"before any node is blamed",
        )

    def _conclude_checkpoint_check(
        self, session: Session, job: Job, check: Job, report: protocol.JobResult, trusted_node_id: str
    ) -> Verdict:
        plan = check.checks_checkpoint
        assert plan is not None
        step, author, after = int(plan["step"]), str(plan["author"]), str(plan["after"])
        verdict = verification.compare_stopped_trial(
            delivered_eval_loss=report.delivered_eval_loss,
            trusted_eval_loss=report.eval_loss,
            # The re-run's schedule ends at the checkpoint's step, the job's at its own max_steps: the
            # held-out losses decide.
            reported_losses={},
            trusted_losses={},
            same_learning_rates=False,
            policy=self.policy,
        )
        share = ledger.node_credit_for_job(session, job.id, job.node_id) if job.node_id else 0
        total = max(job.max_steps or step, 1)
        ledger.pay_for_verification(
            session,
            check.id,
            trusted_node_id,
            share * min(step, total) // total,
            memo=f"checked the checkpoint at step {step} of {job.id}: {verdict.outcome}",
        )
        job.credit_release_at = None
        job.updated_at = time.time()
        if verdict.outcome == PASSED:
            culprit = after
            finding = (
                f"node {author}'s checkpoint at step {step} is sound ({verdict.reason}): the bad state came "
                f"after it, from node {culprit}"
            )
        else:
            checkpoint = provenance.find(session, job, str(plan["sha256"]))
            earlier = (
                provenance.suspect(session, job, checkpoint.resumed_from_sha256, author)
                if checkpoint is not None
                else None
            )
            if earlier is not None:
                # That checkpoint was itself built on another node's: look further back.
                self._check_checkpoint(session, job, earlier, after=author, mismatch=str(plan["mismatch"]))
                return verdict
            culprit = author
            finding = f"node {culprit}'s checkpoint at step {step} is bad ({verdict.reason})"
        job.verification = MISMATCH
        job.verification_detail = f"{plan['mismatch']}; {finding}"[:2000]
        self._judge(session, job, culprit, MISMATCH, f"verification mismatch: {finding}")
        if job.node_id is not None and culprit != job.node_id:
            ledger.release(session, job.id, job.node_id, memo=f"not at fault: {finding}"[:500])
        record_event(session, job, f"the mismatch is charged to node {culprit}: {finding}"[:500])
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
            counter = self.tokens.get(job.base_model) if self.tokens is not None else None
            return verification.compare_completions(
                delivered, trusted, self.policy, counter.count if counter is not None else None
            )
        if job.error_kind == STOPPED_EARLY:
            return verification.compare_stopped_trial(
                delivered_eval_loss=report.delivered_eval_loss,
                trusted_eval_loss=report.eval_loss,
                reported_losses=_losses_by_step(session, job.id),
                trusted_losses=_losses_by_step(session, check.id),
                # The re-run's schedule ends at the checkpoint's step, the trial's at its own max_steps.
                same_learning_rates=job.submitted_spec.schedule == "constant"
                or check.max_steps == job.max_steps,
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

    def after_attempt(self, session: Session, check: Job) -> None:
        """After a job's attempt ended badly: if it is a re-run that failed for good (no trusted node
        could finish it), the checked job's credit waits out its window, as an unsampled job's does."""
        if check.verifies_job_id is None or check.state != FAILED:
            return
        job = session.get(Job, check.verifies_job_id)
        if job is not None and job.verification == PENDING:
            _undecided(
                session,
                job,
                check,
                f"the re-run {check.id} could not finish: {check.error_message or check.state}",
            )

    # ---- windows

    def release_due(self, session: Session, now: float, limit: int = 500) -> int:
        """Release the pending credit of jobs whose window passed; returns how many."""
        due = session.scalars(
            select(Job)
            .where(
                Job.credit_release_at.is_not(None),
                Job.credit_release_at <= now,
                # A cancelled job with credit pending is a trial stopped early and paid for its steps.
                Job.state.in_((VERIFYING, COMPLETED, VERIFIED, CANCELLED)),
            )
            .limit(limit)
            .with_for_update()
        ).all()
        for job in due:
            if job.node_id:
                ledger.release(session, job.id, job.node_id, memo="verification window passed")
            job.credit_release_at = None
            _deliver_unverified(session, job)
            if job.verification == PENDING:
                # A re-run no trusted node took in time is dropped; one that runs may still decide.
                for check in session.scalars(
                    select(Job).where(Job.verifies_job_id == job.id, Job.state == QUEUED).with_for_update()
                ):
                    dropped = lifecycle.RerunDropped(
                        now, "no trusted node took it within the verification window"
                    )
                    change(session, check, dropped)
                    _undecided(
                        session, job, check, "no trusted node re-ran it within the verification window"
                    )
        return len(due)


def _losses_by_step(session: Session, job_id: str) -> dict[int, float]:
    """The training loss reported at each step; a retried job's latest report of a step wins."""
    points = session.scalars(
        select(JobProgressPoint).where(JobProgressPoint.job_id == job_id).order_by(JobProgressPoint.id)
    ).all()
    return {point.step: point.loss for point in points if point.loss is not None}


def _built_on_foreign_checkpoint(base: Checkpoint | None) -> str | None:
    """Why work is always re-run, or None: it was built on `base`, another node's checkpoint."""
    if base is None:
        return None
    return f"built on a checkpoint (step {base.step}) that node {base.node_id} made"


def _undecided(session: Session, job: Job, check: Job, why: str) -> None:
    """A re-run of `job` that will not report: the verification ends without a verdict on a node."""
    if check.checks_checkpoint is not None:
        # The mismatch stands (the buyer has the trusted result); only its author was not found.
        job.verification = MISMATCH
        job.verification_detail = (
            f"{check.checks_checkpoint.get('mismatch', 'mismatch')}; the checkpoint it was built on could not "
            f"be checked ({why}): no node is blamed"
        )[:2000]
        record_event(session, job, "the checkpoint could not be checked: no node is blamed for the mismatch")
        return
    job.verification = UNAVAILABLE
    job.verification_detail = why[:2000]
    record_event(session, job, f"not verified: {why}"[:500])
    _deliver_unverified(session, job)


def _deliver_unverified(session: Session, job: Job) -> None:
    """A result held for verification that no trusted node could give in time goes to the buyer,
    marked unverified: holding it forever would lose the buyer's work."""
    if job.state == VERIFYING:
        change(session, job, lifecycle.DeliveredUnverified(time.time()))
