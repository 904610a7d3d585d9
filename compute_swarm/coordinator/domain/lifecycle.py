"""A job's lifecycle as one pure function: `transition(job, event)` returns the job after the event,
the money that moves with it and what must happen outside the database. Nothing else changes a job's
state (coordinator.store.job_changes writes what this decides, in the caller's transaction).

States: queued → leased → running → completed (→ verified), plus failed and cancelled. A result built
on a checkpoint another node made waits in `verifying` (coordinator.service.provenance) until a trusted
re-run decides it: then `verified`, or `completed` with the trusted result. A lease that is lost (the
node stopped renewing it) or a failure the node reports sends the job back to the queue until it has
used max_attempts; then it fails and its escrow is refunded. Nodes are never blamed for a job that
fails everywhere. A sweep trial stopped early is `cancelled` with error kind `stopped_early`, charged
for the steps its checkpoint shows.

A verification re-run (`rerun`) moves through the same states but holds no money: the platform pays
the node that runs it (coordinator.service.verifier).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from compute_swarm.coordinator.domain import pricing
from compute_swarm.coordinator.domain.effects import Effect, StopOnNode, WakeDispatcher
from compute_swarm.protocol import (
    CANCELLED,
    COMPLETED,
    FAILED,
    LEASED,
    QUEUED,
    RUNNING,
    VERIFIED,
    VERIFYING,
    FailureKind,
    format_credits,
)

NEW = "new"  # not stored: the state a job is in before its submission
HELD_STATES = frozenset({LEASED, RUNNING})  # a node holds a lease
OPEN_STATES = frozenset({QUEUED, LEASED, RUNNING})  # escrow still held

# Why a job failed or ended (Job.error_kind): a node's protocol.FailureKind, or the coordinator's own.
STOPPED_EARLY = "stopped_early"  # a sweep trial median stopping ended (state cancelled)
ATTEMPTS_EXHAUSTED = "attempts_exhausted"


def result_released(state: str) -> bool:
    """May the buyer have the job's result (download it, serve its fine-tuned model)?"""
    return state != VERIFYING


# ---- the job as a transition reads and writes it


@dataclass(frozen=True)
class JobFacts:
    """The part of a job its lifecycle decides (a snapshot of its row; times in epoch seconds)."""

    job_id: str
    buyer_id: str
    state: str
    price_micro: int
    max_attempts: int
    rerun: bool = False  # a verification re-run: holds no money
    attempt: int = 0
    node_id: str | None = None
    lease_id: str | None = None
    lease_expires_at: float | None = None
    excluded_nodes: tuple[str, ...] = ()
    error_kind: str | None = None
    error_message: str | None = None
    progress: Mapping[str, Any] | None = None
    queued_at: float | None = None
    finished_at: float | None = None
    updated_at: float | None = None


# ---- the money that moves with a transition (posted by coordinator.store.job_changes through the ledger)


@dataclass(frozen=True)
class Hold:
    """Move the job's price from its buyer's balance to its escrow (or refuse: not enough credits)."""

    amount_micro: int


@dataclass(frozen=True)
class Charge:
    """Pay for work out of escrow: the node's share (pending until verified) and the platform's fee;
    with `return_rest`, what escrow holds beyond the price goes back to the buyer."""

    node_id: str
    node_share_micro: int
    fee_micro: int
    return_rest: bool
    memo: str


@dataclass(frozen=True)
class Refund:
    """All the escrow goes back to the buyer."""

    memo: str


@dataclass(frozen=True)
class ReturnCharge:
    """A charge the buyer should not have paid goes back out of the fees (a stopped trial whose
    checkpoint failed verification)."""

    amount_micro: int
    memo: str


Move = Hold | Charge | Refund | ReturnCharge


# ---- events


@dataclass(frozen=True)
class Submitted:
    at: float
    message: str | None = None  # the event's line in the job's log; a buyer's job says what it holds


@dataclass(frozen=True)
class Leased:
    at: float
    node_id: str
    lease_id: str
    lease_seconds: float


@dataclass(frozen=True)
class Started:
    """The lease's first report arrived."""

    at: float
    node_id: str


@dataclass(frozen=True)
class LeaseLost:
    """The node stopped renewing its lease, or reconnected without the job. `node_may_run_it`: tell the
    node to stop (it may still be working on it)."""

    at: float
    reason: str
    node_may_run_it: bool = True


@dataclass(frozen=True)
class LeaseReturned:
    """A lease that never reached its node."""

    at: float


@dataclass(frozen=True)
class FailureReported:
    at: float
    kind: FailureKind
    message: str


@dataclass(frozen=True)
class Cancelled:
    at: float
    reason: str = "cancelled by the buyer"


@dataclass(frozen=True)
class ResultAccepted:
    """The node delivered a result the coordinator checked. `price_micro`: what the work costs (a batch
    is priced by its tokens, at most what it holds). `held_for_verification`: built on another node's
    checkpoint, the result waits for a trusted re-run."""

    at: float
    node_id: str
    price_micro: int
    fee_basis_points: int
    held_for_verification: bool = False


@dataclass(frozen=True)
class TrialStopped:
    """Median stopping ended a sweep trial at `step` of `total_steps`; `from_step` to `to_step` are the
    steps a checkpoint its lease uploaded shows (the only ones it is paid for)."""

    at: float
    reason: str
    total_steps: int
    from_step: int
    to_step: int
    fee_basis_points: int


@dataclass(frozen=True)
class VerificationPassed:
    at: float
    reason: str


@dataclass(frozen=True)
class VerificationFailed:
    """A trusted re-run disagreed: a delivered result is replaced by the trusted one; a stopped trial's
    charge goes back to the buyer."""

    at: float
    reason: str


@dataclass(frozen=True)
class DeliveredUnverified:
    """No trusted node verified a held result in time: it goes to the buyer, marked unverified."""

    at: float


@dataclass(frozen=True)
class RerunDropped:
    """A re-run no trusted node took within its window."""

    at: float
    reason: str


@dataclass(frozen=True)
class Unsendable:
    """A queued job whose stored spec no node can be sent (only one an older coordinator stored)."""

    at: float
    reason: str


Event = (
    Submitted
    | Leased
    | Started
    | LeaseLost
    | LeaseReturned
    | FailureReported
    | Cancelled
    | ResultAccepted
    | TrialStopped
    | VerificationPassed
    | VerificationFailed
    | DeliveredUnverified
    | RerunDropped
    | Unsendable
)


@dataclass(frozen=True)
class Transition:
    job: JobFacts  # the job after the event
    message: str  # its line in the job's log
    moves: tuple[Move, ...] = ()
    effects: tuple[Effect, ...] = ()


class NotAllowed(Exception):
    """The event cannot happen to the job in its state (say, cancelling a finished job)."""


def transition(job: JobFacts, event: Event) -> Transition:
    """The job after `event`, the money that moves and what must happen outside the database."""
    rule = _RULES.get(type(event))
    if rule is None:
        raise TypeError(f"not a job event: {event!r}")
    return rule(job, event)


# ---- each event's rule


def _submitted(job: JobFacts, event: Submitted) -> Transition:
    _require(job, event, {NEW})
    message = event.message or "submitted"
    queued = _with(job, state=QUEUED, attempt=0, queued_at=event.at, updated_at=event.at)
    moves = () if job.rerun else (Hold(job.price_micro),)
    return Transition(queued, message, moves, (WakeDispatcher(),))


def _leased(job: JobFacts, event: Leased) -> Transition:
    _require(job, event, {QUEUED})
    leased = _with(
        job,
        state=LEASED,
        attempt=job.attempt + 1,
        node_id=event.node_id,
        lease_id=event.lease_id,
        lease_expires_at=event.at + event.lease_seconds,
        updated_at=event.at,
    )
    message = f"leased to {event.node_id} (attempt {leased.attempt} of {job.max_attempts})"
    return Transition(leased, message)


def _started(job: JobFacts, event: Started) -> Transition:
    _require(job, event, {LEASED})
    return Transition(_with(job, state=RUNNING), f"running on {event.node_id}")


def _lease_lost(job: JobFacts, event: LeaseLost) -> Transition:
    _require(job, event, HELD_STATES)
    if job.attempt >= job.max_attempts:
        outcome = Retry(FAILED, f"{event.reason}; gave up after {job.attempt} attempts")
    else:
        outcome = Retry(
            QUEUED, f"{event.reason}; queued again (attempt {job.attempt} of {job.max_attempts} used)"
        )
    after = _after_attempt(job, outcome, event.at)
    if event.node_may_run_it and job.node_id and job.lease_id:
        stop = StopOnNode(job.node_id, job.job_id, job.lease_id, event.reason)
        after = dataclasses.replace(after, effects=(stop, *after.effects))
    return after


def _lease_returned(job: JobFacts, event: LeaseReturned) -> Transition:
    _require(job, event, HELD_STATES)
    outcome = Retry(QUEUED, "the node left before its lease arrived", attempt_counts=False)
    return _after_attempt(job, outcome, event.at)


def _failure_reported(job: JobFacts, event: FailureReported) -> Transition:
    _require(job, event, HELD_STATES)
    outcome = after_failure(
        event.kind,
        event.message,
        job.attempt,
        job.max_attempts,
        invalid_before=job.error_kind == "invalid_spec",
    )
    return _after_attempt(_with(job, error_kind=event.kind), outcome, event.at)


def _cancelled(job: JobFacts, event: Cancelled) -> Transition:
    if job.state not in OPEN_STATES:
        raise NotAllowed(f"job {job.job_id} is {job.state} already")
    if job.rerun:
        raise NotAllowed(f"job {job.job_id} verifies another job and cannot be cancelled")
    effects: tuple[Effect, ...] = ()
    if job.state in HELD_STATES and job.node_id and job.lease_id:
        effects = (StopOnNode(job.node_id, job.job_id, job.lease_id, "the buyer cancelled the job"),)
    cancelled = _finished(job, CANCELLED, event.at)
    return Transition(cancelled, event.reason, _refund(job, CANCELLED, event.reason), effects)


def _result_accepted(job: JobFacts, event: ResultAccepted) -> Transition:
    _require(job, event, HELD_STATES)
    if job.rerun:
        return Transition(_finished(job, COMPLETED, event.at), f"completed on {event.node_id}")
    node_share, fee = pricing.split_payment(event.price_micro, event.fee_basis_points)
    # A batch held its most possible price: what it did not use goes back to the buyer.
    rest = event.price_micro < job.price_micro
    charge = Charge(event.node_id, node_share, fee, return_rest=rest, memo="job completed")
    if event.held_for_verification:
        state, message = (
            VERIFYING,
            (
                f"completed on {event.node_id}, from a checkpoint another node made: its result is held "
                f"until a trusted node verifies it"
            ),
        )
    else:
        state, message = COMPLETED, f"completed on {event.node_id}"
    done = _with(_finished(job, state, event.at), price_micro=event.price_micro)
    return Transition(done, message, (charge,))


def _trial_stopped(job: JobFacts, event: TrialStopped) -> Transition:
    _require(job, event, HELD_STATES, buyers_only=True)
    return _stop_trial(job, event)


def _verification_passed(job: JobFacts, event: VerificationPassed) -> Transition:
    _require_verifiable(job, event)
    # A stopped trial delivered no result: it stays stopped.
    state = CANCELLED if job.state == CANCELLED else VERIFIED
    return Transition(_with(job, state=state, updated_at=event.at), f"verified ({event.reason})")


def _verification_failed(job: JobFacts, event: VerificationFailed) -> Transition:
    _require_verifiable(job, event)
    if job.state == CANCELLED:
        # The buyer paid for steps the checkpoint does not show, and got no result for them.
        memo = f"verification mismatch: the stopped trial's charge goes back ({event.reason})"
        moves: tuple[Move, ...] = (ReturnCharge(job.price_micro, memo),)
        what = "mismatch: the buyer's charge for the stopped trial is refunded"
        return Transition(_with(job, updated_at=event.at), f"{what} ({event.reason})", moves)
    # From verifying (or completed): the buyer gets the trusted run's result instead.
    what = "mismatch: the trusted run's result replaces the delivered one"
    settled = _with(job, state=COMPLETED, updated_at=event.at)
    return Transition(settled, f"{what} ({event.reason})")


def _delivered_unverified(job: JobFacts, event: DeliveredUnverified) -> Transition:
    _require(job, event, {VERIFYING}, buyers_only=True)
    return Transition(
        _with(job, state=COMPLETED, updated_at=event.at),
        "no trusted node verified it in time: its result is delivered unverified",
    )


def _rerun_dropped(job: JobFacts, event: RerunDropped) -> Transition:
    _require(job, event, {QUEUED})
    if not job.rerun:
        raise NotAllowed(f"job {job.job_id} is not a verification re-run")
    return Transition(_finished(job, CANCELLED, event.at), event.reason)


def _unsendable(job: JobFacts, event: Unsendable) -> Transition:
    _require(job, event, {QUEUED})
    failed = _with(
        _finished(job, FAILED, event.at), error_kind="invalid_spec", error_message=event.reason[:2000]
    )
    return Transition(failed, event.reason, _refund(job, FAILED, event.reason))


_RULES: dict[type, Callable[[JobFacts, Any], Transition]] = {
    Submitted: _submitted,
    Leased: _leased,
    Started: _started,
    LeaseLost: _lease_lost,
    LeaseReturned: _lease_returned,
    FailureReported: _failure_reported,
    Cancelled: _cancelled,
    ResultAccepted: _result_accepted,
    TrialStopped: _trial_stopped,
    VerificationPassed: _verification_passed,
    VerificationFailed: _verification_failed,
    DeliveredUnverified: _delivered_unverified,
    RerunDropped: _rerun_dropped,
    Unsendable: _unsendable,
}


# ---- what a failed attempt leads to


@dataclass(frozen=True)
class Retry:
    state: str  # QUEUED (try again) or FAILED (give up, refund)
    message: str
    exclude_node: bool = False  # do not lease this job to the same node again
    attempt_counts: bool = True  # False: the attempt did no work and does not use up max_attempts


def after_failure(
    kind: FailureKind, message: str, attempt: int, max_attempts: int, *, invalid_before: bool = False
) -> Retry:
    """The node reported that the job failed (engine.records.Failed.kind). `invalid_before`: another
    node already found the spec invalid."""
    if kind == "invalid_spec":
        # The buyer's data or settings would fail the same way on every node; but one node's word
        # must not fail a buyer's job: a second node confirms it first. No attempt is used meanwhile.
        if invalid_before:
            return Retry(FAILED, message)
        return Retry(
            QUEUED,
            f"a node found the job invalid ({message}); checking on another node",
            exclude_node=True,
            attempt_counts=False,
        )
    if kind == "released":
        # The seller paused or stopped, or the node was busy: the job did nothing wrong. A checkpoint
        # uploaded on the way out lets the next node continue.
        return Retry(QUEUED, f"handed back by the node: {message}", attempt_counts=False)
    if kind in ("insufficient_memory", "declined"):
        # Refused before it started (it would not fit, or its seller's rules turn it down): no work
        # was done and another node may take it.
        return Retry(QUEUED, message, exclude_node=True, attempt_counts=False)
    exclude = kind == "out_of_memory"
    if attempt >= max_attempts:
        return Retry(FAILED, f"{message} (failed on all {attempt} attempts)", exclude_node=exclude)
    return Retry(QUEUED, message, exclude_node=exclude)


def _after_attempt(job: JobFacts, outcome: Retry, at: float) -> Transition:
    excluded = job.excluded_nodes
    if outcome.exclude_node and job.node_id and job.node_id not in excluded:
        excluded = (*excluded, job.node_id)
    job = _with(job, excluded_nodes=excluded, attempt=job.attempt - (0 if outcome.attempt_counts else 1))
    if outcome.state == FAILED:
        failed = _with(
            _finished(job, FAILED, at),
            error_message=outcome.message,
            error_kind=job.error_kind or ATTEMPTS_EXHAUSTED,
        )
        return Transition(failed, outcome.message, _refund(job, FAILED, outcome.message))
    queued = _with(
        job,
        state=QUEUED,
        queued_at=at,
        updated_at=at,
        node_id=None,
        lease_id=None,
        lease_expires_at=None,
        progress=None,
    )
    return Transition(queued, outcome.message, (), (WakeDispatcher(),))


def _stop_trial(job: JobFacts, event: TrialStopped) -> Transition:
    total = max(event.total_steps, 1)
    steps = max(event.to_step - event.from_step, 0)
    held = job.price_micro
    price = held * min(steps, total) // total
    if price > 0:
        payment = (
            f"charged {format_credits(price)} of the {format_credits(held)} credits held, "
            f"for steps {event.from_step + 1} to {event.to_step} ({steps} of {total}, up to the checkpoint "
            "this lease uploaded); the rest goes back to the buyer"
        )
        node_share, fee = pricing.split_payment(price, event.fee_basis_points)
        assert job.node_id is not None, "a held lease names its node"
        memo = f"{event.reason}; {payment}"[:500]
        moves: tuple[Move, ...] = (Charge(job.node_id, node_share, fee, return_rest=True, memo=memo),)
    else:
        payment = (
            f"nothing charged: no checkpoint uploaded after step {event.from_step} in this lease, so no "
            f"step it ran can be checked; the {format_credits(held)} credits held go back to the buyer"
        )
        moves = (Refund(f"{event.reason}; {payment}"[:500]),)
    message = f"{event.reason}; {payment}"
    stopped = _with(
        _finished(job, CANCELLED, event.at),
        price_micro=price,
        error_kind=STOPPED_EARLY,
        error_message=message,
    )
    return Transition(stopped, message, moves)


def _finished(job: JobFacts, state: str, at: float) -> JobFacts:
    # The node stays named: it is paid, verified or blamed for what it did.
    return _with(job, state=state, finished_at=at, updated_at=at, lease_id=None, lease_expires_at=None)


def _refund(job: JobFacts, state: str, message: str) -> tuple[Move, ...]:
    return () if job.rerun else (Refund(f"job {state}: {message}"[:500]),)


def _require_verifiable(job: JobFacts, event: Event) -> None:
    """A verdict is about a delivered result, or a stopped trial's checkpoint."""
    stopped = job.state == CANCELLED and job.error_kind == STOPPED_EARLY
    _require(
        job, event, {VERIFYING, COMPLETED, CANCELLED} if stopped else {VERIFYING, COMPLETED}, buyers_only=True
    )


def _require(
    job: JobFacts, event: Event, states: set[str] | frozenset[str], *, buyers_only: bool = False
) -> None:
    """`buyers_only`: the event belongs to a buyer's job (trials stop, results are verified), never to
    a verification re-run."""
    if job.state not in states:
        raise NotAllowed(f"job {job.job_id} is {job.state}: it cannot take {type(event).__name__}")
    if buyers_only and job.rerun:
        raise NotAllowed(f"job {job.job_id} is a verification re-run: it cannot take {type(event).__name__}")


def _with(job: JobFacts, **changes: Any) -> JobFacts:
    return dataclasses.replace(job, **changes)
