"""The job lifecycle's decisions, as pure functions: what happens to a job when an attempt ends badly.

States: queued → leased → running → completed (→ verified), plus failed and cancelled; a result built
on a checkpoint another node made waits in `verifying` (coordinator.provenance) until a trusted re-run
decides it: then `verified`, or `completed` with the trusted result. A lease that
is lost (the node stopped renewing it) or a failure the node reports sends the job back to the queue
until it has used max_attempts; then it fails and its escrow is refunded. Nodes are never blamed for
a job that fails everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

QUEUED, LEASED, RUNNING = "queued", "leased", "running"
COMPLETED, VERIFIED, FAILED, CANCELLED = "completed", "verified", "failed", "cancelled"
VERIFYING = "verifying"  # done and charged; the result is held from the buyer until it is verified
STATES = (QUEUED, LEASED, RUNNING, VERIFYING, COMPLETED, VERIFIED, FAILED, CANCELLED)
HELD_STATES = frozenset({LEASED, RUNNING})  # a node holds a lease
OPEN_STATES = frozenset({QUEUED, LEASED, RUNNING})  # escrow still held
FINAL_STATES = frozenset({COMPLETED, VERIFIED, FAILED, CANCELLED})
SUCCEEDED_STATES = frozenset({COMPLETED, VERIFIED})  # a result was delivered (verified or not yet)


def result_released(state: str) -> bool:
    """May the buyer have the job's result (download it, serve its fine-tuned model)?"""
    return state != VERIFYING


@dataclass(frozen=True)
class AttemptOutcome:
    state: str  # QUEUED (try again) or FAILED (give up, refund)
    message: str
    exclude_node: bool = False  # do not lease this job to the same node again
    attempt_counts: bool = True  # False: the attempt did no work and does not use up max_attempts


def after_lost_lease(attempt: int, max_attempts: int, reason: str) -> AttemptOutcome:
    """The node disconnected or stopped renewing its lease."""
    if attempt >= max_attempts:
        return AttemptOutcome(FAILED, f"{reason}; gave up after {attempt} attempts")
    return AttemptOutcome(QUEUED, f"{reason}; queued again (attempt {attempt} of {max_attempts} used)")


def after_failure(
    kind: str, message: str, attempt: int, max_attempts: int, *, invalid_before: bool = False
) -> AttemptOutcome:
    """The node reported that the job failed (engine.records.Failed.kind). `invalid_before`: another
    node already found the spec invalid."""
    if kind == "invalid_spec":
        # The buyer's data or settings would fail the same way on every node; but one node's word
        # must not fail a buyer's job: a second node confirms it first. No attempt is used meanwhile.
        if invalid_before:
            return AttemptOutcome(FAILED, message)
        return AttemptOutcome(
            QUEUED,
            f"a node found the job invalid ({message}); checking on another node",
            exclude_node=True,
            attempt_counts=False,
        )
    if kind == "released":
        # The seller paused or stopped, or the node was busy: the job did nothing wrong. A checkpoint
        # uploaded on the way out lets the next node continue.
        return AttemptOutcome(QUEUED, f"handed back by the node: {message}", attempt_counts=False)
    if kind == "insufficient_memory":
        # Refused before it started: no work was done and another node may fit it.
        return AttemptOutcome(QUEUED, message, exclude_node=True, attempt_counts=False)
    exclude = kind == "out_of_memory"
    if attempt >= max_attempts:
        return AttemptOutcome(FAILED, f"{message} (failed on all {attempt} attempts)", exclude_node=exclude)
    return AttemptOutcome(QUEUED, message, exclude_node=exclude)
