"""A model ops add, end to end through real processes: `admin add-model` from a Hugging Face directory and
its GGUF (a tiny random Qwen2, tests/tiny_models.py), the buyer's fine-tune on it run by a node that
fetches the model from the coordinator alone (its package sources point nowhere), and the fine-tuned
model answering a chat through llama.cpp with the adapter the node exported."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from compute_swarm.coordinator.service.catalogue import CACHE_SECONDS
from compute_swarm.engine.jobs import DEMO_CHAT_DATASET
from compute_swarm.sdk.client import SwarmClient, SwarmError
from tests.coordinator.test_node_socket import check_ledger
from tests.swarm_processes import Coordinator, Node, run_cli, wait_for

pytestmark = pytest.mark.slow

SMALL_JOB = {
    "max_steps": 4,
    "batch_size": 2,
    "max_sequence_length": 96,
    "learning_rate": 1e-3,
    "eval_fraction": 0.0,
}


def test_a_model_ops_add_is_fine_tuned_on_a_node_and_its_fine_tune_answers(tmp_path, tiny_models):
    tiny = tiny_models("qwen2")
    coordinator = Coordinator(tmp_path / "coordinator").start()
    # The node may fetch models from the coordinator and its peers only: no package index answers it.
    node = Node(
        coordinator,
        tmp_path / "node",
        name="catalogue-node",
        environment={
            "SWARM_MODELS_DIR": str(tmp_path / "node-models"),
            "SWARM_MODEL_SOURCES": "http://127.0.0.1:9/",
        },
    )
    try:
        licence = tmp_path / "LICENSE"
        licence.write_text("Apache License\nVersion 2.0, January 2004\n")
        added = run_cli(
            "admin", "add-model", "--data-dir", str(coordinator.data_dir), "--name", "tiny-qwen2",
            "--hf-dir", str(tiny.directory), "--gguf", str(tiny.gguf_path), "--license", str(licence),
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
        assert "qwen2," in added.stdout and "Apache-2.0" in added.stdout
        node.start()

        api_key = coordinator.create_buyer("qwen-buyer", "50")
        buyer = SwarmClient(coordinator.url, api_key)
        dataset = buyer.upload_file(DEMO_CHAT_DATASET)
        spec = {"base_model": "tiny-qwen2", "dataset": dataset["id"], **SMALL_JOB}
        job = wait_for(lambda: _submitted(buyer, spec), 10 * CACHE_SECONDS, "a fine-tune on tiny-qwen2")
        done = wait_for(
            lambda: (current := buyer.job(job["id"]))["state"] in ("completed", "failed") and current,
            400,
            "the fine-tune to finish",
            0.5,
        )
        assert done["state"] == "completed", (done, node.log())
        assert done["metrics"]["steps"] == 4 and done["fine_tuned_model"].startswith("ft:tiny-qwen2:")

        # The node holds the model's files, fetched from the coordinator and checked by hash.
        held = {path.name: path for path in (tmp_path / "node-models").glob("*/*") if path.is_file()}
        for name in ("config.json", "model.safetensors", tiny.gguf_path.name):
            source = tiny.directory / name if name != tiny.gguf_path.name else tiny.gguf_path
            assert (
                hashlib.sha256(held[name].read_bytes()).digest()
                == hashlib.sha256(source.read_bytes()).digest()
            )

        response = httpx.post(
            f"{coordinator.url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {api_key}"},
            json={
                "model": done["fine_tuned_model"],
                "messages": [{"role": "user", "content": "What is 2 + 2?"}],
                "max_tokens": 8,
                "temperature": 0,
            },
            timeout=120,
        )
        assert response.status_code == 200, (response.text, node.log())
        answer = response.json()
        assert answer["model"] == done["fine_tuned_model"] and answer["usage"]["completion_tokens"] > 0
        # Two blocks and the output layer, on this machine's CPU build of llama.cpp.
        assert answer["offload"] == {"gpu_layers": 0, "layers": 3, "description": "CPU only"}
        models = {model["name"]: model for model in buyer.models()}
        assert models["tiny-qwen2"]["parameters"] == _parameters(tiny.directory)
    finally:
        node.kill()
        coordinator.kill()
    check_ledger(coordinator.data_dir)


def _submitted(buyer: SwarmClient, spec: dict) -> dict | None:
    try:
        return buyer.submit_lora(spec)
    except SwarmError as error:
        if error.status_code == 422 and "unknown base_model" in str(error):
            return None
        raise


def _parameters(directory) -> int:
    """The model's parameters as transformers counts them (a tied head once)."""
    from transformers import AutoModelForCausalLM

    return sum(
        parameter.numel() for parameter in AutoModelForCausalLM.from_pretrained(directory).parameters()
    )
