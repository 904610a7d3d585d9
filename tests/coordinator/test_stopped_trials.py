"""Sweep trials stopped early (issue 16, H3 and L2(b)), through a real coordinator with scripted nodes:
a stopped trial is paid only for the steps a checkpoint its lease uploaded shows (never for the step a
node reports), paid stopped trials are sampled for verification like completed jobs, and median
stopping copes with trials that evaluate at different steps without closing a node's connection.
The pure parts (sweeps.losses_at, verification.compare_stopped_trial) are tested first."""

from __future__ import annotations

import asyncio
import json
import secrets
import tempfile

import httpx
import pytest

from compute_swarm import protocol, sweeps
from compute_swarm.coordinator.domain import pricing
from compute_swarm.coordinator.domain.verification import MISMATCH, PASSED, VerificationPolicy
from compute_swarm.coordinator.settings import Settings
from compute_swarm.coordinator.transport.hub import Connection, Hub
from compute_swarm.coordinator.transport.metrics import Metrics
from compute_swarm.engine.jobs import DEMO_CHAT_DATASET
from tests.coordinator.test_node_socket import TELEMETRY, ScriptedNode, check_ledger, new_buyer
from tests.swarm_processes import Coordinator, wait_for

pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager")

MODEL = "smollm2-135m-instruct"
FEE_BASIS_POINTS = Settings.model_fields["platform_fee_basis_points"].default
ADMIN_TOKEN = secrets.token_urlsafe(32)
TEN_CREDITS = 10_000_000


# ---- pure: the losses median stopping compares with


def test_trials_evaluating_at_other_steps_count_with_their_latest_earlier_loss_or_not_at_all():
    every_4 = [(4, 1.0), (8, 0.8)]
    every_6 = [(6, 1.2), (12, 1.0)]
    # At step 4 the trial evaluating every 6 steps has no loss yet: left out, not None.
    assert sweeps.losses_at([every_4, every_6], 4) == [1.0]
    # At step 6 the other one's latest earlier loss (step 4) stands for it.
    assert sweeps.losses_at([every_4, every_6], 6) == [1.0, 1.2]
    # At step 10 the trial that ended at step 8 did not get as far; the other counts with step 6's.
    assert sweeps.losses_at([every_4, every_6], 10) == [1.2]
    assert sweeps.losses_at([[], every_6], 3) == []
    # Whatever the gaps, median stopping gets numbers only.
    others = sweeps.losses_at([every_6, [(6, 1.4)], every_4], 4)
    assert sweeps.should_stop(2.0, 4, others, sweeps.MedianStopping(min_trials=1)) == (True, 1.0)


def test_a_stopped_trial_is_judged_by_the_held_out_losses_and_needs_a_held_out_set():
    policy = VerificationPolicy()
    reported = {1: 2.0, 2: 1.9, 3: 1.7}
    # A decaying schedule: the re-run's learning rates part from the trial's, so its step losses differ
    # and only the held-out losses decide.
    apart = {1: 2.0, 2: 1.5, 3: 1.0}
    verdict = compare_stopped(1.05, 1.0, reported, apart, same_learning_rates=False, policy=policy)
    assert verdict.outcome == PASSED, verdict
    assert (
        compare_stopped(1.05, 1.0, reported, apart, same_learning_rates=True, policy=policy).outcome
        == MISMATCH
    )
    # A checkpoint that is not the steps it claims: worse than the trusted run beyond the tolerance, or
    # not an adapter of the job's model at all.
    assert (
        compare_stopped(2.0, 1.0, reported, apart, same_learning_rates=False, policy=policy).outcome
        == MISMATCH
    )
    assert (
        compare_stopped(None, 1.0, reported, apart, same_learning_rates=False, policy=policy).outcome
        == MISMATCH
    )
    # No held-out set: the loss the trial was stopped on was never measured.
    verdict = compare_stopped(1.0, None, reported, reported, same_learning_rates=True, policy=policy)
    assert verdict.outcome == MISMATCH and "no held-out set" in verdict.reason


def compare_stopped(delivered, trusted, reported, measured, *, same_learning_rates, policy):
    # Imported here, so that the other tests of this file still run on a coordinator without it.
    from compute_swarm.coordinator.domain.verification import compare_stopped_trial

    return compare_stopped_trial(
        delivered_eval_loss=delivered,
        trusted_eval_loss=trusted,
        reported_losses=reported,
        trusted_losses=measured,
        same_learning_rates=same_learning_rates,
        policy=policy,
    )


# ---- the hub: a progress report that cannot be handled


class FailingService:
    def progress(self, node_id: str, report: protocol.JobProgress) -> str | None:
        raise RuntimeError("a bug in handling progress")


def test_a_progress_report_the_coordinator_fails_on_is_dropped_without_closing_the_socket(tmp_path):
    sent: list[str] = []
    closed: list[tuple[int, str]] = []

    async def send_text(text: str) -> None:
        sent.append(text)

    async def close(code: int, reason: str) -> None:
        closed.append((code, reason))

    hello = protocol.Hello.model_validate_json(
        json.dumps(
            {"protocol_version": protocol.PROTOCOL_VERSION, "agent_version": "test", "telemetry": TELEMETRY}
        )
    )
    connection = Connection(
        node_id="node_1",
        send_text=send_text,
        close=close,
        hello=hello,
        telemetry=hello.telemetry,
        accepting_jobs=True,
    )
    settings = Settings(data_dir=tmp_path)
    hub = Hub(None, FailingService(), None, settings, Metrics(), None, None)  # type: ignore[arg-type]
    report = protocol.JobProgress(job_id="job_1", lease_id="lease_1", step=4, total_steps=8, eval_loss=1.0)
    asyncio.run(hub.handle(connection, report))  # raises nothing: the socket's handler would close with 1011
    assert sent == [] and closed == []


# ---- through a real coordinator


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    """No verification re-runs; credit waits a two-second window."""
    server = Coordinator(
        tmp_path_factory.mktemp("stopped-trials"),
        environment={
            "SWARM_ADMIN_TOKEN": ADMIN_TOKEN,
            "SWARM_VERIFICATION_BASE_RATE": "0",
            "SWARM_VERIFICATION_MINIMUM_RATE": "0",
            "SWARM_VERIFICATION_MAXIMUM_RATE": "0",
            "SWARM_VERIFICATION_WINDOW_SECONDS": "2",
        },
    ).start()
    yield server
    server.stop()
    check_ledger(server.data_dir)


@pytest.fixture(scope="module")
def sampled_coordinator(tmp_path_factory):
    """Every paid job is re-run; one mismatch quarantines its node."""
    server = Coordinator(
        tmp_path_factory.mktemp("stopped-trials-sampled"),
        environment={
            "SWARM_ADMIN_TOKEN": ADMIN_TOKEN,
            "SWARM_VERIFICATION_BASE_RATE": "1",
            "SWARM_VERIFICATION_MINIMUM_RATE": "1",
            "SWARM_VERIFICATION_MAXIMUM_RATE": "1",
            "SWARM_VERIFICATION_OVERHEAD_BUDGET": "1",
            "SWARM_QUARANTINE_AFTER_MISMATCHES": "1",
        },
    ).start()
    yield server
    server.stop()
    check_ledger(server.data_dir)


class Scene:
    """One test's buyer, sweep and nodes on a shared coordinator; closed after the test whatever
    happened (its sweep cancelled, its nodes gone), so no trial or node of it reaches the next test."""

    def __init__(self, coordinator: Coordinator, name: str):
        self.coordinator = coordinator
        self.name = name
        self.buyer = new_buyer(coordinator, f"{name}-buyer")
        self.dataset = self.buyer.upload_file(DEMO_CHAT_DATASET)
        self.sweep_ids: list[str] = []
        self.nodes: list[ScriptedNode] = []

    def sweep(self, parameters: dict, *, max_steps: int = 100, evaluations: int = 4, **fields) -> dict:
        body = {
            "base": {
                "base_model": MODEL,
                "dataset": self.dataset["id"],
                "max_steps": max_steps,
                "batch_size": 2,
            },
            "parameters": parameters,
            "evaluations_per_trial": evaluations,
            **fields,
        }
        submitted = self.buyer.submit_sweep(body)
        self.sweep_ids.append(submitted["id"])
        return submitted

    def node(self, name: str, *, connect: bool = True) -> ScriptedNode:
        node = ScriptedNode(self.coordinator, f"{self.name}-{name}")
        self.nodes.append(node)
        if connect:
            node.connect()
        return node

    def trial(self, job_id: str) -> dict:
        rows = [row for sweep_id in self.sweep_ids for row in self.buyer.sweep_status(sweep_id)["trials"]]
        return next(row for row in rows if row["job_id"] == job_id)

    def two_trials_run_to_end(self) -> None:
        node = self.node("honest")
        for losses in ([1.0, 0.9, 0.8, 0.7], [1.2, 1.1, 1.0, 0.9]):
            run_to_end(node, node.receive_type("lease"), losses)
        node.disconnect()

    def close(self) -> None:
        for node in self.nodes:
            node.disconnect()
        for sweep_id in self.sweep_ids:
            self.buyer.cancel_sweep(sweep_id)


@pytest.fixture
def scene(coordinator, request):
    opened = Scene(coordinator, request.node.name.removeprefix("test_")[:24])
    yield opened
    opened.close()


@pytest.fixture
def sampled_scene(sampled_coordinator, request):
    opened = Scene(sampled_coordinator, request.node.name.removeprefix("test_")[:24])
    yield opened
    opened.close()


def send_progress(node: ScriptedNode, lease: dict, step: int, eval_loss: float | None = None) -> None:
    node.send({"type": "progress", "job_id": lease["job_id"], "lease_id": lease["lease_id"], "step": step,
               "total_steps": lease["spec"]["max_steps"], "loss": 2.0 - step / 100, "eval_loss": eval_loss})  # fmt: skip


def upload(node: ScriptedNode, lease: dict, purpose: str, content: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".tar") as file:
        file.write(content)
        file.flush()
        return node.http.upload_artifact(
            file.name, purpose=purpose, job_id=lease["job_id"], lease_id=lease["lease_id"]
        )


def checkpoint(node: ScriptedNode, lease: dict, step: int, content: bytes | None = None) -> tuple[dict, str]:
    """Upload a checkpoint for the lease and report it: (the coordinator's answer, its sha256)."""
    sha256 = upload(node, lease, "checkpoint", content or f"checkpoint {lease['lease_id']} {step}".encode())
    node.send({"type": "checkpoint", "job_id": lease["job_id"], "lease_id": lease["lease_id"], "step": step,
               "sha256": sha256})  # fmt: skip
    return receive_about(node, lease), sha256


def receive_about(node: ScriptedNode, lease: dict) -> dict:
    """The coordinator's next cancel or acknowledgement of this lease."""
    while True:
        message = node.receive()
        if message["type"] in ("cancel", "ack") and message["lease_id"] == lease["lease_id"]:
            return message


def handled(node: ScriptedNode, lease: dict) -> None:
    """Wait until the coordinator handled this node's messages so far: it handles them in order, and
    answers a checkpoint report (here refused: nothing was uploaded)."""
    node.send({"type": "checkpoint", "job_id": lease["job_id"], "lease_id": lease["lease_id"], "step": 1,
               "sha256": "0" * 64})  # fmt: skip
    assert not receive_about(node, lease)["accepted"]


def finish(node: ScriptedNode, lease: dict, eval_loss: float) -> None:
    sha256 = upload(node, lease, "result", f"adapter {lease['lease_id']}".encode())
    node.send({"type": "result", "job_id": lease["job_id"], "lease_id": lease["lease_id"], "sha256": sha256,
               "steps": lease["spec"]["max_steps"], "final_loss": eval_loss, "eval_loss": eval_loss,
               "train_tokens": 1000, "seconds": 2.0})  # fmt: skip
    ack = receive_about(node, lease)
    assert ack["type"] == "ack" and ack["accepted"] and ack["state"] == "completed", ack


def run_to_end(node: ScriptedNode, lease: dict, losses: list[float]) -> None:
    """An honest trial: a held-out loss at each evaluation, each before that step's checkpoint (as the
    engine reports them), the last one with the result."""
    interval = lease["spec"]["checkpoint_interval"]
    for number, eval_loss in enumerate(losses, 1):
        step = number * interval
        send_progress(node, lease, step, eval_loss)
        if step < lease["spec"]["max_steps"]:
            ack, _ = checkpoint(node, lease, step)
            assert ack["type"] == "ack" and ack["accepted"] and ack["state"] == "running", ack
    finish(node, lease, losses[-1])


def earned(node: ScriptedNode) -> int:
    earnings = node.http.me()["earnings"]
    return earnings["pending_micro"] + earnings["available_micro"]


def share_of(price: int) -> int:
    return pricing.split_payment(price, FEE_BASIS_POINTS)[0]


def test_a_trial_stopped_on_a_claimed_step_without_a_checkpoint_is_charged_nothing(scene):
    """H3 as measured: one progress report, step 99 and a bad held-out loss, no training, no checkpoint.
    Before: the trial was charged 99 % of its price and its node credited for it."""
    submitted = scene.sweep({"learning_rate": {"values": [1e-4, 2e-4, 3e-4]}})
    held = {row["job_id"]: row["held_micro"] for row in submitted["trials"]}
    scene.two_trials_run_to_end()
    spent = scene.buyer.balance()
    cheat = scene.node("cheat")
    lease = cheat.receive_type("lease")
    price = held[lease["job_id"]]
    assert spent["escrow_micro"] == price

    send_progress(cheat, lease, 99, eval_loss=9.0)
    cancel = cheat.receive_type("cancel")
    assert cancel["lease_id"] == lease["lease_id"] and "stopped early at step 99 of 100" in cancel["reason"]

    row = scene.trial(lease["job_id"])
    assert row["state"] == "stopped_early"
    assert (row["cost_micro"], cheat.http.me()["earnings"]["pending_micro"]) == (0, 0), (
        f"held {row['held_micro']}, charged {row['cost_micro']}, node earnings {cheat.http.me()['earnings']}"
    )
    assert earned(cheat) == 0
    # The whole escrow went back to the buyer.
    assert scene.buyer.balance() == {"available_micro": spent["available_micro"] + price, "escrow_micro": 0}
    job = scene.buyer.job(lease["job_id"])
    assert job["state"] == "cancelled" and job["price_micro"] == 0
    assert job["verification"] == "skipped" and "nothing charged" in job["verification_detail"]
    money = scene.buyer._request("GET", f"/api/jobs/{lease['job_id']}/receipt")["money"]
    refund = [line for line in money if line["kind"] == "refund"]
    assert [(line["account"], line["amount_micro"]) for line in refund] == [
        ("escrow", -price),
        ("buyer", price),
    ]
    assert "nothing charged: no checkpoint uploaded after step 0" in refund[0]["memo"]
    assert "nothing charged" in cancel["reason"]


def test_a_stopped_trial_is_paid_for_the_steps_up_to_the_checkpoint_it_uploaded(scene):
    submitted = scene.sweep({"learning_rate": {"values": [1e-4, 2e-4, 3e-4, 4e-4]}})
    held = {row["job_id"]: row["held_micro"] for row in submitted["trials"]}
    scene.two_trials_run_to_end()

    # Checkpoints at steps 25 and 50, then a held-out loss far above the others' at step 60 (not a
    # checkpoint step: judged at once). Paid for the 50 steps its checkpoint shows, not 60.
    worker = scene.node("worker")
    lease = worker.receive_type("lease")
    for step, eval_loss in ((25, 1.1), (50, 1.0)):
        send_progress(worker, lease, step, eval_loss)  # at the others' median: not stopped
        ack, _ = checkpoint(worker, lease, step)
        assert ack["accepted"] and ack["state"] == "running", ack
    send_progress(worker, lease, 60, 5.0)
    cancel = receive_about(worker, lease)
    assert cancel["type"] == "cancel" and "stopped early at step 60 of 100" in cancel["reason"], cancel
    price = held[lease["job_id"]]
    row = scene.trial(lease["job_id"])
    assert (row["cost_micro"], earned(worker)) == (price * 50 // 100, share_of(price * 50 // 100)), (
        f"held {price}, charged {row['cost_micro']}, node earned {earned(worker)}"
    )
    assert "for steps 1 to 50 (50 of 100" in cancel["reason"]
    worker.disconnect()

    # A loss reported at a checkpoint step is judged when that checkpoint arrives (the engine reports
    # the loss first, then saves): stopped there, and paid for every step it ran.
    judged = scene.node("judged")
    lease = judged.receive_type("lease")
    send_progress(judged, lease, 25, 4.0)
    ack, _ = checkpoint(judged, lease, 25)
    assert ack["accepted"] and ack["state"] == "cancelled", ack
    assert "stopped early at step 25 of 100" in ack["message"] and "for steps 1 to 25" in ack["message"]
    send_progress(judged, lease, 26)
    cancel = receive_about(judged, lease)
    assert cancel["type"] == "cancel" and "stopped early at step 25 of 100" in cancel["reason"], cancel
    price = held[lease["job_id"]]
    assert scene.trial(lease["job_id"])["cost_micro"] == price * 25 // 100
    # Not sampled here: its credit is released when the window passes, as a completed job's is.
    wait_for(
        lambda: judged.http.me()["earnings"]["available_micro"] == share_of(price * 25 // 100),
        15,
        "the stopped trial's credit to be released after the window",
    )
    assert judged.http.me()["earnings"]["pending_micro"] == 0
    sweep = scene.buyer.sweep_status(submitted["id"])
    assert sweep["state"] == "completed" and sweep["held_micro"] == 0
    assert scene.buyer.balance() == {"available_micro": TEN_CREDITS - sweep["cost_micro"], "escrow_micro": 0}


def test_a_resumed_trial_is_paid_only_for_the_steps_after_the_checkpoint_it_resumed_from(scene):
    submitted = scene.sweep({"learning_rate": {"values": [1e-4, 2e-4, 3e-4]}})
    held = {row["job_id"]: row["held_micro"] for row in submitted["trials"]}
    scene.two_trials_run_to_end()

    # The first node checkpoints at step 50 and hands the trial back (its seller paused).
    first = scene.node("first")
    lease = first.receive_type("lease")
    for step in (25, 50):
        send_progress(first, lease, step, 1.0)
        assert checkpoint(first, lease, step)[0]["accepted"]
    first.send({"type": "failure", "job_id": lease["job_id"], "lease_id": lease["lease_id"], "kind": "released",
                "message": "the seller paused"})  # fmt: skip
    assert receive_about(first, lease)["accepted"]

    # The next node resumes from step 50 (a node ops trust could check work built on another node's
    # checkpoint), checkpoints at 75 and is stopped at 80: paid for 25 steps.
    checker = scene.node("checker", connect=False)
    trusted = httpx.post(
        f"{scene.coordinator.url}/api/ops/nodes/{checker.node_id}/trust",
        json={"trusted": True},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=10,
    )
    assert trusted.status_code == 200, trusted.text
    second = scene.node("second")
    resumed = second.receive_type("lease")
    assert resumed["job_id"] == lease["job_id"] and resumed["checkpoint_step"] == 50
    send_progress(second, resumed, 75, 0.85)  # below the others' median (0.9): not stopped
    assert checkpoint(second, resumed, 75)[0]["state"] == "running"
    send_progress(second, resumed, 80, 6.0)
    cancel = receive_about(second, resumed)
    assert cancel["type"] == "cancel", cancel
    price = held[lease["job_id"]]
    row = scene.trial(lease["job_id"])
    assert (row["cost_micro"], earned(second)) == (price * 25 // 100, share_of(price * 25 // 100)), (
        f"held {price}, charged {row['cost_micro']}, node earned {earned(second)}"
    )
    assert "for steps 51 to 75 (25 of 100" in cancel["reason"]
    assert earned(first) == 0
    # Built on the first node's checkpoint: verified whatever the sampling rate (none here).
    stopped = scene.buyer.job(lease["job_id"])
    assert stopped["verification"] == "pending", stopped
    assert f"that node {first.node_id} made" in stopped["verification_detail"]


def test_trials_evaluating_at_different_steps_keep_the_nodes_connected(scene):
    """L2(b): a trial evaluating every 4 steps reports before any other trial (every 6 steps) has a loss
    that early. Before: median stopping got None, and the connection closed with 1011."""
    submitted = scene.sweep(
        {"max_steps": {"values": [12, 8]}, "seed": {"values": [1, 2]}},
        evaluations=2,
        median_stopping={"min_trials": 1},
    )
    node = scene.node("node")
    for losses in ([1.0, 0.8], [0.9, 0.7]):
        lease = node.receive_type("lease")
        assert lease["spec"]["max_steps"] == 12 and lease["spec"]["checkpoint_interval"] == 6
        run_to_end(node, lease, losses)

    short = node.receive_type("lease")
    assert short["spec"]["max_steps"] == 8 and short["spec"]["checkpoint_interval"] == 4
    send_progress(node, short, 4, 1.1)
    ack, _ = checkpoint(node, short, 4)  # answered: the socket is still open
    assert ack["type"] == "ack" and ack["accepted"] and ack["state"] == "running", ack
    send_progress(node, short, 8, 0.9)
    finish(node, short, 0.9)

    # The last trial is compared with the one that evaluated at step 4 too, and stopped there.
    worse = node.receive_type("lease")
    send_progress(node, worse, 4, 3.0)
    ack, _ = checkpoint(node, worse, 4)
    assert ack["state"] == "cancelled" and "median 1.1000 of 1 other trials" in ack["message"], ack
    sweep = scene.buyer.sweep_status(submitted["id"])
    assert [row["state"] for row in sweep["trials"]] == [
        "completed",
        "completed",
        "completed",
        "stopped_early",
    ]


def ops(
    coordinator: Coordinator, path: str, body: dict | None = None, method: str = "POST"
) -> httpx.Response:
    return httpx.request(
        method,
        coordinator.url + path,
        json=body,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=10,
    )


def test_stopped_trials_are_sampled_and_a_checkpoint_that_does_not_hold_up_is_clawed_back(
    sampled_scene, tmp_path
):
    scene = sampled_scene
    submitted = scene.sweep({"learning_rate": {"values": [1e-4, 2e-4, 3e-4, 4e-4]}})
    held = {row["job_id"]: row["held_micro"] for row in submitted["trials"]}
    # Two trials evaluated to their last step and still running (a finished one would be sampled too).
    for name, losses in (("reference-1", [1.0, 0.9, 0.8, 0.7]), ("reference-2", [1.2, 1.1, 1.0, 0.9])):
        reference = scene.node(name)
        lease = reference.receive_type("lease")
        for number, eval_loss in enumerate(losses, 1):
            send_progress(reference, lease, 25 * number, eval_loss)
        handled(reference, lease)

    # An honest trial checkpoints at 25 and 50 and is stopped at step 60; a cheat uploads a
    # "checkpoint" at 25 that is not one and is stopped at step 30.
    honest = scene.node("honest")
    honest_lease = honest.receive_type("lease")
    send_progress(honest, honest_lease, 25, 1.1)
    checkpoint(honest, honest_lease, 25)
    send_progress(honest, honest_lease, 50, 1.0)
    _, honest_checkpoint = checkpoint(honest, honest_lease, 50, b"a real checkpoint at step 50")
    send_progress(honest, honest_lease, 60, 3.0)
    assert receive_about(honest, honest_lease)["type"] == "cancel"
    cheat = scene.node("cheat")
    cheat_lease = cheat.receive_type("lease")
    _, cheat_checkpoint = checkpoint(cheat, cheat_lease, 25, b"not a checkpoint")
    send_progress(cheat, cheat_lease, 30, 3.0)
    assert receive_about(cheat, cheat_lease)["type"] == "cancel"
    for lease in (honest_lease, cheat_lease):
        job = scene.buyer.job(lease["job_id"])
        assert (job["state"], job["verification"]) == ("cancelled", "pending"), job
    honest_price = held[honest_lease["job_id"]] * 50 // 100
    cheat_price = held[cheat_lease["job_id"]] * 25 // 100
    assert honest.http.me()["earnings"]["pending_micro"] == share_of(honest_price)
    assert cheat.http.me()["earnings"]["pending_micro"] == share_of(cheat_price)

    # A trusted node re-runs each to its checkpoint's step and measures that checkpoint's held-out loss.
    trusted = scene.node("trusted", connect=False)
    assert (
        ops(scene.coordinator, f"/api/ops/nodes/{trusted.node_id}/trust", {"trusted": True}).status_code
        == 200
    )
    trusted.connect()
    delivered = {honest_checkpoint: (honest_lease, 50, 1.02), cheat_checkpoint: (cheat_lease, 25, None)}
    for _ in range(2):
        rerun = trusted.receive_type("lease", timeout=20)
        lease, step, delivered_eval_loss = delivered[rerun["evaluate_result_sha256"]]
        assert rerun["spec"]["max_steps"] == step and rerun["dataset_sha256"] == lease["dataset_sha256"]
        assert rerun["spec"]["learning_rate"] == lease["spec"]["learning_rate"]
        downloaded = trusted.http.download_artifact(rerun["evaluate_result_sha256"], tmp_path / f"{step}.tar")
        assert downloaded.stat().st_size > 0
        for number in range(1, step // 25 + 1):
            send_progress(trusted, rerun, 25 * number, 1.0)
        sha256 = upload(trusted, rerun, "result", f"trusted adapter {step}".encode())
        trusted.send({"type": "result", "job_id": rerun["job_id"], "lease_id": rerun["lease_id"], "sha256": sha256,
                      "steps": step, "final_loss": 1.0, "eval_loss": 1.0, "delivered_eval_loss": delivered_eval_loss,
                      "train_tokens": 1000, "seconds": 2.0})  # fmt: skip
        ack = receive_about(trusted, rerun)
        assert ack["accepted"] and ack["state"] == "completed", ack

    # Passed: still a stopped trial, its node's credit released, the trusted node paid from the fees.
    job = scene.buyer.job(honest_lease["job_id"])
    assert (job["state"], job["verification"]) == ("cancelled", "passed"), job
    assert honest.http.me()["earnings"] == {
        "pending_micro": 0,
        "available_micro": share_of(honest_price),
        "jobs_completed": 0,
        "payout_pending_micro": 0,
        "paid_out_micro": 0,
    }
    # Mismatch: the cheat's credit clawed back, its charge refunded to the buyer, the cheat quarantined.
    job = scene.buyer.job(cheat_lease["job_id"])
    assert (job["state"], job["verification"], job["result_sha256"]) == ("cancelled", "mismatch", None), job
    assert earned(cheat) == 0
    assert earned(trusted) == share_of(honest_price) + share_of(cheat_price)
    row = scene.trial(cheat_lease["job_id"])
    assert row["state"] == "stopped_early" and row["cost_micro"] == 0
    overview = ops(scene.coordinator, "/api/ops/overview", method="GET").json()
    assert next(node for node in overview["nodes"] if node["id"] == cheat.node_id)["quarantined"]

    sweep = scene.buyer.cancel_sweep(submitted["id"])
    assert sweep["held_micro"] == 0
    assert scene.buyer.balance() == {"available_micro": TEN_CREDITS - honest_price, "escrow_micro": 0}
