"""The lifecycle's one transition function, without a database: states, money and effects."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compute_swarm import protocol
from compute_swarm.coordinator.domain import lifecycle
from compute_swarm.coordinator.domain.effects import StopOnNode, WakeDispatcher
from compute_swarm.coordinator.domain.lifecycle import (
    CANCELLED,
    COMPLETED,
    FAILED,
    LEASED,
    NEW,
    QUEUED,
    RUNNING,
    STOPPED_EARLY,
    VERIFIED,
    VERIFYING,
    Charge,
    Hold,
    JobFacts,
    NotAllowed,
    Refund,
    ReturnCharge,
    transition,
)

PRICE = 1_000_000
FEE = 1000  # basis points: 10 %


def new_job(*, rerun: bool = False, max_attempts: int = 3) -> JobFacts:
    return JobFacts(
        job_id="job_1",
        buyer_id="buyer_1",
        state=NEW,
        price_micro=0 if rerun else PRICE,
        max_attempts=max_attempts,
        rerun=rerun,
    )


def run(job: JobFacts, *events: lifecycle.Event) -> tuple[JobFacts, list[lifecycle.Transition]]:
    steps = []
    for event in events:
        step = transition(job, event)
        steps.append(step)
        job = step.job
    return job, steps


def leased(job: JobFacts, node: str = "node_a", lease: str = "lease_1") -> JobFacts:
    return run(job, lifecycle.Leased(10.0, node, lease, 60.0))[0]


def submitted(**kwargs) -> JobFacts:
    return transition(new_job(**kwargs), lifecycle.Submitted(1.0, "submitted")).job


def test_a_submission_holds_the_price_and_wakes_the_dispatcher():
    step = transition(new_job(), lifecycle.Submitted(1.0, "held"))
    assert step.job.state == QUEUED and step.job.queued_at == 1.0
    assert step.moves == (Hold(PRICE),) and step.effects == (WakeDispatcher(),)
    # A verification re-run holds nothing: the platform pays for it.
    assert transition(new_job(rerun=True), lifecycle.Submitted(1.0)).moves == ()


def test_a_lease_counts_an_attempt_and_names_its_node_until_the_job_is_queued_again():
    job = leased(submitted())
    assert (job.state, job.attempt, job.node_id, job.lease_id, job.lease_expires_at) == (
        LEASED,
        1,
        "node_a",
        "lease_1",
        70.0,
    )
    job = transition(job, lifecycle.Started(11.0, "node_a")).job
    assert job.state == RUNNING
    lost = transition(job, lifecycle.LeaseLost(20.0, "the lease expired"))
    assert lost.job.state == QUEUED and lost.job.node_id is None and lost.job.lease_id is None
    assert lost.job.progress is None and lost.job.queued_at == 20.0
    # The node may still run it: it is told to stop, and the dispatcher woken.
    assert lost.effects == (StopOnNode("node_a", "job_1", "lease_1", "the lease expired"), WakeDispatcher())
    assert "attempt 1 of 3 used" in lost.message


def test_a_lost_lease_requeues_until_attempts_run_out_then_refunds():
    job = submitted(max_attempts=2)
    for _ in range(2):
        job = leased(job)
        step = transition(job, lifecycle.LeaseLost(5.0, "node gone"))
        job = step.job
    assert job.state == FAILED and job.error_kind == lifecycle.ATTEMPTS_EXHAUSTED
    assert "gave up after 2 attempts" in step.message
    assert step.moves == (Refund(f"job failed: {step.message}"),)
    # A node that reconnected without the job is not told to stop what it does not run.
    quiet = transition(leased(submitted()), lifecycle.LeaseLost(5.0, "gone", node_may_run_it=False))
    assert quiet.effects == (WakeDispatcher(),)


def test_an_invalid_spec_fails_once_a_second_node_confirms_it():
    first = transition(leased(submitted()), lifecycle.FailureReported(3.0, "invalid_spec", "bad line"))
    assert first.job.state == QUEUED and first.job.excluded_nodes == ("node_a",)
    assert first.job.attempt == 0, "the first node's word uses no attempt"
    assert "checking on another node" in first.message
    second = transition(
        leased(first.job, "node_b", "lease_2"), lifecycle.FailureReported(4.0, "invalid_spec", "bad line")
    )
    assert second.job.state == FAILED and second.job.error_kind == "invalid_spec"
    assert [type(move) for move in second.moves] == [Refund]


def test_a_job_too_big_for_a_node_tries_elsewhere_without_using_an_attempt():
    job = submitted(max_attempts=1)
    step = transition(leased(job), lifecycle.FailureReported(3.0, "insufficient_memory", "needs 9 GiB"))
    assert step.job.state == QUEUED and step.job.excluded_nodes == ("node_a",) and step.job.attempt == 0


def test_a_job_a_seller_declines_goes_to_another_node_without_using_an_attempt():
    job = submitted(max_attempts=1)
    step = transition(leased(job), lifecycle.FailureReported(3.0, "declined", "unprofitable here"))
    assert step.job.state == QUEUED and step.job.excluded_nodes == ("node_a",) and step.job.attempt == 0


def test_crashes_are_retried_then_given_up_and_out_of_memory_avoids_the_node():
    job = submitted(max_attempts=2)
    first = transition(leased(job), lifecycle.FailureReported(3.0, "crashed", "SIGSEGV"))
    assert first.job.state == QUEUED and first.job.excluded_nodes == ()
    second = transition(leased(first.job), lifecycle.FailureReported(4.0, "out_of_memory", "OOM"))
    assert second.job.state == FAILED and second.job.excluded_nodes == ("node_a",)


def test_a_handed_back_job_is_queued_without_using_an_attempt():
    step = transition(leased(submitted(max_attempts=1)), lifecycle.FailureReported(3.0, "released", "paused"))
    assert step.job.state == QUEUED and step.job.attempt == 0 and "handed back" in step.message


def test_cancelling_refunds_and_stops_the_node_but_only_an_open_buyers_job():
    running = transition(leased(submitted()), lifecycle.Started(2.0, "node_a")).job
    step = transition(running, lifecycle.Cancelled(3.0))
    assert step.job.state == CANCELLED and step.job.lease_id is None and step.job.finished_at == 3.0
    assert step.moves == (Refund("job cancelled: cancelled by the buyer"),)
    assert step.effects == (StopOnNode("node_a", "job_1", "lease_1", "the buyer cancelled the job"),)
    assert transition(submitted(), lifecycle.Cancelled(3.0)).effects == ()
    with pytest.raises(NotAllowed, match="cancelled already"):
        transition(step.job, lifecycle.Cancelled(4.0))
    with pytest.raises(NotAllowed, match="verifies another job"):
        transition(submitted(rerun=True), lifecycle.Cancelled(4.0))


def test_a_result_charges_the_price_split_with_the_platform():
    step = transition(leased(submitted()), lifecycle.ResultAccepted(5.0, "node_a", PRICE, FEE))
    assert step.job.state == COMPLETED and step.job.node_id == "node_a" and step.job.lease_id is None
    assert step.moves == (Charge("node_a", 900_000, 100_000, return_rest=False, memo="job completed"),)
    # A batch priced below what it held gives the rest back.
    cheaper = transition(leased(submitted()), lifecycle.ResultAccepted(5.0, "node_a", 500_000, FEE))
    assert cheaper.job.price_micro == 500_000 and cheaper.moves[0].return_rest
    # Built on another node's checkpoint: charged, but held until a trusted node verifies it.
    held = transition(
        leased(submitted()), lifecycle.ResultAccepted(5.0, "node_a", PRICE, FEE, held_for_verification=True)
    )
    assert held.job.state == VERIFYING and "held" in held.message
    # A re-run's result moves no money.
    assert transition(leased(submitted(rerun=True)), lifecycle.ResultAccepted(5.0, "n", 0, FEE)).moves == ()


def test_verdicts():
    done = transition(leased(submitted()), lifecycle.ResultAccepted(5.0, "node_a", PRICE, FEE)).job
    assert transition(done, lifecycle.VerificationPassed(6.0, "same")).job.state == VERIFIED
    held = transition(
        leased(submitted()), lifecycle.ResultAccepted(5.0, "node_a", PRICE, FEE, held_for_verification=True)
    ).job
    failed = transition(held, lifecycle.VerificationFailed(6.0, "losses differ"))
    assert failed.job.state == COMPLETED and failed.moves == () and "replaces" in failed.message
    assert transition(held, lifecycle.DeliveredUnverified(7.0)).job.state == COMPLETED
    with pytest.raises(NotAllowed):
        transition(done, lifecycle.DeliveredUnverified(7.0))


def stopped_trial(from_step: int, to_step: int) -> lifecycle.Transition:
    running = transition(leased(submitted()), lifecycle.Started(2.0, "node_a")).job
    return transition(
        running, lifecycle.TrialStopped(3.0, "worse than the median", 10, from_step, to_step, FEE)
    )


def test_a_stopped_trial_is_charged_for_the_steps_its_checkpoint_shows():
    step = stopped_trial(2, 6)
    assert step.job.state == CANCELLED and step.job.error_kind == STOPPED_EARLY
    assert step.job.price_micro == PRICE * 4 // 10
    (charge,) = step.moves
    assert isinstance(charge, Charge) and charge.return_rest
    assert charge.node_share_micro + charge.fee_micro == PRICE * 4 // 10
    assert "steps 3 to 6 (4 of 10" in step.message
    # No checkpoint after its resume point: nothing charged at all.
    nothing = stopped_trial(6, 6)
    assert nothing.job.price_micro == 0 and isinstance(nothing.moves[0], Refund)
    # Verified: it stays stopped. A mismatch gives the buyer the charge back.
    assert transition(step.job, lifecycle.VerificationPassed(4.0, "ok")).job.state == CANCELLED
    mismatch = transition(step.job, lifecycle.VerificationFailed(4.0, "checkpoint is worse"))
    assert mismatch.job.state == CANCELLED and mismatch.moves == (
        ReturnCharge(PRICE * 4 // 10, mismatch.moves[0].memo),
    )


def test_a_rerun_no_trusted_node_took_is_dropped():
    step = transition(submitted(rerun=True), lifecycle.RerunDropped(9.0, "window passed"))
    assert step.job.state == CANCELLED and step.moves == ()
    with pytest.raises(NotAllowed):
        transition(submitted(), lifecycle.RerunDropped(9.0, "window passed"))


def test_a_job_whose_stored_spec_cannot_be_sent_fails_before_any_lease_and_is_refunded():
    step = transition(submitted(), lifecycle.Unsendable(1.0, "its spec can no longer be sent"))
    assert (step.job.state, step.job.error_kind, step.job.node_id) == (FAILED, "invalid_spec", None)
    assert step.moves == (Refund("job failed: its spec can no longer be sent"),)
    assert transition(submitted(rerun=True), lifecycle.Unsendable(1.0, "x")).moves == ()
    with pytest.raises(NotAllowed):
        transition(leased(submitted()), lifecycle.Unsendable(1.0, "x"))


# ---- any sequence of events


EVENTS = st.sampled_from(
    [
        lifecycle.Leased(1.0, "node_a", "lease_1", 60.0),
        lifecycle.Leased(1.0, "node_b", "lease_2", 60.0),
        lifecycle.Started(2.0, "node_a"),
        lifecycle.LeaseLost(3.0, "expired"),
        lifecycle.LeaseReturned(3.0),
        lifecycle.FailureReported(3.0, "crashed", "boom"),
        lifecycle.FailureReported(3.0, "invalid_spec", "bad"),
        lifecycle.FailureReported(3.0, "released", "paused"),
        lifecycle.Cancelled(4.0),
        lifecycle.ResultAccepted(5.0, "node_a", PRICE, FEE),
        lifecycle.ResultAccepted(5.0, "node_a", PRICE // 2, FEE, held_for_verification=True),
        lifecycle.TrialStopped(5.0, "worse", 10, 0, 4, FEE),
        lifecycle.VerificationPassed(6.0, "ok"),
        lifecycle.VerificationFailed(6.0, "differs"),
        lifecycle.DeliveredUnverified(7.0),
        lifecycle.Unsendable(1.0, "its stored spec no longer validates"),
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(EVENTS, max_size=20), st.booleans(), st.integers(1, 4))
def test_any_sequence_settles_escrow_once_and_never_leaves_a_lease_on_a_finished_job(events, rerun, attempts):
    job = transition(new_job(rerun=rerun, max_attempts=attempts), lifecycle.Submitted(0.0)).job
    settles, charged = 0, False
    for event in events:
        try:
            step = transition(job, event)
        except NotAllowed:
            continue
        job = step.job
        settles += sum(isinstance(move, Charge | Refund) for move in step.moves)
        charged = charged or any(isinstance(move, Charge) for move in step.moves)
        # Only a charge is given back (the ledger posts it once per job, whatever repeats it).
        assert charged or not any(isinstance(move, ReturnCharge) for move in step.moves)
        assert not (rerun and step.moves), "a re-run moves no money"
        assert 0 <= job.attempt <= job.max_attempts
        assert job.state in protocol.JOB_STATES
        if job.state in lifecycle.HELD_STATES:
            assert job.node_id and job.lease_id
        else:
            assert job.lease_id is None and job.lease_expires_at is None
        if job.state == QUEUED:
            assert job.node_id is None
    # Escrow is settled (charged or refunded) at most once, and exactly once when the job is over.
    assert settles <= 1
    if job.state in protocol.FINAL_JOB_STATES | {VERIFYING} and not rerun:
        assert settles == 1


def test_every_state_and_failure_kind_is_declared_once_and_understood_everywhere():
    from typing import get_args

    from compute_swarm import protocol
    from compute_swarm.coordinator.transport.api.openai_fine_tuning import OPENAI_STATUS

    # The buyer-facing names come from the protocol; OpenAI's client is told one for each.
    assert set(OPENAI_STATUS) == set(protocol.JOB_STATES)
    # Every kind a node may report leads somewhere (queued again, or failed), none is refused.
    for kind in get_args(protocol.FailureKind):
        outcome = lifecycle.after_failure(kind, "why", 1, 2)
        assert outcome.state in (QUEUED, FAILED)
