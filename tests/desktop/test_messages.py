"""The node agent's pure decisions: reconnect delays (desktop.backoff), telemetry
(desktop.node_description), lease → spec (desktop.lease_spec), record → message and the progress
throttle (desktop.job_reports), the outbox of reports awaiting acknowledgement (desktop.outbox) and what
a closed connection means (desktop.connection_rules)."""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path

import pytest

from compute_swarm import protocol
from compute_swarm.desktop import token_store
from compute_swarm.desktop.backoff import Backoff
from compute_swarm.desktop.connection_rules import connection_end, websocket_url
from compute_swarm.desktop.job_reports import (
    ProgressThrottle,
    checkpoint_message,
    failure_message,
    progress_message,
    result_message,
)
from compute_swarm.desktop.lease_spec import spec_for_lease
from compute_swarm.desktop.node_description import telemetry_from_inventory
from compute_swarm.desktop.outbox import Outbox
from compute_swarm.engine.devices import CpuInfo, DeviceInventory, GpuInfo
from compute_swarm.engine.jobs import CATALOGUE, DEFAULT_MODEL, LoraJobSpec
from compute_swarm.engine.records import Completed, Progress

DATASET = b'{"prompt": "2+2?", "completion": "4"}\n'
DATASET_SHA256 = hashlib.sha256(DATASET).hexdigest()


def make_lease(job_id: str = "job_1", lease_id: str = "lease_1", **spec_changes: object) -> protocol.Lease:
    spec = {"type": "lora", "base_model": DEFAULT_MODEL, "dataset": DATASET_SHA256, "max_steps": 4}
    spec.update(spec_changes)
    return protocol.Lease(
        job_id=job_id,
        lease_id=lease_id,
        attempt=1,
        max_attempts=3,
        spec=spec,
        dataset_sha256=DATASET_SHA256,
        dataset_size=len(DATASET),
        lease_seconds=60.0,
        model=protocol.ModelFiles.of(CATALOGUE[DEFAULT_MODEL], with_weights=True),
    )


def inventory() -> DeviceInventory:
    return DeviceInventory(
        gpus=(
            GpuInfo(
                index=0,
                vendor="nvidia",
                name="NVIDIA GeForce RTX 4090",
                backend="cuda",
                memory_total_bytes=24 << 30,
                memory_free_bytes=20 << 30,
                temperature_celsius=61.0,
                utilization_percent=math.nan,
                power_watts=120.5,
            ),
        ),
        cpu=CpuInfo(name="", logical_cores=16, memory_total_bytes=64 << 30, memory_available_bytes=40 << 30),
        backends=("cuda", "cpu"),
    )


def test_coordinator_urls_normalize_and_map_to_the_node_websocket() -> None:
    assert token_store.normalize_coordinator_url("HTTP://Example.COM:80/swarm/") == "http://example.com/swarm"
    assert websocket_url("https://example.com") == "wss://example.com/node"
    assert websocket_url("http://127.0.0.1:8000/swarm/") == "ws://127.0.0.1:8000/swarm/node"
    with pytest.raises(ValueError):
        token_store.normalize_coordinator_url("ftp://example.com")


def test_backoff_delays_are_jittered_within_a_doubling_capped_bound() -> None:
    backoff = Backoff(base=1.0, cap=60.0, rng=random.Random(7))
    ceilings, delays = [], []
    for _ in range(12):
        ceilings.append(backoff.ceiling())
        delays.append(backoff.next_delay())
    assert ceilings[:7] == [1, 2, 4, 8, 16, 32, 60] and set(ceilings[6:]) == {60}
    assert all(0 <= delay <= ceiling for delay, ceiling in zip(delays, ceilings, strict=True))
    assert len(set(delays)) == len(delays)  # jittered, not a fixed schedule
    backoff.reset()
    assert backoff.ceiling() == 1 and backoff.next_delay() <= 1
    # Many agents reconnecting at once spread out over the whole window.
    spread = [Backoff(rng=random.Random(seed)).next_delay() for seed in range(200)]
    assert min(spread) < 0.1 and max(spread) > 0.9


def test_a_close_code_says_whether_to_reconnect_and_how_soon() -> None:
    coordinator = "http://127.0.0.1:8000"
    refused = connection_end(protocol.CloseCode.UNAUTHORIZED, "token revoked", coordinator, "0.1.0")
    assert refused.fatal and "token revoked" in refused.problem and "--forget" in refused.problem
    outdated = connection_end(
        protocol.CloseCode.UNSUPPORTED_VERSION, "older than 0.2.0", coordinator, "0.1.0"
    )
    assert outdated.fatal and outdated.unsupported_version
    assert outdated.problem == (
        "the coordinator at http://127.0.0.1:8000 does not work with this version of compute-swarm, 0.1.0 "
        "(older than 0.2.0): install the version it offers at http://127.0.0.1:8000/sell"
    )
    replaced = connection_end(protocol.CloseCode.REPLACED, "replaced", coordinator, "0.1.0")
    assert not replaced.fatal and replaced.slow_reconnect and "running twice" in replaced.problem
    dropped = connection_end(1006, "", coordinator, "0.1.0")
    assert not dropped.fatal and not dropped.slow_reconnect and "without a close" in dropped.problem
    going_away = connection_end(protocol.CloseCode.GOING_AWAY, "restarting", coordinator, "0.1.0")
    assert going_away == connection_end(1001, "restarting", coordinator, "0.1.0")
    assert not going_away.slow_reconnect and going_away.problem.endswith("(close code 1001: restarting)")


def test_telemetry_from_an_inventory_uses_the_torch_checked_backends() -> None:
    telemetry = telemetry_from_inventory(inventory(), backends=("cpu",))
    assert telemetry.backends == ("cpu",)
    (gpu,) = telemetry.gpus
    assert (gpu.vendor, gpu.backend, gpu.memory_free_bytes, gpu.temperature_celsius) == (
        "nvidia",
        "cuda",
        20 << 30,
        61.0,
    )
    assert gpu.utilization_percent is None  # NaN is no reading
    assert telemetry.cpu.name == "unknown CPU" and telemetry.cpu.logical_cores == 16
    # Without a torch check the inventory's own list stands, and the CPU is always offered.
    assert telemetry_from_inventory(inventory()).backends == ("cuda", "cpu")
    # It is a valid wire message.
    hello = protocol.Hello(protocol_version=1, agent_version="t", telemetry=telemetry)
    assert protocol.parse_node_message(hello.model_dump_json()) == hello


def test_a_lease_becomes_a_spec_with_the_nodes_own_model_and_dataset_paths(tmp_path: Path) -> None:
    local = tmp_path / "artifacts" / DATASET_SHA256
    model = tmp_path / "models" / "b179c9523d0e6a0f" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    spec = spec_for_lease(make_lease(rank=4), str(model), local)
    assert isinstance(spec, LoraJobSpec) and spec.dataset == str(local)
    assert (spec.base_model, spec.rank, spec.max_steps) == (str(model), 4, 4)


def lease_text(**changes: object) -> str:
    """A lease as it arrives on the wire, with its fields (the spec's under "spec") changed."""
    message = json.loads(make_lease().model_dump_json())
    message["spec"].update(changes.pop("spec", {}))
    message.update(changes)
    return json.dumps(message)


def test_a_lease_whose_job_cannot_run_as_sent_is_refused_and_the_connection_kept() -> None:
    assert protocol.parse_coordinator_message(lease_text()) == make_lease()
    unusable = {
        "a setting out of range": {"spec": {"rank": 0}},
        "no base model": {"spec": {"base_model": None}},
        "a path for the dataset": {"spec": {"dataset": "/home/seller/.ssh/id_rsa"}},
        "another dataset than the lease's": {"spec": {"dataset": "b" * 64}},
        "an adapter the lease does not name": {"spec": {"evaluate_adapter": "c" * 64}},
        "a field this node does not know": {"spec": {"new_setting": 1}},
        "a path for the base model": {"spec": {"base_model": "/home/seller/.ssh/id_rsa"}},
        "another model than the lease's files": {"spec": {"base_model": "some-other-model"}},
        "a model file named like a path": {
            "model": {"name": DEFAULT_MODEL, "gguf": {"name": "../x", "sha256": "a" * 64, "size": 1}}
        },
    }
    for what, changes in unusable.items():
        with pytest.raises(protocol.UnusableLease) as refused:
            protocol.parse_coordinator_message(lease_text(**changes))
        failure = refused.value.failure
        assert (failure.job_id, failure.lease_id, failure.kind) == ("job_1", "lease_1", "invalid_spec"), what
        assert "cannot take the lease" in failure.message, what
    # A lease without the job it is about cannot be answered: that is a broken connection.
    with pytest.raises(protocol.ProtocolViolation) as broken:
        protocol.parse_coordinator_message(lease_text(job_id=None, spec={"rank": 0}))
    assert not isinstance(broken.value, protocol.UnusableLease)


def test_a_verification_re_run_evaluates_the_adapter_the_lease_names(tmp_path: Path) -> None:
    delivered = "d" * 64
    lease = protocol.parse_coordinator_message(
        lease_text(
            spec={"evaluate_adapter": delivered}, evaluate_result_sha256=delivered, evaluate_result_size=9
        )
    )
    spec = spec_for_lease(lease, "model.gguf", tmp_path / "data.jsonl", tmp_path / "delivered")
    assert isinstance(spec, LoraJobSpec) and spec.evaluate_adapter == str(tmp_path / "delivered")


def test_records_translate_into_wire_messages() -> None:
    lease = make_lease()
    progress = Progress(
        step=3,
        total_steps=4,
        loss=1.25,
        learning_rate=1e-4,
        tokens_per_second=900.0,
        elapsed_seconds=3.0,
        eta_seconds=1.0,
        eval_loss=math.inf,
    )
    message = progress_message(lease, progress)
    assert (message.job_id, message.lease_id, message.step, message.loss, message.eval_loss) == (
        "job_1",
        "lease_1",
        3,
        1.25,
        None,
    )
    completed = Completed(
        output_dir="/x", steps=4, final_loss=1.0, eval_loss=None, train_tokens=512, seconds=12.5
    )
    result = result_message(lease, completed, "a" * 64)
    assert (result.steps, result.final_loss, result.train_tokens, result.seconds, result.sha256) == (
        4,
        1.0,
        512,
        12.5,
        "a" * 64,
    )
    failure = failure_message(lease, "crashed", "x" * 5000)
    assert failure.kind == "crashed" and len(failure.message) == 4000
    assert checkpoint_message(lease, 2, "b" * 64).step == 2
    for wire in (message, result, failure):
        assert protocol.parse_node_message(wire.model_dump_json()) == wire


def test_progress_is_rate_limited_but_the_last_one_is_kept() -> None:
    throttle = ProgressThrottle(interval=1.0)
    lease = make_lease()

    def at(step: int) -> protocol.JobProgress:
        return protocol.JobProgress(job_id=lease.job_id, lease_id=lease.lease_id, step=step, total_steps=9)

    assert throttle.offer(at(1), now=10.0) == at(1)
    assert throttle.offer(at(2), now=10.3) is None
    assert throttle.offer(at(3), now=10.6) is None
    assert throttle.offer(at(4), now=11.0) == at(4)
    assert throttle.offer(at(5), now=11.2) is None
    assert throttle.flush() == at(5)
    assert throttle.flush() is None


def test_a_new_held_out_loss_is_never_held_back() -> None:
    """A sweep trial is judged by the held-out loss at the step it was measured; a throttled report
    reached the coordinator a step later (or never), so the trial's checkpoint went unjudged."""
    throttle = ProgressThrottle(interval=1.0)
    lease = make_lease()

    def at(step: int, eval_loss: float | None = None) -> protocol.JobProgress:
        return protocol.JobProgress(
            job_id=lease.job_id, lease_id=lease.lease_id, step=step, total_steps=9, eval_loss=eval_loss
        )

    assert throttle.offer(at(1), now=10.0) == at(1)
    assert throttle.offer(at(2, 1.5), now=10.1) == at(2, 1.5)
    # The same loss repeated on later reports (as the engine does) is throttled as usual.
    assert throttle.offer(at(3, 1.5), now=10.2) is None
    assert throttle.offer(at(4, 1.2), now=10.3) == at(4, 1.2)


def test_outbox_keeps_reports_until_acknowledged_and_resends_them() -> None:
    lease = make_lease()
    outbox = Outbox()
    first, second = checkpoint_message(lease, 2, "a" * 64), checkpoint_message(lease, 4, "b" * 64)
    result = result_message(
        lease,
        Completed(output_dir="/x", steps=4, final_loss=1.0, eval_loss=None, train_tokens=1, seconds=1),
        "c" * 64,
    )
    outbox.add(first)
    outbox.add(second)
    outbox.add(result)

    def ack(about: str, job_id: str = "job_1") -> protocol.Acknowledged:
        return protocol.Acknowledged(
            job_id=job_id, lease_id="lease_1", about=about, accepted=True, state="running"
        )

    # The first checkpoint's acknowledgement settles the oldest checkpoint report.
    assert outbox.acknowledge(ack("checkpoint")) == first
    assert outbox.acknowledge(ack("failure")) is None
    assert outbox.acknowledge(ack("result", job_id="job_2")) is None
    # Nothing else was acknowledged before the connection dropped: both are sent again.
    assert outbox.for_new_connection() == [second, result]
    assert outbox.for_new_connection() == [second, result]
    assert outbox.acknowledge(ack("result")) == result
    assert outbox.acknowledge(ack("checkpoint")) == second
    assert len(outbox) == 0

    # A newer checkpoint makes an unacknowledged older one pointless to send again.
    outbox.add(first)
    outbox.add(second)
    assert outbox.for_new_connection() == [second]
