"""Verification against real cheating nodes: a coordinator that re-runs every job on a trusted node,
an honest node, and three real node agents that each cheat one way (tests/cheating_node.py). Each
cheat is caught, loses its credit and quarantines its node; the buyer ends with the trusted result;
the honest node is verified and paid."""

from __future__ import annotations

import json
import secrets
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from compute_swarm.sdk.client import SwarmClient
from tests.conftest import CHAT_ROWS, write_jsonl
from tests.coordinator.test_node_socket import check_ledger
from tests.swarm_processes import CheatingNode, Coordinator, Node, wait_for

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
ADMIN_TOKEN = secrets.token_urlsafe(32)
PROMPTS = [
    {"prompt": f"Say the word '{word}' and nothing else."} for word in ("apple", "river", "stone", "cloud")
]


@pytest.fixture
def swarm(tmp_path, demo_model_directory):
    coordinator = Coordinator(
        tmp_path / "coordinator",
        environment={
            # Every job is re-run, and one mismatch quarantines: the whole story in one short run.
            "SWARM_VERIFICATION_BASE_RATE": "1",
            "SWARM_VERIFICATION_MINIMUM_RATE": "1",
            "SWARM_VERIFICATION_MAXIMUM_RATE": "1",
            "SWARM_VERIFICATION_OVERHEAD_BUDGET": "1",
            "SWARM_QUARANTINE_AFTER_MISMATCHES": "1",
            "SWARM_ADMIN_TOKEN": ADMIN_TOKEN,
        },
    ).start()
    nodes: list[Node] = []
    coordinator.nodes = nodes
    yield coordinator
    for node in nodes:
        node.kill()
    coordinator.kill()
    check_ledger(coordinator.data_dir)


def ops(coordinator: Coordinator, method: str, path: str, **options) -> dict:
    response = httpx.request(
        method,
        f"{coordinator.url}{path}",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=30,
        **options,
    )
    response.raise_for_status()
    return response.json()


def node_row(coordinator: Coordinator, name: str) -> dict | None:
    return next(
        (row for row in ops(coordinator, "GET", "/api/ops/overview")["nodes"] if row["name"] == name), None
    )


def start(coordinator: Coordinator, node: Node) -> dict:
    coordinator.nodes.append(node.start())
    name = node.arguments[node.arguments.index("--name") + 1]
    return wait_for(
        lambda: (row := node_row(coordinator, name)) and row["state"] != "offline" and row,
        90,
        f"{name} to connect",
        0.5,
    )


def buyer_get(coordinator: Coordinator, api_key: str, path: str) -> httpx.Response:
    response = httpx.get(
        f"{coordinator.url}{path}", headers={"Authorization": f"Bearer {api_key}"}, timeout=30
    )
    response.raise_for_status()
    return response


def completions(coordinator: Coordinator, api_key: str, job_id: str, directory: Path) -> list[str]:
    archive = directory / f"{job_id}.tar"
    archive.write_bytes(buyer_get(coordinator, api_key, f"/api/jobs/{job_id}/result").content)
    with tarfile.open(archive) as tar:
        lines = tar.extractfile("completions.jsonl").read().decode().splitlines()
    return [json.loads(line)["text"] for line in lines]


def test_cheating_nodes_are_caught_and_the_honest_one_is_paid(swarm, tmp_path):
    api_key = swarm.create_buyer("buyer", "20")
    buyer = SwarmClient(swarm.url, api_key)
    dataset = buyer.upload_file(write_jsonl(tmp_path / "sums.jsonl", CHAT_ROWS))
    prompts = buyer.upload_file(write_jsonl(tmp_path / "prompts.jsonl", PROMPTS), purpose="prompts")
    lora = {
        "base_model": MODEL,
        "dataset": dataset["id"],
        "max_steps": 8,
        "batch_size": 2,
        "max_sequence_length": 96,
        "learning_rate": 1e-3,
        "eval_fraction": 0.2,
    }

    def fine_tune() -> dict:
        return buyer.submit_lora(lora)

    def batch() -> dict:
        return buyer.submit_inference(
            {"base_model": MODEL, "dataset": prompts["id"], "sampling": {"max_tokens": 12, "temperature": 0}}
        )

    # Four nodes at once. Only the token-altering cheater serves inference, so the batch is its; the
    # three fine-tunes, submitted while it is busy, go one to each of the other three.
    nodes = {
        "honest": CheatingNode(swarm, tmp_path / "honest", "honest,no-inference", name="honest"),
        "random-adapter": CheatingNode(
            swarm, tmp_path / "c1", "random-adapter,no-inference", name="random-adapter"
        ),
        "skip-steps": CheatingNode(swarm, tmp_path / "c2", "skip-steps,no-inference", name="skip-steps"),
        "altered-tokens": CheatingNode(swarm, tmp_path / "c3", "altered-tokens", name="altered-tokens"),
    }
    for node in nodes.values():
        swarm.nodes.append(node.start())
    wait_for(lambda: swarm.health()["nodes_connected"] == 4, 120, "the four nodes to connect", 0.5)
    ids = {name: node_row(swarm, name)["id"] for name in nodes}
    batch_job = batch()
    wait_for(
        lambda: buyer.job(batch_job["id"])["state"] in ("leased", "running"), 60, "the batch to be leased"
    )
    submitted = [batch_job, *(fine_tune() for _ in range(3))]
    ran: dict[str, dict] = {}
    for job in submitted:
        done = wait_for(
            lambda job=job: (current := buyer.job(job["id"]))["state"] in ("completed", "failed") and current,
            400,
            f"job {job['id']}",
            0.5,
        )
        assert done["state"] == "completed", done
        completed_by = buyer_get(swarm, api_key, f"/api/jobs/{job['id']}/receipt").json()["completed_by"]
        ran[next(name for name, node_id in ids.items() if node_id == completed_by)] = done
    assert set(ran) == set(nodes), ran
    # Completed, re-runs queued, credit pending: nothing is released before verification.
    for name in nodes:
        assert node_row(swarm, name)["pending_micro"] > 0 and node_row(swarm, name)["available_micro"] == 0
    assert {job["id"] for job in buyer.jobs()} == {job["id"] for job in submitted}

    # Ops bring a machine of their own and trust it: it re-runs the four jobs.
    trusted = Node(swarm, tmp_path / "trusted", name="trusted")
    trusted_row = start(swarm, trusted)
    ops(swarm, "POST", f"/api/ops/nodes/{trusted_row['id']}/trust", json={"trusted": True})
    receipts = {}
    for name, job in ran.items():
        receipts[name] = wait_for(
            lambda job=job: (
                (receipt := buyer_get(swarm, api_key, f"/api/jobs/{job['id']}/receipt").json())[
                    "verification"
                ]["state"]
                in ("passed", "mismatch")
                and receipt
            ),
            400,
            f"the verification of {name}'s job",
            1.0,
        )

    honest = receipts["honest"]
    assert honest["verification"]["state"] == "passed", honest["verification"]
    assert buyer.job(honest["job_id"])["state"] == "verified"
    honest_row = node_row(swarm, "honest")
    assert honest_row["pending_micro"] == 0 and honest_row["available_micro"] > 0
    assert honest_row["state"] != "quarantined" and honest_row["reputation"] > 0.9

    for name in ("random-adapter", "skip-steps", "altered-tokens"):
        receipt = receipts[name]
        assert receipt["verification"]["state"] == "mismatch", (name, receipt["verification"])
        rerun = receipt["verification"]["reruns"][0]
        assert rerun["node_id"] == trusted_row["id"]
        # The buyer's result is now the trusted run's.
        assert buyer.job(receipt["job_id"])["result_sha256"] == rerun["result_sha256"]
        row = node_row(swarm, name)
        assert row["pending_micro"] == 0 and row["available_micro"] == 0, (name, row)
        assert row["state"] == "quarantined" and row["reputation"] < 0.9
        kinds = {line["kind"] for line in receipt["money"]}
        assert {"escrow", "charge", "clawback", "verification"} <= kinds, (name, kinds)
    print({name: receipt["verification"]["detail"] for name, receipt in receipts.items()})

    # The batch's answers are the trusted node's, words in order again.
    answers = completions(swarm, api_key, receipts["altered-tokens"]["job_id"], tmp_path)
    rerun_id = receipts["altered-tokens"]["verification"]["reruns"][0]["job_id"]
    assert answers == completions(swarm, api_key, rerun_id, tmp_path)

    # The trusted node was paid by the platform for four re-runs, at once.
    assert node_row(swarm, "trusted")["available_micro"] > 0

    # The quarantined cheaters, still connected and free, get no job: with the honest and the
    # trusted node gone, a new job waits.
    nodes["honest"].kill()
    trusted.kill()
    wait_for(lambda: swarm.health()["nodes_connected"] == 3, 30, "the honest and trusted nodes to leave")
    job = fine_tune()
    time.sleep(5)
    assert buyer.job(job["id"])["state"] == "queued"
