"""The swarm as people run it: a real coordinator process, real node processes training SmolLM2, and a
buyer using the CLI and SDK. Includes the durability contract: nodes and the coordinator killed with
SIGKILL mid-job, with every credit accounted for afterwards.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from compute_swarm.engine.jobs import DEMO_CHAT_DATASET
from compute_swarm.sdk.client import SwarmClient
from tests.coordinator.test_node_socket import check_ledger
from tests.swarm_processes import Coordinator, Node, run_cli, wait_for

# Small and quick on two CPU cores, but a real fine-tune of the real model.
SMALL_JOB = {"batch_size": 2, "max_sequence_length": 96, "learning_rate": 1e-3, "eval_fraction": 0.0}
FINAL_JOB_STATES = {"completed", "failed", "cancelled"}

pytestmark = pytest.mark.slow


@pytest.fixture
def swarm(tmp_path, demo_model_directory):
    """A coordinator; nodes are started by each test. Everything is stopped and the ledger checked."""
    coordinator = Coordinator(tmp_path / "coordinator").start()
    processes: list = [coordinator]

    def add_node(name: str) -> Node:
        node = Node(coordinator, tmp_path / name, name=name).start()
        processes.append(node)
        return node

    coordinator.add_node = add_node
    yield coordinator
    for process in reversed(processes):
        process.kill()
    check_ledger(coordinator.data_dir)


def submit(buyer: SwarmClient, steps: int, **spec) -> dict:
    dataset = buyer.upload_file(DEMO_CHAT_DATASET)
    return buyer.submit_lora(
        {
            "base_model": "smollm2-135m-instruct",
            "dataset": dataset["id"],
            "max_steps": steps,
            **SMALL_JOB,
            **spec,
        }
    )


def finished(buyer: SwarmClient, job_id: str, timeout: float) -> dict:
    return wait_for(
        lambda: (job := buyer.job(job_id))["state"] in FINAL_JOB_STATES and job,
        timeout,
        f"job {job_id} to finish",
        0.5,
    )


def test_a_buyer_fine_tunes_through_the_cli_and_loads_the_adapter_with_peft(
    swarm, tmp_path, demo_model_directory
):
    node = swarm.add_node("seller")
    api_key = swarm.create_buyer("cli-buyer", "5")
    environment = {"SWARM_COORDINATOR": swarm.url, "SWARM_API_KEY": api_key}
    submitted = run_cli(
        "submit", "lora", "--data", str(DEMO_CHAT_DATASET), "--steps", "4", "--batch-size", "2", "--max-length", "96",
        "--eval-fraction", "0", "--follow",
        environment=environment, timeout=400,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr + node.log()
    job_id = submitted.stdout.strip().splitlines()[-1]
    assert job_id.startswith("job_")

    listed = run_cli("jobs", environment=environment)
    assert job_id in listed.stdout and "completed" in listed.stdout
    downloaded = run_cli("download", job_id, "--output", str(tmp_path / "adapter"), environment=environment)
    assert downloaded.returncode == 0, downloaded.stderr
    adapter_dir = Path(downloaded.stdout.strip().splitlines()[-1])
    assert (adapter_dir / "adapter_model.safetensors").is_file()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(demo_model_directory)
    tuned = PeftModel.from_pretrained(base, adapter_dir)
    assert any("lora_A" in name for name, _ in tuned.named_parameters())

    buyer = SwarmClient(swarm.url, api_key)
    job = buyer.job(job_id)
    assert job["metrics"]["steps"] == 4 and job["metrics"]["final_loss"] > 0
    assert buyer.balance() == {"available_micro": 5_000_000 - job["price_micro"], "escrow_micro": 0}


def test_a_node_killed_mid_job_hands_it_to_another_node_from_its_checkpoint(swarm):
    buyer = SwarmClient(swarm.url, swarm.create_buyer("patient", "5"))
    first = swarm.add_node("doomed")
    # One of ops' own machines: another node resumes from its checkpoint without the result being
    # held for verification (a checkpoint of an untrusted node is resumed only where a trusted node
    # could check the result: tests/coordinator/test_checkpoint_provenance.py).
    node_id = wait_for(lambda: _registered(swarm, "doomed"), 60, "the first node to register", 0.5)
    trusted = run_cli("admin", "trust-node", "--data-dir", str(swarm.data_dir), node_id)
    assert trusted.returncode == 0, trusted.stderr
    job = submit(buyer, steps=12, checkpoint_interval=3)
    wait_for(lambda: buyer.job(job["id"])["checkpoint_step"] >= 3, 300, "a checkpoint", 0.5)
    first.kill()  # SIGKILL: the agent and its training child die at once

    requeued = wait_for(
        lambda: (current := buyer.job(job["id"]))["state"] == "queued" and current,
        30,
        "the job to be re-queued",
    )
    assert requeued["checkpoint_step"] >= 3
    second = swarm.add_node("rescuer")
    done = finished(buyer, job["id"], 400)
    assert done["state"] == "completed", done
    assert done["attempt"] == 2
    assert done["metrics"]["steps"] == 12
    assert "resuming from step" in second.log().lower() or "resum" in second.log().lower()

    # Charged exactly once; only the node that finished is paid.
    assert buyer.balance() == {"available_micro": 5_000_000 - job["price_micro"], "escrow_micro": 0}
    earnings = {name: _earnings(swarm, node) for name, node in (("doomed", first), ("rescuer", second))}
    assert earnings["doomed"] == 0
    assert earnings["rescuer"] == job["price_micro"] - job["price_micro"] // 10


def test_the_coordinator_killed_and_restarted_loses_nothing(swarm):
    buyer = SwarmClient(swarm.url, swarm.create_buyer("steady", "5"))
    node = swarm.add_node("loyal")
    running = submit(buyer, steps=10, checkpoint_interval=2)
    waiting = submit(buyer, steps=2)
    wait_for(lambda: buyer.job(running["id"])["state"] == "running", 300, "the job to run", 0.5)

    swarm.kill()
    swarm.start()
    # The node reconnects by itself and both jobs finish; nothing is stuck in leased or running.
    for job in (running, waiting):
        done = finished(buyer, job["id"], 400)
        assert done["state"] == "completed", (done, node.log()[-3000:])
    spent = running["price_micro"] + waiting["price_micro"]
    assert buyer.balance() == {"available_micro": 5_000_000 - spent, "escrow_micro": 0}
    assert _earnings(swarm, node) == spent - running["price_micro"] // 10 - waiting["price_micro"] // 10
    assert swarm.health()["nodes_connected"] == 1


def _registered(swarm: Coordinator, name: str) -> str | None:
    """The id of the node registered under `name`, as ops list them; None before it registers."""
    listed = run_cli("admin", "nodes", "--data-dir", str(swarm.data_dir))
    assert listed.returncode == 0, listed.stderr
    return next(
        (line.split()[0] for line in listed.stdout.splitlines()[1:] if line.split()[1:2] == [name]), None
    )


def _earnings(swarm: Coordinator, node: Node) -> int:
    result = run_cli("node", "--coordinator", swarm.url, "--data-dir", str(node.data_dir), "--earnings",
                     environment={"SWARM_TOKEN_STORE": "file"})  # fmt: skip
    assert result.returncode == 0, result.stderr
    return _pending_micro(result.stdout)


def _pending_micro(text: str) -> int:
    """The pending amount from `compute-swarm node --earnings`, in micro-credits."""
    for line in text.splitlines():
        if "pending" in line.lower():
            amount = next(word for word in line.replace(",", " ").split() if word[0].isdigit())
            whole, _, fraction = amount.partition(".")
            return int(whole) * 1_000_000 + int(fraction.ljust(6, "0") or 0)
    raise AssertionError(f"no pending amount in {text!r}")
