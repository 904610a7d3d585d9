"""Hyperparameter sweeps, fast: the pure decisions (expansion, validation, median stopping), then sweeps
through a real coordinator on loopback with scripted nodes (queueing all trials or none, stopping the
worse ones early and charging them for the steps their checkpoints show, cancelling, the best trial),
the SDK's table with and without pandas, and the CLI's argument errors. tests/test_sweeps.py runs a
sweep on real nodes; tests/coordinator/test_stopped_trials.py checks how stopped trials are paid."""

from __future__ import annotations

import json
import math
import sys
import tempfile

import httpx
import pytest
from pydantic import ValidationError

from compute_swarm import sweeps
from compute_swarm.coordinator.domain import pricing
from compute_swarm.coordinator.settings import Settings
from compute_swarm.engine.jobs import DEMO_CHAT_DATASET
from compute_swarm.sdk.client import SwarmClient, SwarmError, SweepTable, sweep_table
from compute_swarm.sweeps import MAX_TRIALS, MedianStopping, Range, SweepSpec, Values
from tests.coordinator.test_node_socket import ScriptedNode, check_ledger, new_buyer
from tests.swarm_processes import Coordinator, run_cli

pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager")

MODEL = "smollm2-135m-instruct"
FEE_BASIS_POINTS = Settings.model_fields["platform_fee_basis_points"].default


def spec(parameters: dict, **fields) -> SweepSpec:
    return SweepSpec.model_validate({"base": {"max_steps": 4}, "parameters": parameters, **fields})


# ---- pure: expansion


def test_a_grid_takes_every_combination_in_a_stable_order():
    grid = spec(
        {"rank": {"values": [4, 8, 16]}, "learning_rate": {"values": [1e-4, 3e-4]}, "alpha": {"values": [8]}}
    )
    trials = sweeps.expand(grid)
    assert len(trials) == 3 * 2 * 1
    # Parameters by name, the later ones varying fastest; each value in the order given.
    assert trials == [
        {"alpha": 8.0, "learning_rate": learning_rate, "rank": rank}
        for learning_rate in (1e-4, 3e-4)
        for rank in (4, 8, 16)
    ]
    assert sweeps.expand(grid) == trials
    # `trials` caps a grid: its first so many combinations.
    assert sweeps.expand(grid.model_copy(update={"trials": 4})) == trials[:4]
    assert sweeps.expand(grid.model_copy(update={"trials": 50})) == trials


def test_a_random_sweep_is_seeded():
    parameters = {
        "learning_rate": {"low": 1e-5, "high": 1e-3, "log": True},
        "dropout": {"low": 0.0, "high": 0.3},
        "rank": {"values": [4, 8, 16]},
    }
    first = sweeps.expand(spec(parameters, strategy="random", trials=8, seed=7))
    assert len(first) == 8
    assert sweeps.expand(spec(parameters, strategy="random", trials=8, seed=7)) == first
    assert sweeps.expand(spec(parameters, strategy="random", trials=8, seed=8)) != first
    for trial in first:
        assert 1e-5 <= trial["learning_rate"] <= 1e-3 and 0.0 <= trial["dropout"] <= 0.3
        assert trial["rank"] in (4, 8, 16) and type(trial["rank"]) is int
    # More draws of the same seed start with the same ones.
    assert sweeps.expand(spec(parameters, strategy="random", trials=12, seed=7))[:8] == first


def test_a_log_range_stays_within_its_bounds_and_spreads_over_orders_of_magnitude():
    trials = sweeps.expand(
        spec(
            {"learning_rate": {"low": 1e-6, "high": 1e-2, "log": True}}, strategy="random", trials=MAX_TRIALS
        )
    )
    rates = [trial["learning_rate"] for trial in trials]
    assert all(1e-6 <= rate <= 1e-2 for rate in rates)
    decades = {math.floor(math.log10(rate)) for rate in rates}
    assert len(decades) >= 3, sorted(rates)
    # A linear range over the same bounds puts nearly every draw in the top decade.
    linear = sweeps.expand(
        spec({"learning_rate": {"low": 1e-6, "high": 1e-2}}, strategy="random", trials=MAX_TRIALS)
    )
    assert sum(trial["learning_rate"] >= 1e-3 for trial in linear) > MAX_TRIALS * 0.8
    assert sum(rate >= 1e-3 for rate in rates) < MAX_TRIALS * 0.5


def test_whole_number_settings_come_out_as_ints_and_others_are_refused():
    trials = sweeps.expand(spec({"rank": {"values": [4, 8.0]}, "max_steps": {"values": [10]}}))
    assert trials == [{"max_steps": 10, "rank": 4}, {"max_steps": 10, "rank": 8}]
    assert all(type(value) is int for trial in trials for value in trial.values())
    # A setting that is not a whole number is a float, even when given as one.
    assert type(sweeps.expand(spec({"alpha": {"values": [16]}}))[0]["alpha"]) is float
    with pytest.raises(ValueError, match=r"rank takes whole numbers, not 4\.5"):
        sweeps.expand(spec({"rank": {"values": [4, 4.5]}}))
    with pytest.raises(ValueError, match="max_steps takes whole numbers"):
        sweeps.expand(spec({"max_steps": {"values": [12.5]}}))


def test_a_random_range_over_a_whole_number_setting_draws_whole_numbers():
    trials = sweeps.expand(spec({"rank": {"low": 4, "high": 32}}, strategy="random", trials=8))
    assert all(type(trial["rank"]) is int and 4 <= trial["rank"] <= 32 for trial in trials)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"parameters": {"learning_rate": {"values": [1e-4]}, "temperature": {"values": [1]}}}, "cannot sweep temperature"),
        ({"parameters": {"learning_rate": {"low": 1e-5, "high": 1e-3}}}, "a grid takes listed values"),
        ({"parameters": {"learning_rate": {"low": 1e-5, "high": 1e-3}}, "strategy": "random"}, "needs trials"),
        ({"base": {"checkpoint_interval": 2}}, "base may not set checkpoint_interval"),
        ({"base": {"evaluate_adapter": "x" * 64}}, "base may not set evaluate_adapter"),
        ({"base": {"type": "inference"}}, "base may not set type"),
        ({"parameters": {"learning_rate": {"low": 1e-3, "high": 1e-3}}, "strategy": "random", "trials": 2}, "low must be below high"),
        ({"parameters": {"learning_rate": {"low": 1e-2, "high": 1e-3}}, "strategy": "random", "trials": 2}, "low must be below high"),
        ({"parameters": {"learning_rate": {"low": 0, "high": 1e-3, "log": True}}, "strategy": "random", "trials": 2}, "positive low"),
        ({"parameters": {"learning_rate": {"low": -1, "high": 1e-3, "log": True}}, "strategy": "random", "trials": 2}, "positive low"),
        ({"trials": MAX_TRIALS + 1}, "less than or equal to 64"),
        ({"parameters": {"seed": {"values": list(range(MAX_TRIALS + 1))}}}, "at most 64"),
        ({"parameters": {}}, "at least 1"),
        ({"parameters": {"learning_rate": {"values": []}}}, "at least 1"),
    ],
)  # fmt: skip
def test_a_bad_sweep_is_refused_with_its_reason(data, problem):
    with pytest.raises(ValidationError, match=problem):
        SweepSpec.model_validate(
            {"base": {"max_steps": 4}, "parameters": {"learning_rate": {"values": [1e-4]}}, **data}
        )


def test_a_grid_of_more_than_max_trials_is_refused_unless_capped():
    parameters = {"seed": {"values": list(range(16))}, "rank": {"values": [1, 2, 4, 8, 16]}}
    with pytest.raises(ValueError, match=f"more than {MAX_TRIALS} trials"):
        sweeps.expand(spec(parameters))
    assert len(sweeps.expand(spec(parameters, trials=MAX_TRIALS))) == MAX_TRIALS
    assert len(sweeps.expand(spec({"seed": {"values": list(range(MAX_TRIALS))}}))) == MAX_TRIALS


def test_values_and_ranges_are_told_apart():
    parsed = spec(
        {"learning_rate": {"values": [1e-4]}, "dropout": {"low": 0, "high": 0.2}}, strategy="random", trials=1
    )
    assert isinstance(parsed.parameters["learning_rate"], Values)
    assert isinstance(parsed.parameters["dropout"], Range) and not parsed.parameters["dropout"].log


# ---- pure: evaluation and median stopping


@pytest.mark.parametrize(
    ("max_steps", "evaluations", "interval"),
    [(100, 4, 25), (30, 4, 7), (8, 2, 4), (4, 2, 2), (3, 4, 1), (1, 100, 1), (10, 1, 10)],
)
def test_the_evaluation_interval_spreads_evaluations_over_the_steps(max_steps, evaluations, interval):
    assert sweeps.evaluation_interval(max_steps, evaluations) == interval


def test_median_stopping_stops_a_trial_above_the_median_only():
    rule = MedianStopping()
    assert sweeps.should_stop(2.5, 4, [1.0, 2.0, 3.0], rule) == (True, 2.0)
    assert sweeps.should_stop(2.0, 4, [1.0, 2.0, 3.0], rule) == (False, 2.0)  # at the median
    assert sweeps.should_stop(1.5, 4, [1.0, 2.0, 3.0], rule) == (False, 2.0)
    assert sweeps.should_stop(1.6, 4, [1.0, 2.0], rule) == (True, 1.5)  # an even count: the middle
    assert sweeps.should_stop(1.5, 4, [1.0, 2.0], rule) == (False, 1.5)


def test_median_stopping_waits_for_enough_trials_and_steps_and_can_be_turned_off():
    others = [1.0, 1.1, 1.2]
    assert sweeps.should_stop(9.0, 5, others[:1], MedianStopping()) == (False, None)  # 1 < min_trials 2
    assert sweeps.should_stop(9.0, 5, [], MedianStopping()) == (False, None)
    assert sweeps.should_stop(9.0, 5, others[:2], MedianStopping())[0]
    assert sweeps.should_stop(9.0, 5, others, MedianStopping(min_trials=4)) == (False, None)
    assert sweeps.should_stop(9.0, 4, others, MedianStopping(min_steps=5)) == (False, None)
    assert sweeps.should_stop(9.0, 5, others, MedianStopping(min_steps=5)) == (True, 1.1)
    assert sweeps.should_stop(9.0, 5, others, MedianStopping(enabled=False)) == (False, None)


def test_loss_at_is_the_latest_reported_at_or_before_the_step():
    points = [(2, 3.0), (4, 2.0), (6, 1.5)]
    assert sweeps.loss_at(points, 1) is None
    assert sweeps.loss_at(points, 2) == 3.0
    assert sweeps.loss_at(points, 3) == 3.0
    assert sweeps.loss_at(points, 4) == 2.0
    assert sweeps.loss_at(points, 100) == 1.5
    assert sweeps.loss_at([], 4) is None


# ---- through a real coordinator, with scripted nodes


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    # No verification re-runs: a scripted node would be offered them in place of the next trial.
    server = Coordinator(
        tmp_path_factory.mktemp("coordinator"),
        environment={
            "SWARM_VERIFICATION_BASE_RATE": "0",
            "SWARM_VERIFICATION_MINIMUM_RATE": "0",
            "SWARM_VERIFICATION_MAXIMUM_RATE": "0",
        },
    ).start()
    yield server
    server.stop()


@pytest.fixture
def swarm(coordinator):
    yield coordinator
    check_ledger(coordinator.data_dir)


def sweep_spec(dataset_id: str, parameters: dict, **fields) -> dict:
    return {
        "base": {"base_model": MODEL, "dataset": dataset_id, "max_steps": 4, "batch_size": 2},
        "parameters": parameters,
        "evaluations_per_trial": 2,
        **fields,
    }


def buyer_and_key(coordinator: Coordinator, name: str) -> tuple[SwarmClient, dict[str, str]]:
    """A new buyer with 10 credits, and the headers of its API key for plain HTTP."""
    api_key = coordinator.create_buyer(name, "10")
    return SwarmClient(coordinator.url, api_key), {"Authorization": f"Bearer {api_key}"}


def rows_by_job(sweep: dict) -> dict[str, dict]:
    return {row["job_id"]: row for row in sweep["trials"]}


def progress(node: ScriptedNode, lease: dict, step: int, eval_loss: float | None = None) -> None:
    node.send(
        {
            "type": "progress",
            "job_id": lease["job_id"],
            "lease_id": lease["lease_id"],
            "step": step,
            "total_steps": lease["spec"]["max_steps"],
            "loss": 2.0,
            "eval_loss": eval_loss,
        }
    )


def next_answer(node: ScriptedNode, lease: dict) -> dict:
    """The coordinator's next message about this lease after those sent so far: a node's messages are
    handled in order, so a checkpoint report (refused, nothing was uploaded) is answered after any
    cancel the earlier ones caused."""
    node.send({"type": "checkpoint", "job_id": lease["job_id"], "lease_id": lease["lease_id"], "step": 1,
               "sha256": "0" * 64})  # fmt: skip
    while True:
        message = node.receive()
        if message["type"] in ("cancel", "ack") and message["job_id"] == lease["job_id"]:
            return message


def upload_checkpoint(node: ScriptedNode, lease: dict, step: int) -> dict:
    """Upload a checkpoint for the lease and report it; the coordinator's acknowledgement."""
    with tempfile.NamedTemporaryFile(suffix=".tar") as file:
        file.write(f"checkpoint {lease['lease_id']} {step}".encode())
        file.flush()
        sha256 = node.http.upload_artifact(
            file.name, purpose="checkpoint", job_id=lease["job_id"], lease_id=lease["lease_id"]
        )
    node.send({"type": "checkpoint", "job_id": lease["job_id"], "lease_id": lease["lease_id"], "step": step,
               "sha256": sha256})  # fmt: skip
    while True:
        message = node.receive()
        if (
            message["type"] == "ack"
            and message["lease_id"] == lease["lease_id"]
            and message["about"] == "checkpoint"
        ):
            return message


def finish(node: ScriptedNode, lease: dict, eval_loss: float) -> dict:
    steps = lease["spec"]["max_steps"]
    sha256 = node.upload_result(lease)
    node.send({"type": "result", "job_id": lease["job_id"], "lease_id": lease["lease_id"], "sha256": sha256,
               "steps": steps, "final_loss": eval_loss - 0.1, "eval_loss": eval_loss, "train_tokens": 1000,
               "seconds": 2.0})  # fmt: skip
    ack = node.receive_type("ack")
    assert ack["accepted"] and ack["state"] == "completed", ack
    return ack


def test_a_grid_sweep_queues_every_trial_with_its_settings_and_holds_each_price(swarm):
    buyer, auth = buyer_and_key(swarm, "grid-buyer")
    dataset = buyer.upload_file(DEMO_CHAT_DATASET)
    body = sweep_spec(
        dataset["id"],
        {"learning_rate": {"values": [1e-4, 3e-4]}, "rank": {"values": [4, 8]}},
        evaluations_per_trial=2,
    )
    body["base"]["max_steps"] = 8
    answer = httpx.post(swarm.url + "/api/sweeps", json={"spec": body}, headers=auth)
    assert answer.status_code == 201, answer.text
    submitted = answer.json()
    assert [(row["trial"], row["learning_rate"], row["rank"]) for row in submitted["trials"]] == [
        (1, 1e-4, 4),
        (2, 1e-4, 8),
        (3, 3e-4, 4),
        (4, 3e-4, 8),
    ]

    sweep = buyer.sweep_status(submitted["id"])
    assert sweep["state"] == "running" and sweep["best"] is None and sweep["cost_micro"] == 0
    jobs = {job_id: buyer.job(job_id) for job_id in rows_by_job(sweep)}
    for job_id, row in rows_by_job(sweep).items():
        job = jobs[job_id]
        assert row["state"] == job["state"] == "queued" and row["cost_micro"] is None
        assert job["spec"]["type"] == "lora"
        assert job["spec"]["learning_rate"] == row["learning_rate"] and job["spec"]["rank"] == row["rank"]
        assert job["spec"]["batch_size"] == 2 and job["spec"]["max_steps"] == 8
        assert job["spec"]["checkpoint_interval"] == sweeps.evaluation_interval(8, 2) == 4
        assert row["held_micro"] == job["price_micro"] > 0
    total = sum(job["price_micro"] for job in jobs.values())
    assert sweep["held_micro"] == total
    assert buyer.balance() == {"available_micro": 10_000_000 - total, "escrow_micro": total}
    assert [listed["id"] for listed in buyer._request("GET", "/api/sweeps")] == [sweep["id"]]

    # Another buyer's sweep does not exist for them.
    stranger, stranger_auth = buyer_and_key(swarm, "grid-stranger")
    for method, path in [
        ("GET", f"/api/sweeps/{sweep['id']}"),
        ("POST", f"/api/sweeps/{sweep['id']}/cancel"),
    ]:
        response = httpx.request(method, swarm.url + path, headers=stranger_auth)
        assert response.status_code == 404, response.text
    with pytest.raises(SwarmError) as hidden:
        stranger.sweep_status(sweep["id"])
    assert hidden.value.status_code == 404
    assert stranger._request("GET", "/api/sweeps") == []

    # A cap below a trial's price, or below their sum, refuses the whole sweep: nothing queued or held.
    price = jobs[sweep["trials"][0]["job_id"]]["price_micro"]
    before = (buyer.balance(), len(buyer.jobs()))
    with pytest.raises(SwarmError) as per_trial:
        buyer.submit_sweep({**body, "max_price_per_trial_micro": price - 1})
    assert per_trial.value.status_code == 422
    assert "trial 1 (learning_rate=0.0001, rank=4)" in str(per_trial.value), per_trial.value
    with pytest.raises(SwarmError) as in_total:
        buyer.submit_sweep({**body, "max_price_per_trial_micro": price, "max_total_price_micro": total - 1})
    assert in_total.value.status_code == 422 and "the 4 trials cost" in str(in_total.value)
    unknown = httpx.post(
        swarm.url + "/api/sweeps",
        json={"spec": {**body, "base": {**body["base"], "dataset": "file_0123456789abcdef"}}},
        headers=auth,
    )
    assert unknown.status_code == 422 and "no dataset file" in unknown.json()["detail"], unknown.text
    foreign = httpx.post(swarm.url + "/api/sweeps", json={"spec": body}, headers=stranger_auth)
    assert foreign.status_code == 422 and "no dataset file" in foreign.json()["detail"], foreign.text
    bad = httpx.post(
        swarm.url + "/api/sweeps",
        json={"spec": {**body, "parameters": {"temperature": {"values": [1]}}}},
        headers=auth,
    )
    assert bad.status_code == 422 and "cannot sweep temperature" in bad.json()["detail"], bad.text
    assert (buyer.balance(), len(buyer.jobs())) == before
    assert len(buyer._request("GET", "/api/sweeps")) == 1
    assert stranger.balance()["escrow_micro"] == 0 and stranger.jobs() == []
    buyer.cancel_sweep(sweep["id"])
    assert buyer.balance() == {"available_micro": 10_000_000, "escrow_micro": 0}


def test_a_trial_worse_than_the_median_stops_early_and_pays_for_its_steps(swarm):
    buyer = new_buyer(swarm, "median-buyer")
    dataset = buyer.upload_file(DEMO_CHAT_DATASET)
    node = ScriptedNode(swarm, "median-node")
    node.connect()
    submitted = buyer.submit_sweep(
        sweep_spec(dataset["id"], {"learning_rate": {"values": [1e-4, 2e-4, 3e-4, 4e-4]}})
    )
    held = {row["job_id"]: row["held_micro"] for row in submitted["trials"]}
    leases: list[dict] = []

    # Two trials run to their end, measuring their held-out loss at step 2 and at the last step 4.
    for at_2, at_4 in [(1.0, 0.8), (2.0, 1.5)]:
        lease = node.receive_type("lease")
        leases.append(lease)
        assert lease["spec"]["checkpoint_interval"] == 2 and lease["spec"]["max_steps"] == 4
        progress(node, lease, 1)
        progress(node, lease, 2, at_2)
        progress(node, lease, 4, at_4)
        assert next_answer(node, lease)["type"] == "ack"  # not stopped
        finish(node, lease, at_4)

    # The third is above their median (1.5) at step 2. It is judged when its checkpoint at step 2
    # arrives (the engine reports the loss, then saves): stopped there, charged 2 of its 4 steps.
    stopped = node.receive_type("lease")
    leases.append(stopped)
    progress(node, stopped, 1)
    progress(node, stopped, 2, 3.0)
    assert next_answer(node, stopped)["type"] == "ack"  # not judged before its checkpoint
    ack = upload_checkpoint(node, stopped, 2)
    assert ack["accepted"] and ack["state"] == "cancelled", ack
    assert "stopped early at step 2 of 4" in ack["message"] and "for steps 1 to 2" in ack["message"]
    progress(node, stopped, 3)  # told to stop in answer to its next report
    cancel = node.receive_type("cancel")
    assert cancel["lease_id"] == stopped["lease_id"], cancel
    assert "stopped early at step 2 of 4" in cancel["reason"] and "median 1.5000" in cancel["reason"]
    # The node tells how the job ended, as a node agent does: nothing changes, and its slot is free.
    node.send({"type": "failure", "job_id": stopped["job_id"], "lease_id": stopped["lease_id"],
               "kind": "cancelled", "message": "cancelled by the coordinator"})  # fmt: skip
    assert not node.receive_type("ack")["accepted"]
    job = buyer.job(stopped["job_id"])
    assert job["state"] == "cancelled" and job["verification"] == "skipped"

    # The fourth is below the median of the three at step 2 (2.0): it goes on to the end, the best.
    best = node.receive_type("lease")
    leases.append(best)
    progress(node, best, 2, 1.2)
    assert next_answer(node, best)["type"] == "ack"
    progress(node, best, 4, 0.5)  # the two trials that got as far: median 1.15
    assert next_answer(node, best)["type"] == "ack"
    finish(node, best, 0.5)

    assert {lease["job_id"] for lease in leases} == set(held)
    sweep = buyer.sweep_status(submitted["id"])
    assert sweep["state"] == "completed" and sweep["held_micro"] == 0
    rows = rows_by_job(sweep)
    row = rows[stopped["job_id"]]
    assert row["state"] == "stopped_early" and row["step"] == 2 and row["eval_loss"] == 3.0
    price = held[stopped["job_id"]]
    assert row["held_micro"] == price and row["cost_micro"] == price * 2 // 4
    for other in (leases[0], leases[1], best):
        assert rows[other["job_id"]]["state"] == "completed"
        assert rows[other["job_id"]]["cost_micro"] == held[other["job_id"]]
    assert [rows[lease["job_id"]]["eval_loss"] for lease in leases] == [0.8, 1.5, 3.0, 0.5]

    # The best is the completed trial with the lowest held-out loss; the cost adds the trials'.
    assert sweep["best"]["job_id"] == best["job_id"] and sweep["best"]["eval_loss"] == 0.5
    costs = [rows[job_id]["cost_micro"] for job_id in held]
    assert sweep["cost_micro"] == sum(costs) == sum(held.values()) - (price - price * 2 // 4)
    # The buyer got the rest of the stopped trial's escrow back; the node was credited its share.
    assert buyer.balance() == {"available_micro": 10_000_000 - sweep["cost_micro"], "escrow_micro": 0}
    shares = [pricing.split_payment(cost, FEE_BASIS_POINTS)[0] for cost in costs]
    assert node.http.me()["earnings"]["pending_micro"] == sum(shares)

    # With pandas, the SDK's table of it: a DataFrame by trial, the swept settings as columns.
    frame = buyer.sweep(sweep_id=sweep["id"])
    assert frame.index.name == "trial" and list(frame.index) == [1, 2, 3, 4]
    assert "learning_rate" in frame.columns and "job_id" in frame.columns
    assert frame.loc[sweep["best"]["trial"], "eval_loss"] == 0.5
    assert frame.attrs["sweep"]["best"]["job_id"] == best["job_id"]
    node.disconnect()


def test_a_stopped_trial_is_charged_by_its_own_steps_not_the_nodes_count(swarm):
    buyer = new_buyer(swarm, "short-count-buyer")
    dataset = buyer.upload_file(DEMO_CHAT_DATASET)
    node = ScriptedNode(swarm, "short-count-node")
    node.connect()
    submitted = buyer.submit_sweep(
        sweep_spec(dataset["id"], {"learning_rate": {"values": [1e-4, 2e-4, 3e-4]}})
    )
    try:
        for at_2 in (1.0, 2.0):
            lease = node.receive_type("lease")
            progress(node, lease, 2, at_2)
            finish(node, lease, at_2)
        stopped = node.receive_type("lease")
        node.send({"type": "progress", "job_id": stopped["job_id"], "lease_id": stopped["lease_id"],
                   "step": 2, "total_steps": 2, "eval_loss": 9.0})  # fmt: skip
        assert upload_checkpoint(node, stopped, 2)["state"] == "cancelled"
        row = rows_by_job(buyer.sweep_status(submitted["id"]))[stopped["job_id"]]
        assert row["state"] == "stopped_early"
        assert row["cost_micro"] == row["held_micro"] * 2 // 4
    finally:
        buyer.cancel_sweep(submitted["id"])
        node.disconnect()


def test_cancelling_a_sweep_cancels_its_open_trials_and_keeps_the_finished(swarm):
    buyer = new_buyer(swarm, "cancel-buyer")
    dataset = buyer.upload_file(DEMO_CHAT_DATASET)
    node = ScriptedNode(swarm, "cancel-node")
    node.connect()
    submitted = buyer.submit_sweep(sweep_spec(dataset["id"], {"rank": {"values": [4, 8, 16]}}))
    held = {row["job_id"]: row["held_micro"] for row in submitted["trials"]}

    done = node.receive_type("lease")
    progress(node, done, 2, 1.0)
    finish(node, done, 1.0)
    running = node.receive_type("lease")
    # Lower than the finished trial's, but a trial still running is no one's best.
    progress(node, running, 2, 0.1)
    assert next_answer(node, running)["type"] == "ack"  # one other trial: too few to stop it
    assert buyer.sweep_status(submitted["id"])["best"]["job_id"] == done["job_id"]

    cancelled = buyer.cancel_sweep(submitted["id"])
    cancel = node.receive_type("cancel")
    assert cancel["job_id"] == running["job_id"] and "cancelled" in cancel["reason"]
    assert cancelled["state"] == "completed" and cancelled["held_micro"] == 0
    rows = rows_by_job(cancelled)
    assert rows[done["job_id"]]["state"] == "completed"
    assert rows[done["job_id"]]["cost_micro"] == held[done["job_id"]]
    for job_id in set(held) - {done["job_id"]}:
        assert rows[job_id]["state"] == "cancelled" and rows[job_id]["cost_micro"] == 0
    assert cancelled["best"]["job_id"] == done["job_id"]
    assert cancelled["cost_micro"] == held[done["job_id"]]
    assert buyer.balance() == {"available_micro": 10_000_000 - held[done["job_id"]], "escrow_micro": 0}
    # Cancelling again changes nothing.
    assert buyer.cancel_sweep(submitted["id"])["trials"] == cancelled["trials"]
    # The node's slot is free once it tells how the job ended; nothing of the sweep is offered again.
    node.send({"type": "failure", "job_id": running["job_id"], "lease_id": running["lease_id"],
               "kind": "cancelled", "message": "cancelled by the coordinator"})  # fmt: skip
    assert not node.receive_type("ack")["accepted"]
    with pytest.raises(TimeoutError):
        node.receive_type("lease", timeout=1.0)
    node.disconnect()


def test_a_sweep_without_max_steps_is_refused(swarm):
    buyer = new_buyer(swarm, "epochs-buyer")
    dataset = buyer.upload_file(DEMO_CHAT_DATASET)
    body = sweep_spec(dataset["id"], {"rank": {"values": [4, 8]}})
    del body["base"]["max_steps"]
    with pytest.raises(SwarmError) as refused:
        buyer.submit_sweep(body)
    assert refused.value.status_code == 422 and "max_steps" in str(refused.value)
    # Swept, max_steps sets each trial's evaluation interval.
    sweep = buyer.submit_sweep({**body, "parameters": {"max_steps": {"values": [4, 12]}}})
    intervals = [buyer.job(row["job_id"])["spec"]["checkpoint_interval"] for row in sweep["trials"]]
    assert intervals == [2, 6]
    buyer.cancel_sweep(sweep["id"])
    assert buyer.balance()["escrow_micro"] == 0


# ---- the SDK's table


SWEEP_VIEW = {
    "id": "sweep_0123",
    "state": "completed",
    "spec": {"parameters": {"rank": {"values": [4, 8]}, "learning_rate": {"values": [1e-4]}}},
    "created_at": 0.0,
    "trials": [
        {"trial": 1, "job_id": "job_aaa", "state": "completed", "learning_rate": 1e-4, "rank": 4, "step": 4,
         "eval_loss": 1.23456, "final_loss": 1.1, "held_micro": 100, "cost_micro": 100, "fine_tuned_model": None},
        {"trial": 2, "job_id": "job_bbbbbbbb", "state": "stopped_early", "learning_rate": 1e-4, "rank": 8,
         "step": 2, "eval_loss": 3.5, "final_loss": None, "held_micro": 100, "cost_micro": 50,
         "fine_tuned_model": None},
    ],
    "best": None,
    "cost_micro": 150,
    "held_micro": 0,
}  # fmt: skip
SWEEP_VIEW["best"] = SWEEP_VIEW["trials"][0]


def test_the_sweep_table_is_a_dataframe_with_pandas():
    pandas = pytest.importorskip("pandas")
    frame = sweep_table(SWEEP_VIEW)
    assert isinstance(frame, pandas.DataFrame)
    assert frame.index.name == "trial" and list(frame.index) == [1, 2]
    assert list(frame.columns) == ["learning_rate", "rank", "job_id", "state", "step", "eval_loss",
                                   "final_loss", "cost_micro"]  # fmt: skip
    assert frame.loc[2, "state"] == "stopped_early" and frame.loc[2, "rank"] == 8
    assert frame["cost_micro"].sum() == SWEEP_VIEW["cost_micro"]
    assert frame.attrs["sweep"] is SWEEP_VIEW


def test_without_pandas_the_sweep_table_is_a_readable_table(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # `import pandas` fails
    table = sweep_table(SWEEP_VIEW)
    assert isinstance(table, SweepTable)
    assert table.sweep is SWEEP_VIEW and table.best is SWEEP_VIEW["trials"][0]
    assert list(table) == SWEEP_VIEW["trials"]
    lines = str(table).splitlines()
    assert lines[0].split() == ["trial", "learning_rate", "rank", "job_id", "state", "step", "eval_loss",
                                "final_loss", "cost_micro"]  # fmt: skip
    assert lines[1].split() == ["1", "0.0001", "4", "job_aaa", "completed", "4", "1.235", "1.1", "100"]
    assert lines[2].split() == ["2", "0.0001", "8", "job_bbbbbbbb", "stopped_early", "2", "3.5", "–", "50"]
    # Aligned: each column starts at the same place on every line.
    for name, value in [("state", "completed"), ("eval_loss", "1.235"), ("cost_micro", "100")]:
        assert lines[0].index(name) == lines[1].index(value)
    assert lines[0].index("state") == lines[2].index("stopped_early")
    html = table._repr_html_()
    assert html.startswith("<table>") and html.count("<tr>") == 3
    assert "<th>learning_rate</th>" in html and "<td>stopped_early</td>" in html
    assert "best: trial 1 (job_aaa)" in html
    assert "best" not in sweep_table({**SWEEP_VIEW, "best": None})._repr_html_()


def test_sweep_takes_a_spec_or_a_sweep_id():
    client = SwarmClient("http://127.0.0.1:9", "swarm-key")
    with pytest.raises(ValueError, match="sweep spec to run, or the sweep_id"):
        client.sweep()
    with pytest.raises(ValueError, match="sweep spec to run, or the sweep_id"):
        client.sweep({"parameters": {}}, sweep_id="sweep_1")


# ---- the CLI


# Nothing listens there: a command that got as far as uploading would fail to connect (exit code 1).
UNREACHABLE = {"SWARM_COORDINATOR": "http://127.0.0.1:9", "SWARM_API_KEY": "swarm-key"}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--grid", "learning_rate"], "'learning_rate': write NAME=..."),
        (["--grid", "lr=1e-4,3e-4"], "'lr=1e-4,3e-4': write NAME=..., NAME one of learning_rate, rank"),
        (["--grid", "learning_rate=fast,slow"], "values are numbers separated by commas"),
        (["--range", "learning_rate=1e-3"], "write NAME=LOW:HIGH or NAME=LOW:HIGH:log"),
        (["--range", "learning_rate=low:1e-3", "--random", "2"], "write NAME=LOW:HIGH"),
        (["--range", "learning_rate=1e-5:1e-3:linear", "--random", "2"], "only ':log' may follow LOW:HIGH"),
        (["--max-per-trial", "a lot", "--grid", "rank=4,8"], "is not an amount of credits"),
        ([], "give at least one --grid or --range"),
        (["--range", "learning_rate=1e-3:1e-5", "--random", "2"], "low must be below high"),
    ],
)
def test_sweep_run_argument_errors_exit_2_before_any_upload(arguments, message):
    result = run_cli(
        "sweep", "run", "--data", str(DEMO_CHAT_DATASET), *arguments, environment=UNREACHABLE, timeout=60
    )
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert message in result.stderr, result.stderr
    assert "cannot reach" not in result.stderr


def test_sweep_run_against_a_coordinator(swarm):
    api_key = swarm.create_buyer("cli-buyer", "10")
    buyer = SwarmClient(swarm.url, api_key)
    environment = {"SWARM_COORDINATOR": swarm.url, "SWARM_API_KEY": api_key}
    result = run_cli(
        "sweep", "run", "--data", str(DEMO_CHAT_DATASET), "--grid", "learning_rate=1e-4,3e-4", "--steps", "4",
        "--json", environment=environment,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    sweep = json.loads(result.stdout)
    assert [row["learning_rate"] for row in sweep["trials"]] == [1e-4, 3e-4]
    assert sweep["spec"]["base"]["max_steps"] == 4 and sweep["spec"]["median_stopping"]["enabled"]
    shown = run_cli("sweep", "show", sweep["id"], environment=environment)
    assert shown.returncode == 0, shown.stderr
    assert "learning_rate" in shown.stdout and "running: 2 trials" in shown.stdout
    cancelled = run_cli("sweep", "cancel", sweep["id"], environment=environment)
    assert cancelled.returncode == 0 and "escrow refunded" in cancelled.stdout, cancelled.stderr
    assert buyer.balance() == {"available_micro": 10_000_000, "escrow_micro": 0}
    missing = run_cli("sweep", "show", "sweep_0000000000000000", environment=environment)
    assert missing.returncode == 1 and "not found" in missing.stderr, missing.stderr
