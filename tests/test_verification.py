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

from coordinator.client import SwarmClient
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


def run_alone(coordinator: Coordinator, node: Node, buyer: SwarmClient, submit) -> tuple[dict, dict]:
    """Start a node, give it a job while it is the only node, let it finish, stop it."""
    row = start(coordinator, node)
    job = submit()
    done = wait_for(
        lambda: (current := buyer.job(job["id"]))["state"] in ("completed", "failed") and current,
        300,
        f"job {job['id']} on {row['name']}",
        0.5,
    )
    assert done["state"] == "completed", (done, node.log()[-3000:])
    node.kill()
    return row, done


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

    ran = {}
    for name, node, submit in [
        ("honest", Node(swarm, tmp_path / "honest", name="honest"), fine_tune),
        (
            "random-adapter",
            CheatingNode(swarm, tmp_path / "c1", "random-adapter", name="random-adapter"),
            fine_tune,
        ),
        ("skip-steps", CheatingNode(swarm, tmp_path / "c2", "skip-steps", name="skip-steps"), fine_tune),
        (
            "altered-tokens",
            CheatingNode(swarm, tmp_path / "c3", "altered-tokens", name="altered-tokens"),
            batch,
        ),
    ]:
        ran[name] = run_alone(swarm, node, buyer, submit)
        # Completed, re-run queued, credit pending: nothing is released before verification.
        row, job = ran[name]
        assert buyer.job(job["id"])["state"] == "completed"
        assert node_row(swarm, name)["pending_micro"] > 0 or job["price_micro"] == 0
    assert [job["id"] for job in buyer.jobs()] == [job["id"] for _, job in reversed(ran.values())]

    # Ops bring a machine of their own and trust it: it re-runs the four jobs.
    trusted_row = start(swarm, Node(swarm, tmp_path / "trusted", name="trusted"))
    ops(swarm, "POST", f"/api/ops/nodes/{trusted_row['id']}/trust", json={"trusted": True})
    receipts = {}
    for name, (_row, job) in ran.items():
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

    # A quarantined node that comes back gets no job.
    cheater = CheatingNode(swarm, tmp_path / "c1", "random-adapter", name="random-adapter")
    swarm.nodes.append(cheater.start())
    wait_for(lambda: swarm.health()["nodes_connected"] == 2, 90, "the quarantined node to reconnect")
    ops(swarm, "POST", f"/api/ops/nodes/{trusted_row['id']}/trust", json={"trusted": False})
    swarm.nodes[-2].kill()  # the trusted node leaves: only the quarantined one could take a job
    wait_for(lambda: swarm.health()["nodes_connected"] == 1, 30, "the trusted node to leave")
    job = fine_tune()
    time.sleep(5)
    assert buyer.job(job["id"])["state"] == "queued"
