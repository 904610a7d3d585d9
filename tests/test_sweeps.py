"""A hyperparameter sweep as buyers run it: the SDK against a real coordinator and two real nodes
fine-tuning SmolLM2 on loopback. The trials run in parallel on both nodes, the clearly worse ones
stop early and pay only for their steps, and the charges add up."""

from __future__ import annotations

import pytest

from compute_swarm.sdk.client import SwarmClient, SweepTable
from tests.conftest import CHAT_ROWS, write_jsonl
from tests.coordinator.test_node_socket import check_ledger
from tests.swarm_processes import Coordinator, Node, run_cli, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def swarm(tmp_path, demo_model_directory):
    # No verification re-runs here: every node's work is the sweep's.
    coordinator = Coordinator(
        tmp_path / "coordinator",
        environment={
            "SWARM_VERIFICATION_BASE_RATE": "0",
            "SWARM_VERIFICATION_MINIMUM_RATE": "0",
            "SWARM_VERIFICATION_MAXIMUM_RATE": "0",
        },
    ).start()
    nodes = [Node(coordinator, tmp_path / name, name=name).start() for name in ("left", "right")]
    wait_for(lambda: coordinator.health()["nodes_connected"] == 2, 90, "both nodes to connect")
    yield coordinator
    for node in nodes:
        node.kill()
    coordinator.kill()
    check_ledger(coordinator.data_dir)


def test_a_sweep_runs_on_two_nodes_stops_the_worse_trials_and_adds_up(swarm, tmp_path):
    api_key = swarm.create_buyer("sweeper", "20")
    buyer = SwarmClient(swarm.url, api_key)
    dataset = buyer.upload_file(write_jsonl(tmp_path / "sums.jsonl", CHAT_ROWS))
    spec = {
        "base": {
            "base_model": "smollm2-135m-instruct",
            "dataset": dataset["id"],
            "max_steps": 8,
            "batch_size": 2,
            "max_sequence_length": 96,
            "eval_fraction": 0.2,
        },
        "parameters": {"learning_rate": {"values": [1e-3, 1e-6]}, "rank": {"values": [4, 8]}},
        "max_price_per_trial_micro": 1_000_000,
        "max_total_price_micro": 4_000_000,
        "evaluations_per_trial": 2,
    }
    # A cap below a trial's price refuses the whole sweep, naming the trial; nothing is held.
    refused = run_cli(
        "sweep", "run", "--data", dataset["id"], "--grid", "learning_rate=1e-3,1e-4", "--steps", "8",
        "--max-per-trial", "0.000001",
        environment={"SWARM_COORDINATOR": swarm.url, "SWARM_API_KEY": api_key},
    )  # fmt: skip
    assert refused.returncode == 1 and "trial 1 (learning_rate=0.001)" in refused.stderr, refused.stderr
    assert buyer.balance()["escrow_micro"] == 0

    table = buyer.sweep(spec, interval=1.0)
    # A pandas DataFrame where pandas is installed (the sweep in its attrs), else the plain SweepTable.
    sweep = table.sweep if isinstance(table, SweepTable) else table.attrs["sweep"]
    trials = sweep["trials"]
    assert sweep["state"] == "completed"
    rows = {(row["learning_rate"], row["rank"]): row for row in trials}
    assert set(rows) == {(1e-3, 4), (1e-3, 8), (1e-6, 4), (1e-6, 8)}

    # The best trial learned (the fast learning rate), and its adapter is there to download.
    best = sweep["best"]
    assert best["learning_rate"] == 1e-3 and best["state"] == "completed"
    assert best["fine_tuned_model"].startswith("ft:smollm2-135m-instruct:trial")
    assert (buyer.download_result(best["job_id"], tmp_path / "best") / "adapter_model.safetensors").is_file()

    # The trials that barely learn were stopped early, charged for the steps they ran.
    stopped = [row for row in trials if row["state"] == "stopped_early"]
    assert stopped and all(row["learning_rate"] == 1e-6 for row in stopped), trials
    for row in stopped:
        assert 0 < row["cost_micro"] < row["held_micro"]

    # The trials ran in parallel, on both nodes.
    nodes = {
        event["node_id"]
        for row in trials
        for event in buyer._request("GET", f"/api/jobs/{row['job_id']}/events")
        if event["node_id"]
    }
    assert len(nodes) == 2

    # The charges add up: what the buyer lost is what the trials cost.
    assert buyer.balance() == {"available_micro": 20_000_000 - sweep["cost_micro"], "escrow_micro": 0}
    assert sweep["cost_micro"] == sum(row["cost_micro"] for row in trials)
    shown = str(table) if isinstance(table, SweepTable) else table.to_string()  # str() elides columns
    assert "learning_rate" in shown and "stopped_early" in shown
