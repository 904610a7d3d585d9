"""A seller's adapter GGUF is checked against the base model before anyone else loads it (issue 16, M5)."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from compute_swarm.coordinator.service.adapter_check import AdapterRejected, check_adapter
from compute_swarm.engine.jobs import DEFAULT_MODEL
from compute_swarm.engine.models import fetch_catalogue_model

RANK = 8
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager")


@pytest.fixture(scope="module")
def base() -> Path:
    return fetch_catalogue_model(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def base_shapes(base) -> dict[str, tuple[int, int]]:
    reader = gguf.GGUFReader(base)
    return {
        t.name: (int(t.shape[0]), int(t.shape[1]))
        for t in reader.tensors
        if t.name == "blk.0.attn_q.weight" or t.name == "blk.1.ffn_up.weight"
    }


def write_adapter(
    path: Path, tensors: dict[str, np.ndarray], *, kind: str = "adapter", alpha: float = 16.0
) -> Path:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_string("general.type", kind)
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def pairs(shapes: dict[str, tuple[int, int]], rank: int = RANK, dtype=np.float32) -> dict[str, np.ndarray]:
    """llama.cpp's layout, as the engine exports it: lora_a (rank, in), lora_b (out, rank) in numpy order."""
    tensors = {}
    for name, (inputs, outputs) in shapes.items():
        tensors[f"{name}.lora_a"] = np.zeros((rank, inputs), dtype=dtype)
        tensors[f"{name}.lora_b"] = np.zeros((outputs, rank), dtype=dtype)
    return tensors


def test_an_adapter_that_fits_the_base_model_passes(tmp_path, base, base_shapes):
    check_adapter(write_adapter(tmp_path / "good.gguf", pairs(base_shapes)), base)
    check_adapter(write_adapter(tmp_path / "half.gguf", pairs(base_shapes, dtype=np.float16)), base)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: {**t, "blk.0.attn_q.weight.lora_b": np.zeros((576, RANK + 1), np.float32)}, "do not fit"),
        (
            lambda t: {**t, "blk.99.attn_q.weight.lora_a": np.zeros((RANK, 576), np.float32)},
            "not half of a LoRA pair",
        ),
        (lambda t: {**t, "token_embd.weight": np.zeros((4, 4), np.float32)}, "not half of a LoRA pair"),
        (lambda t: {k: v for k, v in t.items() if not k.endswith("lora_b")}, "has only its lora_a"),
        (lambda t: {k: v.astype(np.float64) for k, v in t.items()}, "not F32, F16 or BF16"),
        (lambda t: {}, "holds no tensor"),
    ],
)
def test_an_adapter_that_does_not_fit_is_rejected_with_the_reason(
    tmp_path, base, base_shapes, change, message
):
    adapter = write_adapter(tmp_path / "bad.gguf", change(pairs(base_shapes)))
    with pytest.raises(AdapterRejected, match=message):
        check_adapter(adapter, base)


def test_a_file_that_is_not_a_lora_adapter_is_rejected(tmp_path, base, base_shapes):
    with pytest.raises(AdapterRejected, match="not a LoRA adapter"):
        check_adapter(write_adapter(tmp_path / "model.gguf", pairs(base_shapes), kind="model"), base)
    with pytest.raises(AdapterRejected, match="alpha"):
        check_adapter(write_adapter(tmp_path / "alpha.gguf", pairs(base_shapes), alpha=float("nan")), base)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf at all" * 100)
    with pytest.raises(AdapterRejected, match="not a GGUF file"):
        check_adapter(garbage, base)


def test_a_header_announcing_a_flood_is_rejected_before_parsing(tmp_path, base):
    # What a hostile node could send: a header claiming a billion tensors, which a parser would try to read.
    bomb = tmp_path / "bomb.gguf"
    bomb.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 10**9, 10**9) + b"\0" * 64)
    started = time.monotonic()
    with pytest.raises(AdapterRejected, match="announces 1000000000 tensors"):
        check_adapter(bomb, base)
    assert time.monotonic() - started < 0.5


# ---- through the real websocket: a node's adapter is refused before anyone is offered it


def deliver(node, lease: dict, adapter: Path) -> dict:
    """Upload a result and an adapter for the lease, and report them: the coordinator's ack."""
    result = node.upload_result(lease)
    gguf_sha256 = node.http.upload_artifact(
        str(adapter), purpose="adapter", job_id=lease["job_id"], lease_id=lease["lease_id"]
    )
    node.send({"type": "result", "job_id": lease["job_id"], "lease_id": lease["lease_id"], "sha256": result,
               "gguf_sha256": gguf_sha256, "steps": 3, "final_loss": 1.5, "eval_loss": 1.6,
               "train_tokens": 1000, "seconds": 2.0})  # fmt: skip
    return node.receive_type("ack")


def test_a_node_delivering_a_bad_adapter_is_refused_and_a_good_one_is_served(tmp_path, base_shapes):
    from compute_swarm.sdk.client import SwarmClient
    from tests.coordinator.test_node_socket import ScriptedNode, check_ledger, submit
    from tests.swarm_processes import Coordinator

    coordinator = Coordinator(tmp_path / "coordinator").start()
    try:
        key = coordinator.create_buyer("adapter buyer", "10")
        buyer = SwarmClient(coordinator.url, key)
        node = ScriptedNode(coordinator, "adapter node")
        node.connect()
        job = submit(buyer)
        lease = node.receive_type("lease")
        # Before: any bytes were accepted as the adapter, and offered to sellers' llama.cpp and buyers.
        bomb = tmp_path / "bomb.gguf"
        bomb.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 10**9, 10**9) + b"\0" * 64)
        refused = deliver(node, lease, bomb)
        assert not refused["accepted"] and "adapter is refused" in refused["message"], refused
        wrong = write_adapter(
            tmp_path / "wrong.gguf",
            pairs(base_shapes, rank=4) | {"blk.0.attn_q.weight.lora_b": np.zeros((576, 5), np.float32)},
        )
        refused = deliver(node, lease, wrong)
        assert not refused["accepted"] and "do not fit" in refused["message"], refused
        assert buyer.job(job["id"])["state"] in ("leased", "running")

        accepted = deliver(node, lease, write_adapter(tmp_path / "good.gguf", pairs(base_shapes)))
        assert accepted["accepted"], accepted
        # Checked, it is offered: the job names its fine-tuned model.
        assert buyer.job(job["id"])["fine_tuned_model"].startswith("ft:")
        node.disconnect()
        check_ledger(coordinator.data_dir)
    finally:
        coordinator.stop()
