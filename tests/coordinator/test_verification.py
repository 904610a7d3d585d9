"""Verification of untrusted nodes: the pure policy (coordinator.domain.verification), the ledger moves it
makes (release, clawback, paying the trusted node), and the whole loop through a real coordinator
process with scripted nodes: a sampled job waits for a trusted node, which re-runs it and settles it
(verified and released, or a mismatch clawed back, its result replaced and its node quarantined), and
an unsampled job's credit is released when its window passes."""

from __future__ import annotations

import itertools
import json
import math
import secrets
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from compute_swarm.coordinator.domain.verification import (
    MISMATCH,
    PASSED,
    OverheadBudget,
    VerificationPolicy,
    after_verification,
    compare_completions,
    compare_lora,
    is_trusted,
    lifted,
    line_agrees,
    new_record,
    sampling_rate,
)
from compute_swarm.coordinator.service import accounts
from compute_swarm.coordinator.settings import Settings
from compute_swarm.coordinator.store import ledger
from compute_swarm.coordinator.store.database import Database
from compute_swarm.sdk.client import NodeClient, SwarmClient
from tests.coordinator.test_node_socket import ScriptedNode, check_ledger, submit
from tests.swarm_processes import Coordinator, wait_for

# The scripted nodes keep their sockets open across calls, as in test_node_socket.py.
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager")

POLICY = VerificationPolicy()
ADMIN_TOKEN = secrets.token_urlsafe(32)
# How long a free node is watched to show that it is offered nothing: four sweeps of the test
# coordinator (SWARM_SWEEP_INTERVAL_SECONDS=0.5), and dispatch wakes at once on any change.
QUIET_SECONDS = 2.0


# ---- 1. the policy


def test_a_new_node_is_sampled_often_and_less_with_each_clean_check():
    record = new_record(POLICY)
    assert record.error_rate == POLICY.initial_error_rate
    # 15 % with the defaults (the brief for this test said 25 %, the policy's first defaults; the
    # defaults changed to 0.06 × 0.9 per clean check: 15 %, about 5 % after 10 clean checks).
    rate = sampling_rate(record, POLICY)
    assert rate == pytest.approx(POLICY.base_rate * POLICY.initial_error_rate / POLICY.target_error_rate)
    assert rate == pytest.approx(0.15)
    assert POLICY.minimum_rate < rate < POLICY.maximum_rate
    assert not record.quarantined and not is_trusted(record, POLICY)
    for _ in range(10):
        record = after_verification(record, PASSED, POLICY)
    assert 0.04 < sampling_rate(record, POLICY) < 0.06


def test_clean_verifications_lower_the_rate_to_the_minimum_and_never_below():
    record, rates = new_record(POLICY), []
    for _ in range(200):
        record = after_verification(record, PASSED, POLICY)
        rates.append(sampling_rate(record, POLICY))
    assert rates[0] < sampling_rate(new_record(POLICY), POLICY)
    assert all(later <= earlier for earlier, later in itertools.pairwise(rates))
    assert rates[-1] == POLICY.minimum_rate and min(rates) == POLICY.minimum_rate
    assert record.clean_streak == 200 and record.mismatches == 0


def test_a_mismatch_raises_the_rate_up_to_the_maximum():
    established = new_record(POLICY)
    for _ in range(100):
        established = after_verification(established, PASSED, POLICY)
    assert sampling_rate(established, POLICY) == POLICY.minimum_rate
    cheated = after_verification(established, MISMATCH, POLICY)
    assert sampling_rate(cheated, POLICY) > 10 * POLICY.minimum_rate
    assert cheated.clean_streak == 0 and cheated.mismatches == 1
    # Mismatches keep adding to the error estimate, but the rate stays within maximum_rate.
    lenient = VerificationPolicy(quarantine_after_mismatches=100)
    record = new_record(lenient)
    for _ in range(10):
        record = after_verification(record, MISMATCH, lenient)
        assert sampling_rate(record, lenient) <= lenient.maximum_rate
    assert sampling_rate(record, lenient) == lenient.maximum_rate
    assert record.error_rate == 1.0


def test_two_mismatches_quarantine_a_node_and_one_does_not():
    once = after_verification(new_record(POLICY), MISMATCH, POLICY)
    assert POLICY.quarantine_after_mismatches == 2
    assert not once.quarantined
    # Clean verifications in between do not forgive: mismatches count since the last lift.
    cleaned = after_verification(once, PASSED, POLICY)
    assert cleaned.mismatches == 1 and not cleaned.quarantined
    twice = after_verification(cleaned, MISMATCH, POLICY)
    assert twice.quarantined and twice.mismatches == 2
    # A passed verification of an older job does not lift it either; only ops do.
    assert after_verification(twice, PASSED, POLICY).quarantined
    strict = VerificationPolicy(quarantine_after_mismatches=1)
    assert after_verification(new_record(strict), MISMATCH, strict).quarantined


def test_trust_comes_from_ops_only_and_never_while_quarantined():
    record = new_record(POLICY)
    assert not is_trusted(record, POLICY)
    assert is_trusted(replace(record, trusted_by_ops=True), POLICY)
    # A long clean record earns a low sampling rate, never the right to verify others (issue 16, M5:
    # a node trusted by its own record could clear its sybils).
    for _ in range(1000):
        record = after_verification(record, PASSED, POLICY)
    assert record.clean_streak == 1000 and not is_trusted(record, POLICY)
    assert not is_trusted(replace(record, trusted_by_ops=True, quarantined=True), POLICY)


def test_lifting_a_quarantine_resets_the_mismatches_and_watches_the_node_closely():
    record = new_record(POLICY)
    for _ in range(2):
        record = after_verification(record, MISMATCH, POLICY)
    record = replace(record, trusted_by_ops=True)
    assert record.quarantined and not is_trusted(record, POLICY)
    back = lifted(record, POLICY)
    assert not back.quarantined and back.mismatches == 0 and back.clean_streak == 0
    assert back.trusted_by_ops and is_trusted(back, POLICY)  # ops' own trust survives
    assert sampling_rate(back, POLICY) >= sampling_rate(new_record(POLICY), POLICY)
    # Quarantined again only after as many new mismatches as the first time.
    assert not after_verification(back, MISMATCH, POLICY).quarantined


def test_the_overhead_budget_scales_every_rate_by_one_factor_only_beyond_the_budget():
    within = OverheadBudget(0.10)
    assert [within.rate(wanted) for wanted in (0.05, 0.01, 0.10, 0.02)] == [0.05, 0.01, 0.10, 0.02]
    # A wave of new nodes (15 % each) wants more than 10 %: each gets 10 %, the budget.
    wave = OverheadBudget(0.10)
    assert wave.rate(0.15) == pytest.approx(0.10)
    # A suspect among them keeps more than the others, in proportion.
    suspect, newcomer = wave.rate(0.5), wave.rate(0.15)
    assert suspect == pytest.approx(0.5 / 0.15 * newcomer, rel=1e-2) and suspect > newcomer
    # Over many jobs the share re-run is the budget.
    mixed = OverheadBudget(0.10, smoothing=0.01)
    applied = [mixed.rate(0.5 if job % 10 == 0 else 0.15) for job in range(5000)]
    assert sum(applied[-1000:]) / 1000 == pytest.approx(0.10, rel=0.05)
    assert OverheadBudget(1.0).rate(1.0) == 1.0  # what the loopback tests below use to sample every job


def test_the_settings_make_the_policy():
    settings = Settings(
        data_dir=Path("/nonexistent"),
        verification_base_rate=0.2,
        verification_minimum_rate=0.1,
        verification_maximum_rate=0.3,
        quarantine_after_mismatches=5,
        verification_overhead_budget=0.25,
    )
    policy = settings.verification_policy()
    assert (policy.base_rate, policy.minimum_rate, policy.maximum_rate) == (0.2, 0.1, 0.3)
    assert policy.quarantine_after_mismatches == 5 and policy.overhead_budget == 0.25
    with pytest.raises(ValueError, match="must not exceed"):
        Settings(data_dir=Path("/nonexistent"), verification_minimum_rate=0.6, verification_maximum_rate=0.5)


# ---- 2. the comparisons


STEPS = {1: 2.0, 2: 1.8, 3: 1.6, 4: 1.5, 5: 1.45}


def lora_verdict(delivered: float | None, trusted: float | None, reported=STEPS, measured=STEPS):
    return compare_lora(
        delivered_eval_loss=delivered,
        trusted_eval_loss=trusted,
        reported_losses=dict(reported),
        trusted_losses=dict(measured),
        policy=POLICY,
    )


def scaled(losses: dict[int, float], *factors: float) -> dict[int, float]:
    return {step: loss * factors[index % len(factors)] for index, (step, loss) in enumerate(losses.items())}


def test_equal_losses_pass():
    verdict = lora_verdict(1.5, 1.5)
    assert verdict.outcome == PASSED and "1.5000" in verdict.reason


def test_a_delivered_adapter_worse_than_the_tolerance_is_a_mismatch_naming_both_losses():
    # Allowed: 1.5 × 1.10 + 0.05 = 1.70.
    assert lora_verdict(1.69, 1.5).outcome == PASSED
    verdict = lora_verdict(2.0, 1.5)
    assert verdict.outcome == MISMATCH
    assert "2.0000" in verdict.reason and "1.5000" in verdict.reason and "1.7000" in verdict.reason
    # Better than the trusted run is no fault.
    assert lora_verdict(0.5, 1.5).outcome == PASSED


@pytest.mark.parametrize("delivered", [None, math.nan, math.inf])
def test_a_delivered_adapter_that_could_not_be_evaluated_is_a_mismatch(delivered):
    verdict = lora_verdict(delivered, 1.5)
    assert verdict.outcome == MISMATCH and "could not be evaluated" in verdict.reason


def test_reported_training_losses_far_from_the_trusted_runs_are_a_mismatch():
    verdict = lora_verdict(1.5, 1.5, reported=scaled(STEPS, 1.3))
    assert verdict.outcome == MISMATCH and "30%" in verdict.reason
    assert lora_verdict(1.5, 1.5, reported=scaled(STEPS, 0.7)).outcome == MISMATCH


@pytest.mark.parametrize("factors", [(1.05,), (0.95,), (1.03, 0.97), (1.02, 0.99, 1.03)])
def test_losses_within_a_few_percent_pass_as_hardware_noise(factors):
    # bf16 on a GPU against fp32 on a CPU: a few percent, step by step and on the held-out set.
    verdict = lora_verdict(1.5 * factors[0], 1.5, reported=scaled(STEPS, *factors))
    assert verdict.outcome == PASSED, verdict.reason


def test_without_a_held_out_set_the_training_losses_decide():
    assert lora_verdict(None, None).outcome == PASSED
    assert lora_verdict(None, None, reported=scaled(STEPS, 1.5)).outcome == MISMATCH
    verdict = lora_verdict(None, None, reported={})
    assert verdict.outcome == MISMATCH and "no training loss" in verdict.reason
    # A node that reports only some steps is compared on those.
    assert lora_verdict(1.5, 1.5, reported={3: 1.6}).outcome == PASSED


ANSWERS = [
    "The capital of France is Paris, a city on the Seine with many bridges, old churches and museums that "
    "visitors from all over the world come to see.",
    "Two plus two is four, as anyone who has counted on their fingers will happily tell you, and as every "
    "calculator in the world agrees.",
    "Water boils at one hundred degrees Celsius at sea level, and at lower temperatures high up on mountains "
    "where the air pressure is lower.",
    "A triangle has three sides and three angles that always add up to one hundred and eighty degrees, "
    "whatever its shape or its size.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside the green leaves of "
    "plants, which feeds nearly all life.",
]


def test_identical_answers_agree():
    assert compare_completions(ANSWERS, list(ANSWERS), POLICY).outcome == PASSED
    assert compare_completions([], [], POLICY).outcome == PASSED


def test_answers_that_diverge_late_still_agree():
    late = [" ".join([*answer.split()[:20], "but", "then", "something", "else"]) for answer in ANSWERS]
    assert all(len(answer.split()) > 20 for answer in ANSWERS)
    verdict = compare_completions(late, ANSWERS, POLICY)
    assert verdict.outcome == PASSED, verdict.reason
    # A shorter answer agrees when it is a prefix of the trusted one (a greedy run cut at max_tokens).
    short = [" ".join(answer.split()[:5]) for answer in ANSWERS]
    assert compare_completions(short, ANSWERS, POLICY).outcome == PASSED


def test_answers_padded_after_the_right_words_are_a_mismatch():
    # What the review measured: "Paris." and 3,000 junk words passed, and were paid by the token.
    padded = [answer + " junk" * 3000 for answer in ANSWERS]
    verdict = compare_completions(padded, ANSWERS, POLICY)
    assert verdict.outcome == MISMATCH, verdict.reason
    assert not line_agrees("Paris." + " junk" * 3000, "Paris.", POLICY)
    # A greedy answer running a little past where the trusted run stopped still agrees.
    assert line_agrees("Paris is the capital of France. It is", "Paris is the capital of France.", POLICY)


def test_answers_padded_with_one_long_word_are_a_mismatch_in_tokens():
    """One word of junk passed the word count ("Paris." then 3,000 letters without a space is two words)
    and was paid up to max_tokens: the lengths are compared in tokens (or bytes) too."""
    from compute_swarm.coordinator.service.tokens import counter_from_gguf
    from compute_swarm.engine.catalogue import fetch_catalogue_model
    from compute_swarm.engine.jobs import DEFAULT_MODEL

    counter = counter_from_gguf(fetch_catalogue_model(DEFAULT_MODEL))
    junk = "Paris. " + "x" * 3000
    assert len(junk.split()) == 2
    for count_tokens in (None, counter.count):
        assert not line_agrees(junk, "Paris.", POLICY, count_tokens)
        verdict = compare_completions(
            [answer + " " + "x" * 3000 for answer in ANSWERS], ANSWERS, POLICY, count_tokens
        )
        assert verdict.outcome == MISMATCH, verdict.reason
        assert line_agrees(
            "Paris is the capital of France. It is", "Paris is the capital of France.", POLICY, count_tokens
        )
        assert compare_completions(ANSWERS, list(ANSWERS), POLICY, count_tokens).outcome == PASSED


def test_answers_changed_from_their_first_word_are_a_mismatch():
    forged = ["Nonsense " + " ".join(answer.split()[1:]) for answer in ANSWERS[:3]] + ANSWERS[3:]
    verdict = compare_completions(forged, ANSWERS, POLICY)
    assert verdict.outcome == MISMATCH and "2 of 5" in verdict.reason
    # One line in ten may differ (a greedy tie broken early on other hardware).
    many = ANSWERS * 2
    one_off = ["Nonsense " + many[0], *many[1:]]
    assert compare_completions(one_off, many, POLICY).outcome == PASSED


def test_a_different_number_of_answers_is_a_mismatch():
    verdict = compare_completions(ANSWERS[:-1], ANSWERS, POLICY)
    assert verdict.outcome == MISMATCH and "4 answers delivered" in verdict.reason and "5" in verdict.reason
    assert compare_completions(ANSWERS, ANSWERS[:-1], POLICY).outcome == MISMATCH


# ---- 3. the ledger


@pytest.fixture
def database(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    database.upgrade()
    yield database
    database.close()
    check_ledger(tmp_path, file_name="ledger.sqlite3")


def charged_job(session, job_id: str, node_id: str, share: int = 270_000, fee: int = 30_000) -> None:
    buyer, _ = accounts.create_buyer(session, f"buyer of {job_id}", 1_000_000)
    ledger.hold_in_escrow(session, buyer.id, job_id, share + fee)
    assert ledger.charge(session, job_id, node_id, share, fee)


def balances(session, node_id: str) -> tuple[int, int]:
    return (
        ledger.balance(session, ledger.node_pending_account(node_id)),
        ledger.balance(session, ledger.node_available_account(node_id)),
    )


def test_release_moves_the_jobs_pending_credit_to_available_once(database):
    with database.transaction() as session:
        assert ledger.release(session, "job_r", "node_a", memo="before any charge") == 0
        charged_job(session, "job_r", "node_a")
        charged_job(session, "job_other", "node_a", share=90_000, fee=10_000)
        assert ledger.node_credit_for_job(session, "job_r", "node_a") == 270_000
        assert ledger.node_credit_for_job(session, "job_r", "node_b") == 0
        assert balances(session, "node_a") == (360_000, 0)
        assert ledger.release(session, "job_r", "node_a", memo="verified") == 270_000
        assert balances(session, "node_a") == (90_000, 270_000)
        assert ledger.release(session, "job_r", "node_a", memo="window passed") == 0
        assert balances(session, "node_a") == (90_000, 270_000)
        # Releasing is not earning again; the job's charge stays what the node was credited.
        assert ledger.total_credited(session, ledger.node_accounts("node_a")) == 360_000


def test_a_clawback_takes_the_pending_credit_and_nothing_is_released_after(database):
    with database.transaction() as session:
        charged_job(session, "job_c", "node_a")
        assert ledger.clawback(session, "job_c", "node_a", memo="mismatch") == 270_000
        assert balances(session, "node_a") == (0, 0)
        assert ledger.balance(session, ledger.FEES) == 300_000
        assert ledger.clawback(session, "job_c", "node_a", memo="again") == 0
        assert ledger.release(session, "job_c", "node_a", memo="window passed") == 0
        assert balances(session, "node_a") == (0, 0)
        # The clawback counts against what the node was credited.
        assert ledger.total_credited(session, ledger.node_accounts("node_a")) == 0


def test_a_clawback_after_release_takes_it_from_available(database):
    with database.transaction() as session:
        charged_job(session, "job_late", "node_a")
        assert ledger.release(session, "job_late", "node_a", memo="window passed") == 270_000
        assert ledger.clawback(session, "job_late", "node_a", memo="mismatch, late") == 270_000
        assert balances(session, "node_a") == (0, 0)
        assert ledger.clawback(session, "job_late", "node_a", memo="again") == 0
        assert ledger.balance(session, ledger.FEES) == 300_000
        # Taken back from available, it still counts against what the node was credited.
        assert ledger.total_credited(session, ledger.node_accounts("node_a")) == 0


def test_the_platform_pays_the_trusted_node_from_its_fees_available_at_once(database):
    with database.transaction() as session:
        charged_job(session, "job_v", "node_a")
        assert ledger.pay_for_verification(session, "job_check", "node_t", 270_000, memo="verified job_v")
        assert not ledger.pay_for_verification(session, "job_check", "node_t", 270_000, memo="twice")
        assert not ledger.pay_for_verification(session, "job_check_2", "node_t", 0, memo="nothing")
        assert balances(session, "node_t") == (0, 270_000)
        assert ledger.balance(session, ledger.FEES) == 30_000 - 270_000
        assert ledger.total(session) == 0


# ---- 4. through a real coordinator


def everything_sampled_environment() -> dict[str, str]:
    return {
        "SWARM_ADMIN_TOKEN": ADMIN_TOKEN,
        "SWARM_VERIFICATION_BASE_RATE": "1",
        "SWARM_VERIFICATION_MINIMUM_RATE": "1",
        "SWARM_VERIFICATION_MAXIMUM_RATE": "1",
        # Without it the overhead budget (10 %) would scale the wanted 100 % down to 10 %.
        "SWARM_VERIFICATION_OVERHEAD_BUDGET": "1",
        "SWARM_QUARANTINE_AFTER_MISMATCHES": "1",
    }


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """Every completed job is re-run; one mismatch quarantines its node."""
    server = Coordinator(
        tmp_path_factory.mktemp("sampled"), environment=everything_sampled_environment()
    ).start()
    yield server
    server.stop()
    check_ledger(server.data_dir)


@pytest.fixture(scope="module")
def unsampled(tmp_path_factory):
    """No job is re-run; credit waits a one-second window."""
    server = Coordinator(
        tmp_path_factory.mktemp("unsampled"),
        environment={
            "SWARM_ADMIN_TOKEN": ADMIN_TOKEN,
            "SWARM_VERIFICATION_BASE_RATE": "0",
            "SWARM_VERIFICATION_MINIMUM_RATE": "0",
            "SWARM_VERIFICATION_MAXIMUM_RATE": "0",
            "SWARM_VERIFICATION_WINDOW_SECONDS": "1",
        },
    ).start()
    yield server
    server.stop()
    check_ledger(server.data_dir)


@pytest.fixture(scope="module")
def short_window(tmp_path_factory):
    """Every completed job is re-run, and credit waits a one-second window."""
    server = Coordinator(
        tmp_path_factory.mktemp("short-window"),
        environment={**everything_sampled_environment(), "SWARM_VERIFICATION_WINDOW_SECONDS": "1"},
    ).start()
    yield server
    server.stop()
    check_ledger(server.data_dir)


def ops(coordinator: Coordinator, path: str, body: dict | None = None) -> httpx.Response:
    return httpx.post(
        coordinator.url + path,
        json=body,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=10,
    )


def overview_row(coordinator: Coordinator, node_id: str) -> dict:
    answer = httpx.get(
        coordinator.url + "/api/ops/overview", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
    )
    assert answer.status_code == 200, answer.text
    return next(row for row in answer.json()["nodes"] if row["id"] == node_id)


def get(coordinator: Coordinator, path: str, token: str) -> httpx.Response:
    return httpx.get(coordinator.url + path, headers={"Authorization": f"Bearer {token}"}, timeout=10)


def buyer_receipt(coordinator: Coordinator, key: str, job_id: str) -> dict:
    answer = get(coordinator, f"/api/jobs/{job_id}/receipt", key)
    assert answer.status_code == 200, answer.text
    return answer.json()


def node_receipt(node: ScriptedNode, job_id: str) -> httpx.Response:
    return get(node.coordinator, f"/api/nodes/me/jobs/{job_id}/receipt", node.token)


def progress(node: ScriptedNode, lease: dict, losses: list[float]) -> None:
    for step, loss in enumerate(losses, start=1):
        node.send({"type": "progress", "job_id": lease["job_id"], "lease_id": lease["lease_id"],
                   "step": step, "total_steps": len(losses), "loss": loss})  # fmt: skip


def report(node: ScriptedNode, lease: dict, sha256: str, eval_loss: float, **more: object) -> dict:
    node.send({"type": "result", "job_id": lease["job_id"], "lease_id": lease["lease_id"], "sha256": sha256,
               "steps": 3, "final_loss": 1.6, "eval_loss": eval_loss, "train_tokens": 1000, "seconds": 2.0,
               **more})  # fmt: skip
    return node.receive_type("ack")


def offered_nothing(*nodes: ScriptedNode) -> None:
    """None of these (free) nodes is sent a lease while the coordinator sweeps a few times."""
    time.sleep(QUIET_SECONDS)
    for node in nodes:
        with pytest.raises(TimeoutError):
            node.receive_type("lease", timeout=0.3)


def money(receipt: dict, kind: str) -> dict[str, int]:
    return {line["account"]: line["amount_micro"] for line in receipt["money"] if line["kind"] == kind}


def completed_job(coordinator: Coordinator, buyer: SwarmClient, node: ScriptedNode, losses: list[float]):
    """The buyer's job, leased to `node` (the only free node), run and reported: (job, lease, result
    sha256, the node's share)."""
    job = submit(buyer)
    lease = node.receive_type("lease")
    assert lease["job_id"] == job["id"] and lease["evaluate_result_sha256"] is None
    progress(node, lease, losses)
    sha256 = node.upload_result(lease, b"adapter of " + node.node_id.encode())
    ack = report(node, lease, sha256, eval_loss=1.6)
    assert ack["accepted"] and ack["state"] == "completed", ack
    share = node.receive_type("earnings")["pending_micro"]
    assert 0 < share < job["price_micro"]
    return job, lease, sha256, share


def test_a_sampled_job_is_verified_by_a_trusted_node_that_ops_named(sampled, tmp_path):
    key = sampled.create_buyer("verified buyer", "10")
    buyer = SwarmClient(sampled.url, key)
    node_a = ScriptedNode(sampled, "untrusted-a")
    node_a.connect()
    job, lease_a, result_a, share = completed_job(sampled, buyer, node_a, [2.0, 1.8, 1.6])

    # Sampled: a re-run is queued for a trusted node, and the buyer sees only their own job.
    receipt = buyer_receipt(sampled, key, job["id"])
    assert receipt["verification"]["state"] == "pending"
    assert receipt["verification"]["credit_release_at"] > time.time()
    [rerun] = receipt["verification"]["reruns"]
    assert rerun["state"] == "queued" and rerun["node_id"] is None
    assert [listed["id"] for listed in buyer.jobs()] == [job["id"]]
    assert buyer.job(job["id"])["state"] == "completed"
    assert buyer.job(job["id"])["verification"] == "pending"
    assert buyer.balance() == {"available_micro": 10_000_000 - job["price_micro"], "escrow_micro": 0}

    # No untrusted node gets the re-run, not even while free: neither A, whose job it checks, nor B,
    # nor T before ops trust it.
    node_b, node_t = ScriptedNode(sampled, "untrusted-b"), ScriptedNode(sampled, "to-be-trusted")
    node_b.connect()
    node_t.connect()
    offered_nothing(node_a, node_b, node_t)
    assert get(sampled, f"/api/artifacts/{result_a}", node_b.token).status_code == 404
    assert httpx.post(sampled.url + f"/api/ops/nodes/{node_t.node_id}/trust", json={"trusted": True}).status_code == 401  # fmt: skip

    trusted = ops(sampled, f"/api/ops/nodes/{node_t.node_id}/trust", {"trusted": True})
    assert trusted.status_code == 200, trusted.text
    assert trusted.json() == {
        "node_id": node_t.node_id,
        "trusted_by_ops": True,
        "quarantined": False,
        "approved": True,
    }
    row = overview_row(sampled, node_t.node_id)
    assert row["trusted"] and row["trusted_by_ops"] and not row["quarantined"]

    lease_t = node_t.receive_type("lease", timeout=10)
    assert lease_t["job_id"] == rerun["job_id"]
    assert lease_t["evaluate_result_sha256"] == result_a
    assert lease_t["dataset_sha256"] == lease_a["dataset_sha256"]
    assert lease_t["spec"]["max_steps"] == lease_a["spec"]["max_steps"]
    delivered = node_t.http.download_artifact(result_a, tmp_path / "delivered.tar")
    assert delivered.read_bytes() == b"adapter of " + node_a.node_id.encode() + lease_a["lease_id"].encode()

    progress(node_t, lease_t, [2.03, 1.79, 1.62])
    result_t = node_t.upload_result(lease_t, b"adapter of " + node_t.node_id.encode())
    ack = report(node_t, lease_t, result_t, eval_loss=1.6, delivered_eval_loss=1.612)
    assert ack["accepted"] and ack["state"] == "completed", ack
    assert node_t.receive_type("earnings")["available_micro"] == share

    # Passed: the job is verified, A's credit released, T paid from the platform's fees.
    finished = buyer.job(job["id"])
    assert (finished["state"], finished["verification"]) == ("verified", "passed")
    assert node_a.http.me()["earnings"] == {
        "pending_micro": 0,
        "available_micro": share,
        "jobs_completed": 1,
        "payout_pending_micro": 0,
        "paid_out_micro": 0,
    }
    assert node_t.http.me()["earnings"] == {
        "pending_micro": 0,
        "available_micro": share,
        "jobs_completed": 1,
        "payout_pending_micro": 0,
        "paid_out_micro": 0,
    }
    assert node_b.http.me()["earnings"]["available_micro"] == 0
    assert buyer.balance() == {"available_micro": 10_000_000 - job["price_micro"], "escrow_micro": 0}

    receipt = buyer_receipt(sampled, key, job["id"])
    verification = receipt["verification"]
    assert (
        verification["state"] == "passed" and "held-out loss 1.6120 against 1.6000" in verification["detail"]
    )
    assert verification["credit_release_at"] is None
    assert verification["reruns"] == [
        {
            "job_id": rerun["job_id"],
            "node_id": node_t.node_id,
            "state": "completed",
            "result_sha256": result_t,
        }
    ]
    assert receipt["state"] == "verified" and receipt["completed_by"] == node_a.node_id
    assert receipt["result_sha256"] == result_a
    assert [attempt["node_id"] for attempt in receipt["attempts"]] == [node_a.node_id]
    fee = job["price_micro"] - share
    assert money(receipt, "escrow") == {"buyer": -job["price_micro"], "escrow": job["price_micro"]}
    assert money(receipt, "charge") == {
        "escrow": -job["price_micro"], f"node {node_a.node_id} (pending)": share, "platform fees": fee
    }  # fmt: skip
    assert money(receipt, "release") == {
        f"node {node_a.node_id} (pending)": -share, f"node {node_a.node_id} (available)": share
    }  # fmt: skip
    assert money(receipt, "verification") == {
        "platform fees": -share,
        f"node {node_t.node_id} (available)": share,
    }
    assert sum(line["amount_micro"] for line in receipt["money"]) == 0
    # Sellers read the same receipt, which names the buyer only as "buyer".
    assert "buyer_" not in json.dumps(receipt)

    for node in (node_a, node_t):
        answer = node_receipt(node, job["id"])
        assert answer.status_code == 200, answer.text
        assert answer.json() == receipt
    assert node_receipt(node_b, job["id"]).status_code == 404
    assert node_receipt(node_b, rerun["job_id"]).status_code == 404
    assert node_receipt(node_a, "job_0000000000000000").status_code == 404

    row = overview_row(sampled, node_a.node_id)
    assert row["verifications"] == 1 and row["mismatches"] == 0 and not row["quarantined"]
    assert row["reputation"] == pytest.approx(1 - POLICY.initial_error_rate * POLICY.clean_decay)
    assert row["sampling_rate"] == 1.0 and not row["trusted"]
    for node in (node_a, node_b, node_t):
        node.disconnect()
    check_ledger(sampled.data_dir)


def test_a_mismatch_claws_back_replaces_the_result_and_quarantines_the_node(sampled):
    key = sampled.create_buyer("cheated buyer", "10")
    buyer = SwarmClient(sampled.url, key)
    cheat = ScriptedNode(sampled, "cheat")
    checker = ScriptedNode(sampled, "checker")
    # Trusted before it connects, and connected only once the cheat holds the job.
    assert ops(sampled, f"/api/ops/nodes/{checker.node_id}/trust", {"trusted": True}).status_code == 200
    cheat.connect()
    job, _, result_cheat, share = completed_job(sampled, buyer, cheat, [2.0, 1.8, 1.6])

    checker.connect()
    lease = checker.receive_type("lease", timeout=10)
    assert lease["evaluate_result_sha256"] == result_cheat
    progress(checker, lease, [2.0, 1.8, 1.6])
    result_checker = checker.upload_result(lease, b"the trusted adapter")
    ack = report(checker, lease, result_checker, eval_loss=1.6, delivered_eval_loss=6.5)
    assert ack["accepted"], ack

    receipt = buyer_receipt(sampled, key, job["id"])
    assert receipt["state"] == "completed"
    assert receipt["verification"]["state"] == "mismatch"
    assert "6.5000" in receipt["verification"]["detail"] and "1.6000" in receipt["verification"]["detail"]
    assert money(receipt, "clawback") == {f"node {cheat.node_id} (pending)": -share, "platform fees": share}
    assert money(receipt, "verification") == {"platform fees": -share, f"node {checker.node_id} (available)": share}  # fmt: skip
    assert "release" not in {line["kind"] for line in receipt["money"]}
    # The buyer now gets the trusted run's result.
    assert receipt["result_sha256"] == result_checker
    answer = get(sampled, f"/api/jobs/{job['id']}/result", key)
    assert answer.status_code == 200
    assert answer.headers["X-Content-SHA256"] == result_checker
    assert answer.content == b"the trusted adapter" + lease["lease_id"].encode()
    seen = buyer.job(job["id"])
    assert (seen["result_sha256"], seen["verification"]) == (result_checker, "mismatch")

    assert cheat.http.me()["earnings"]["pending_micro"] == 0
    assert cheat.http.me()["earnings"]["available_micro"] == 0
    assert checker.http.me()["earnings"]["available_micro"] == share
    row = overview_row(sampled, cheat.node_id)
    assert row["reputation"] < 1 - POLICY.initial_error_rate
    assert row["reputation"] == pytest.approx(1 - POLICY.initial_error_rate - POLICY.mismatch_penalty)
    assert row["verifications"] == 1 and row["mismatches"] == 1
    assert row["quarantined"] and row["state"] == "quarantined" and not row["trusted"]

    # Quarantined (one mismatch, as this coordinator is set): free, yet offered no job.
    checker.disconnect()
    waiting = submit(buyer)
    offered_nothing(cheat)
    # Nor after connecting again (the hub reads its standing on connect).
    cheat.disconnect()
    cheat.connect()
    offered_nothing(cheat)
    assert buyer.job(waiting["id"])["state"] == "queued"

    lifted_answer = ops(sampled, f"/api/ops/nodes/{cheat.node_id}/lift-quarantine")
    assert lifted_answer.status_code == 200, lifted_answer.text
    assert lifted_answer.json() == {
        "node_id": cheat.node_id,
        "trusted_by_ops": False,
        "quarantined": False,
        "approved": True,
    }
    assert cheat.receive_type("lease", timeout=10)["job_id"] == waiting["id"]
    row = overview_row(sampled, cheat.node_id)
    assert not row["quarantined"] and row["mismatches"] == 0 and row["state"] == "busy"
    assert row["sampling_rate"] == 1.0
    assert ops(sampled, "/api/ops/nodes/node_0000000000000000/lift-quarantine").status_code == 404

    buyer.cancel(waiting["id"])
    assert cheat.receive_type("cancel")["job_id"] == waiting["id"]
    cheat.disconnect()
    check_ledger(sampled.data_dir)


@pytest.fixture
def slow_sweep(tmp_path):
    """Every job re-run, one mismatch quarantines, and a sweep only every minute: what changes a
    node's standing must reach dispatch by itself."""
    server = Coordinator(
        tmp_path,
        environment={
            **everything_sampled_environment(),
            "SWARM_SWEEP_INTERVAL_SECONDS": "60",
            "SWARM_LEASE_SECONDS": "300",
        },
    ).start()
    yield server
    server.stop()
    check_ledger(server.data_dir)


def test_a_quarantine_and_its_lifting_reach_the_next_dispatch_without_waiting_for_a_sweep(slow_sweep):
    key = slow_sweep.create_buyer("quick buyer", "10")
    buyer = SwarmClient(slow_sweep.url, key)
    cheat, checker = ScriptedNode(slow_sweep, "cheat"), ScriptedNode(slow_sweep, "checker")
    assert ops(slow_sweep, f"/api/ops/nodes/{checker.node_id}/trust", {"trusted": True}).status_code == 200
    cheat.connect()
    completed_job(slow_sweep, buyer, cheat, [2.0, 1.8, 1.6])
    checker.connect()
    lease = checker.receive_type("lease", timeout=10)
    progress(checker, lease, [2.0, 1.8, 1.6])
    result = checker.upload_result(lease, b"the trusted adapter")
    assert report(checker, lease, result, eval_loss=1.6, delivered_eval_loss=6.5)["accepted"]
    checker.disconnect()

    # The verdict quarantined the cheat a moment ago; the job submitted now waits all the same.
    waiting = submit(buyer)
    offered_nothing(cheat)
    assert buyer.job(waiting["id"])["state"] == "queued"

    # Ops lift it: the waiting job goes to it at once, not at the next sweep a minute away.
    assert ops(slow_sweep, f"/api/ops/nodes/{cheat.node_id}/lift-quarantine").status_code == 200
    assert cheat.receive_type("lease", timeout=5)["job_id"] == waiting["id"]
    buyer.cancel(waiting["id"])
    assert cheat.receive_type("cancel")["job_id"] == waiting["id"]
    cheat.disconnect()


def test_a_trusted_nodes_own_job_is_verified_by_another_trusted_node_never_by_itself(sampled):
    key = sampled.create_buyer("trusting buyer", "10")
    buyer = SwarmClient(sampled.url, key)
    first, second = ScriptedNode(sampled, "trusted-first"), ScriptedNode(sampled, "trusted-second")
    for node in (first, second):
        assert ops(sampled, f"/api/ops/nodes/{node.node_id}/trust", {"trusted": True}).status_code == 200
    first.connect()
    # A trusted node takes ordinary jobs too, and its own are sampled like anyone's.
    job, _, result_first, share = completed_job(sampled, buyer, first, [2.0, 1.8, 1.6])
    [rerun] = buyer.receipt(job["id"])["verification"]["reruns"]
    offered_nothing(first)
    # The buyer cannot cancel the re-run of their job.
    refused = httpx.post(
        f"{sampled.url}/api/jobs/{rerun['job_id']}/cancel", headers={"Authorization": f"Bearer {key}"}
    )
    assert refused.status_code == 409 and "verifies" in refused.json()["detail"]

    second.connect()
    lease = second.receive_type("lease", timeout=10)
    assert (lease["job_id"], lease["evaluate_result_sha256"]) == (rerun["job_id"], result_first)
    progress(second, lease, [2.0, 1.8, 1.6])
    ack = report(second, lease, second.upload_result(lease), eval_loss=1.6, delivered_eval_loss=1.6)
    assert ack["accepted"], ack
    assert buyer.job(job["id"])["state"] == "verified"
    assert first.http.me()["earnings"] == {
        "pending_micro": 0,
        "available_micro": share,
        "jobs_completed": 1,
        "payout_pending_micro": 0,
        "paid_out_micro": 0,
    }
    assert second.http.me()["earnings"]["available_micro"] == share
    assert second.http.receipt(job["id"]) == buyer.receipt(job["id"])
    for node in (first, second):
        node.disconnect()
    check_ledger(sampled.data_dir)


def test_a_nodes_earnings_history_counts_verification_pay_and_late_clawbacks(sampled):
    # Regression: at 8f87f5e JobService.earnings_history read only the node's pending account, so a
    # trusted node's pay for verifying (credited to available) and a clawback taken from available
    # after a release were missing from its earnings history and all-time total.
    node_id, token = NodeClient.register(sampled.url, "paid verifier")
    database = Database(f"sqlite:///{sampled.data_dir / 'coordinator.sqlite3'}")
    try:
        with database.transaction() as session:
            assert ledger.pay_for_verification(
                session, f"job_{secrets.token_hex(8)}", node_id, 123_000, memo="verified a job"
            )
            kept, late = f"job_{secrets.token_hex(8)}", f"job_{secrets.token_hex(8)}"
            charged_job(session, kept, node_id, share=50_000, fee=5_000)
            charged_job(session, late, node_id, share=70_000, fee=7_000)
            assert ledger.release(session, late, node_id, memo="verification window passed") == 70_000
            assert ledger.clawback(session, late, node_id, memo="verification mismatch") == 70_000
    finally:
        database.close()
    history = NodeClient(sampled.url, token).earnings_history(days=1)
    assert history["earnings"]["pending_micro"] == 50_000
    assert history["earnings"]["available_micro"] == 123_000
    assert history["total_credited_micro"] == 123_000 + 50_000
    assert sum(hour["credited_micro"] for hour in history["hourly"]) == 123_000 + 50_000
    check_ledger(sampled.data_dir)


def test_an_unsampled_jobs_credit_is_released_when_its_window_passes(unsampled):
    key = unsampled.create_buyer("unsampled buyer", "10")
    buyer = SwarmClient(unsampled.url, key)
    node = ScriptedNode(unsampled, "unwatched")
    node.connect()
    job, _, _, share = completed_job(unsampled, buyer, node, [2.0, 1.8, 1.6])

    receipt = buyer_receipt(unsampled, key, job["id"])
    assert receipt["verification"]["state"] == "skipped" == buyer.job(job["id"])["verification"]
    assert "not sampled" in receipt["verification"]["detail"]
    assert receipt["verification"]["reruns"] == []
    assert receipt["verification"]["credit_release_at"] is not None

    wait_for(lambda: node.http.me()["earnings"]["available_micro"] == share, 10, "the window to pass")
    assert node.http.me()["earnings"]["pending_micro"] == 0
    receipt = buyer_receipt(unsampled, key, job["id"])
    assert receipt["state"] == "completed" and receipt["verification"]["credit_release_at"] is None
    [release] = [line for line in receipt["money"] if line["kind"] == "release" and line["amount_micro"] > 0]
    assert release["memo"] == "verification window passed"
    assert release["account"] == f"node {node.node_id} (available)" and release["amount_micro"] == share
    row = overview_row(unsampled, node.node_id)
    assert row["verifications"] == 0 and row["sampling_rate"] == 0.0
    node.disconnect()
    check_ledger(unsampled.data_dir)


def test_a_rerun_no_trusted_node_takes_within_the_window_is_dropped_and_a_late_mismatch_claws_back(
    short_window,
):
    key = short_window.create_buyer("patient buyer", "10")
    buyer = SwarmClient(short_window.url, key)
    node = ScriptedNode(short_window, "unchecked")
    node.connect()
    # No trusted node at all: the re-run waits out the window, then the job is released unverified.
    job, _, _, share = completed_job(short_window, buyer, node, [2.0, 1.8, 1.6])
    assert buyer.job(job["id"])["verification"] == "pending"
    wait_for(lambda: buyer.job(job["id"])["verification"] == "unavailable", 10, "the window to pass")
    assert node.http.me()["earnings"] == {
        "pending_micro": 0,
        "available_micro": share,
        "jobs_completed": 1,
        "payout_pending_micro": 0,
        "paid_out_micro": 0,
    }
    receipt = buyer.receipt(job["id"])
    assert [rerun["state"] for rerun in receipt["verification"]["reruns"]] == ["cancelled"]
    assert "window" in receipt["verification"]["detail"]

    # A re-run already running when the window passes still decides: its mismatch takes the credit
    # back from what was released.
    checker = ScriptedNode(short_window, "late-checker")
    assert ops(short_window, f"/api/ops/nodes/{checker.node_id}/trust", {"trusted": True}).status_code == 200
    late, _, result_late, late_share = completed_job(short_window, buyer, node, [2.0, 1.8, 1.6])
    checker.connect()
    lease = checker.receive_type("lease", timeout=10)
    assert lease["evaluate_result_sha256"] == result_late
    wait_for(
        lambda: node.http.me()["earnings"]["available_micro"] == share + late_share, 10, "the late window"
    )
    assert buyer.job(late["id"])["verification"] == "pending"
    progress(checker, lease, [2.0, 1.8, 1.6])
    ack = report(checker, lease, checker.upload_result(lease), eval_loss=1.6, delivered_eval_loss=9.0)
    assert ack["accepted"], ack
    assert buyer.job(late["id"])["verification"] == "mismatch"
    assert node.http.me()["earnings"] == {
        "pending_micro": 0,
        "available_micro": share,
        "jobs_completed": 2,
        "payout_pending_micro": 0,
        "paid_out_micro": 0,
    }
    assert money(buyer.receipt(late["id"]), "clawback") == {
        f"node {node.node_id} (available)": -late_share, "platform fees": late_share
    }  # fmt: skip
    assert checker.http.me()["earnings"]["available_micro"] == late_share
    for scripted in (node, checker):
        scripted.disconnect()
    check_ledger(short_window.data_dir)
