"""Checkpoints are untrusted input (issue 16, H4), through a real coordinator with scripted nodes.

The attack: a node uploads a garbage checkpoint late in a job and hands the job back (which uses no
attempt); an honest node resumes from it and delivers a bad adapter; verification used to blame the
honest node. Now a result built on another node's checkpoint is always verified and held from the
buyer until then, and a mismatch is charged to the node that introduced the bad state, found by
checking the checkpoint on a trusted node. Where ops trust no node, a foreign checkpoint is not resumed.
"""

from __future__ import annotations

import secrets

import httpx
import pytest

from compute_swarm.sdk.client import SwarmClient
from tests.coordinator.test_node_socket import ScriptedNode, check_ledger, submit
from tests.coordinator.test_stopped_trials import checkpoint, receive_about
from tests.swarm_processes import Coordinator

pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager")

ADMIN_TOKEN = secrets.token_urlsafe(32)


def environment() -> dict[str, str]:
    """No job is sampled: what is verified here is verified because of its checkpoint."""
    return {
        "SWARM_ADMIN_TOKEN": ADMIN_TOKEN,
        "SWARM_VERIFICATION_BASE_RATE": "0",
        "SWARM_VERIFICATION_MINIMUM_RATE": "0",
        "SWARM_VERIFICATION_MAXIMUM_RATE": "0",
        "SWARM_QUARANTINE_AFTER_MISMATCHES": "1",
    }


@pytest.fixture
def swarm(tmp_path):
    server = Coordinator(tmp_path, environment=environment()).start()
    yield server
    server.stop()
    check_ledger(server.data_dir)


def ops(coordinator: Coordinator, path: str, body: dict | None = None) -> httpx.Response:
    return httpx.post(
        coordinator.url + path, json=body, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
    )


def node_row(coordinator: Coordinator, node_id: str) -> dict:
    answer = httpx.get(
        coordinator.url + "/api/ops/overview", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
    )
    assert answer.status_code == 200, answer.text
    return next(row for row in answer.json()["nodes"] if row["id"] == node_id)


def hand_back_after_checkpoint(node: ScriptedNode, step: int, content: bytes) -> tuple[dict, str]:
    """The node takes the next job, uploads a checkpoint at `step` and hands the job back."""
    lease = node.receive_type("lease")
    ack, sha256 = checkpoint(node, lease, step, content)
    assert ack["accepted"], ack
    node.send({"type": "failure", "job_id": lease["job_id"], "lease_id": lease["lease_id"], "kind": "released",
               "message": "the seller paused"})  # fmt: skip
    assert receive_about(node, lease)["accepted"]
    return lease, sha256


def handed_back(swarm: Coordinator, buyer: SwarmClient, author: str, content: bytes):
    """A job whose first node (`author`) uploads `content` as its checkpoint at step 2 of 3, hands the
    job back and leaves, on a swarm with a trusted node (not connected yet): (job, the checkpoint's
    sha256, the first node, the trusted node)."""
    first, checker = ScriptedNode(swarm, author), ScriptedNode(swarm, "checker")
    assert ops(swarm, f"/api/ops/nodes/{checker.node_id}/trust", {"trusted": True}).status_code == 200
    job = submit(buyer)
    first.connect()
    _, sha256 = hand_back_after_checkpoint(first, 2, content)
    first.disconnect()
    return job, sha256, first, checker


def deliver(node: ScriptedNode, lease: dict, content: bytes, **report: object) -> dict:
    """Report the lease's job done (its steps' losses, then the result); the coordinator's answer."""
    for step in range(lease["checkpoint_step"] + 1, lease["spec"]["max_steps"] + 1):
        node.send({"type": "progress", "job_id": lease["job_id"], "lease_id": lease["lease_id"], "step": step,
                   "total_steps": lease["spec"]["max_steps"], "loss": 2.0 - step / 10})  # fmt: skip
    sha256 = node.upload_result(lease, content)
    node.send({"type": "result", "job_id": lease["job_id"], "lease_id": lease["lease_id"], "sha256": sha256,
               "steps": lease["spec"]["max_steps"], "final_loss": 1.7, "eval_loss": 1.7, "train_tokens": 1000,
               "seconds": 2.0, **report})  # fmt: skip
    ack = receive_about(node, lease)
    assert ack["type"] == "ack" and ack["accepted"], ack
    return {**ack, "sha256": sha256}


def events(coordinator: Coordinator, buyer_key: str, job_id: str) -> list[str]:
    answer = httpx.get(
        f"{coordinator.url}/api/jobs/{job_id}/events",
        headers={"Authorization": f"Bearer {buyer_key}"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    return [event["message"] for event in answer.json()]


def test_a_poisoned_checkpoint_is_charged_to_its_author_and_never_reaches_the_buyer_unchecked(swarm):
    buyer_key = swarm.create_buyer("poisoned buyer", "10")
    buyer = SwarmClient(swarm.url, buyer_key)
    # 1. The poisoner uploads garbage at step 2 of 3 and hands the job back.
    job, garbage, poisoner, checker = handed_back(swarm, buyer, "poisoner", b"garbage weights")
    honest = ScriptedNode(swarm, "honest")

    # 2. The honest node resumes from it and delivers: the result is held, and always verified (this
    #    coordinator samples no job).
    honest.connect()
    lease = honest.receive_type("lease")
    assert (lease["job_id"], lease["checkpoint_sha256"], lease["checkpoint_step"]) == (job["id"], garbage, 2)
    delivered = deliver(honest, lease, b"honest work on a bad start")
    assert delivered["state"] == "verifying"
    share = honest.receive_type("earnings")["pending_micro"]
    assert share > 0
    seen = buyer.job(job["id"])
    assert (seen["state"], seen["verification"], seen["result_sha256"], seen["fine_tuned_model"]) == (
        "verifying",
        "pending",
        None,
        None,
    )
    assert f"built on a checkpoint (step 2) that node {poisoner.node_id} made" in seen["verification_detail"]
    held = httpx.get(
        f"{swarm.url}/api/jobs/{job['id']}/result",
        headers={"Authorization": f"Bearer {buyer_key}"},
        timeout=10,
    )
    assert held.status_code == 409 and "verifying" in held.json()["detail"]
    openai = httpx.get(
        f"{swarm.url}/v1/fine_tuning/jobs/{job['id']}",
        headers={"Authorization": f"Bearer {buyer_key}"},
        timeout=10,
    )
    assert openai.status_code == 200 and openai.json()["status"] == "running"

    # 3. The trusted node re-runs the job from scratch: the delivered adapter is far worse.
    checker.connect()
    rerun = checker.receive_type("lease")
    assert rerun["evaluate_result_sha256"] == delivered["sha256"]
    assert rerun["checkpoint_sha256"] is None and rerun["spec"]["max_steps"] == 3
    trusted = deliver(checker, rerun, b"the trusted adapter", delivered_eval_loss=6.5)
    # The buyer is made whole at once with the trusted result; nobody is blamed yet.
    seen = buyer.job(job["id"])
    assert (seen["state"], seen["verification"], seen["result_sha256"]) == (
        "completed",
        "pending",
        trusted["sha256"],
    )
    assert f"node {poisoner.node_id}'s checkpoint at step 2" in seen["verification_detail"]
    assert honest.http.me()["earnings"]["pending_micro"] == share

    # 4. The trusted node checks the checkpoint: trained to step 2, the garbage is far worse.
    check = checker.receive_type("lease")
    assert check["evaluate_result_sha256"] == garbage and check["spec"]["max_steps"] == 2
    assert check["checkpoint_sha256"] is None
    deliver(checker, check, b"the trusted checkpoint", delivered_eval_loss=9.0)

    seen = buyer.job(job["id"])
    assert (seen["state"], seen["verification"], seen["result_sha256"]) == (
        "completed",
        "mismatch",
        trusted["sha256"],
    )
    assert f"node {poisoner.node_id}'s checkpoint at step 2 is bad" in seen["verification_detail"]
    assert any(
        f"the mismatch is charged to node {poisoner.node_id}" in message
        for message in events(swarm, buyer_key, job["id"])
    )
    # The honest node is paid and keeps a clean record; the poisoner is quarantined.
    assert honest.http.me()["earnings"] == {
        "pending_micro": 0,
        "available_micro": share,
        "jobs_completed": 1,
        "payout_pending_micro": 0,
        "paid_out_micro": 0,
    }
    honest_row, poisoner_row = node_row(swarm, honest.node_id), node_row(swarm, poisoner.node_id)
    assert honest_row["mismatches"] == 0 and not honest_row["quarantined"]
    assert poisoner_row["mismatches"] == 1 and poisoner_row["quarantined"]
    # The platform paid the trusted node for both re-runs: the full share, then 2 of 3 steps' worth.
    assert checker.http.me()["earnings"]["available_micro"] == share + share * 2 // 3
    for node in (honest, checker):
        node.disconnect()


def test_a_bad_result_on_a_sound_checkpoint_is_charged_to_the_node_that_delivered_it(swarm):
    buyer = SwarmClient(swarm.url, swarm.create_buyer("cheated buyer", "10"))
    job, sound, first, checker = handed_back(swarm, buyer, "first", b"sound weights")
    cheat = ScriptedNode(swarm, "cheat")
    cheat.connect()
    lease = cheat.receive_type("lease")
    assert lease["checkpoint_sha256"] == sound
    assert deliver(cheat, lease, b"random adapter")["state"] == "verifying"
    share = cheat.receive_type("earnings")["pending_micro"]

    checker.connect()
    deliver(checker, checker.receive_type("lease"), b"the trusted adapter", delivered_eval_loss=6.5)
    check = checker.receive_type("lease")
    assert check["evaluate_result_sha256"] == sound
    # The checkpoint is as good as the trusted run's at step 2: the fault came after it.
    deliver(checker, check, b"the trusted checkpoint", delivered_eval_loss=1.72)

    seen = buyer.job(job["id"])
    assert seen["verification"] == "mismatch"
    assert f"the bad state came after it, from node {cheat.node_id}" in seen["verification_detail"]
    assert cheat.http.me()["earnings"] == {
        "pending_micro": 0,
        "available_micro": 0,
        "jobs_completed": 1,
        "payout_pending_micro": 0,
        "paid_out_micro": 0,
    }
    assert node_row(swarm, cheat.node_id)["quarantined"]
    assert node_row(swarm, first.node_id)["mismatches"] == 0
    for node in (cheat, checker):
        node.disconnect()
    assert share > 0


def test_a_result_built_on_a_clean_foreign_checkpoint_is_verified_then_delivered(swarm):
    buyer = SwarmClient(swarm.url, swarm.create_buyer("patient buyer", "10"))
    job, _, _, checker = handed_back(swarm, buyer, "first", b"sound weights")
    second = ScriptedNode(swarm, "second")
    second.connect()
    delivered = deliver(second, second.receive_type("lease"), b"good adapter")
    assert delivered["state"] == "verifying"
    checker.connect()
    deliver(checker, checker.receive_type("lease"), b"the trusted adapter", delivered_eval_loss=1.71)
    seen = buyer.job(job["id"])
    assert (seen["state"], seen["verification"], seen["result_sha256"]) == (
        "verified",
        "passed",
        delivered["sha256"],
    )
    assert second.http.me()["earnings"]["available_micro"] > 0
    for node in (second, checker):
        node.disconnect()


def test_with_no_trusted_node_a_foreign_checkpoint_is_not_resumed(swarm):
    buyer_key = swarm.create_buyer("buyer without checkers", "10")
    buyer = SwarmClient(swarm.url, buyer_key)
    first, second = ScriptedNode(swarm, "first"), ScriptedNode(swarm, "second")
    job = submit(buyer)
    first.connect()
    hand_back_after_checkpoint(first, 2, b"unverifiable weights")
    first.disconnect()

    second.connect()
    lease = second.receive_type("lease")
    assert (lease["job_id"], lease["checkpoint_sha256"], lease["checkpoint_step"]) == (job["id"], None, 0)
    assert any("is not resumed" in message for message in events(swarm, buyer_key, job["id"]))
    # Its own work from step 0 is not held: nobody else's state is in it.
    assert deliver(second, lease, b"adapter from scratch")["state"] == "completed"
    assert buyer.job(job["id"])["verification"] == "skipped"
    second.disconnect()


def test_a_node_resumes_its_own_checkpoint_and_its_result_is_not_held(swarm):
    buyer = SwarmClient(swarm.url, swarm.create_buyer("buyer of a paused seller", "10"))
    node = ScriptedNode(swarm, "pauses")
    job = submit(buyer)
    node.connect()
    _, own = hand_back_after_checkpoint(node, 2, b"own weights")
    # Its next heartbeat says it takes jobs again: it gets the job back, from its own checkpoint.
    node.send({"type": "heartbeat", "telemetry": {"cpu": {"name": "test cpu", "logical_cores": 2,
               "memory_total_bytes": 16 << 30, "memory_available_bytes": 12 << 30}, "backends": ["cpu"]}})  # fmt: skip
    lease = node.receive_type("lease")
    assert (lease["job_id"], lease["checkpoint_sha256"]) == (job["id"], own)
    assert deliver(node, lease, b"own adapter")["state"] == "completed"
    node.disconnect()
