"""The lifecycle's decisions, without a database."""

from __future__ import annotations

from compute_swarm.coordinator import lifecycle


def test_a_lost_lease_requeues_until_attempts_run_out():
    assert lifecycle.after_lost_lease(1, 3, "node gone").state == lifecycle.QUEUED
    final = lifecycle.after_lost_lease(3, 3, "node gone")
    assert final.state == lifecycle.FAILED and "3 attempts" in final.message


def test_an_invalid_spec_fails_once_a_second_node_confirms_it():
    first = lifecycle.after_failure("invalid_spec", "bad line", 1, 5)
    assert first.state == lifecycle.QUEUED and first.exclude_node and not first.attempt_counts
    assert "checking on another node" in first.message
    assert (
        lifecycle.after_failure("invalid_spec", "bad line", 1, 5, invalid_before=True).state
        == lifecycle.FAILED
    )


def test_a_job_too_big_for_a_node_tries_elsewhere_without_using_an_attempt():
    outcome = lifecycle.after_failure("insufficient_memory", "needs 9 GiB", 3, 3)
    assert outcome.state == lifecycle.QUEUED and outcome.exclude_node and not outcome.attempt_counts


def test_crashes_are_retried_then_given_up():
    assert lifecycle.after_failure("crashed", "SIGSEGV", 1, 2).state == lifecycle.QUEUED
    assert lifecycle.after_failure("crashed", "SIGSEGV", 2, 2).state == lifecycle.FAILED
    assert lifecycle.after_failure("out_of_memory", "OOM", 1, 2).exclude_node
