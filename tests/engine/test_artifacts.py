"""A job's result: the adapter files and its metrics, which name the dataset by its hash, never a path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compute_swarm.engine import artifacts
from compute_swarm.engine.jobs import LoraJobSpec

DATASET_SHA256 = "ab" * 32


def finished_job(output: Path) -> LoraJobSpec:
    """An output directory as a finished LoRA job leaves it, with a checkpoint and a log beside the result."""
    checkpoint = artifacts.checkpoint_directory(output) / artifacts.checkpoint_name(2)
    checkpoint.mkdir(parents=True)
    (checkpoint / artifacts.CHECKPOINT_STATE_FILE).write_text('{"step": 2}')
    (output / artifacts.WORKER_LOG).write_text("training\n")
    (output / artifacts.ADAPTER_CONFIG_FILE).write_text("{}")
    (output / artifacts.ADAPTER_WEIGHTS_FILE).write_bytes(b"weights")
    spec = LoraJobSpec(
        base_model="smollm2-135m-instruct",
        dataset="/home/seller/jobs/data.jsonl",
        evaluate_adapter="/home/seller/jobs/under-verification",
        max_steps=2,
    )
    history = {"loss": [2.0, 1.5], "eval_loss": [[2, 1.7]], "train_tokens": 40}
    artifacts.write_training_metrics(output, spec, history, train_examples=8, eval_examples=2)
    return spec


def test_a_result_holds_the_adapter_and_metrics_without_the_nodes_paths(tmp_path: Path) -> None:
    output, staging = tmp_path / "output", tmp_path / "staging"
    spec = finished_job(output)
    staging.mkdir()

    artifacts.stage_result(output, staging, DATASET_SHA256)

    assert sorted(path.name for path in staging.iterdir()) == sorted(
        [artifacts.ADAPTER_CONFIG_FILE, artifacts.ADAPTER_WEIGHTS_FILE, artifacts.METRICS_FILE]
    )
    shared_text = (staging / artifacts.METRICS_FILE).read_text()
    assert "/home/seller" not in shared_text
    shared = json.loads(shared_text)
    assert shared["spec"]["dataset"] == DATASET_SHA256 and "evaluate_adapter" not in shared["spec"]
    assert (shared["loss"], shared["eval_loss"], shared["train_tokens"]) == ([2.0, 1.5], [[2, 1.7]], 40)
    # The node's own copy still says where its data lives.
    local = json.loads((output / artifacts.METRICS_FILE).read_text())
    assert local["spec"] == spec.model_dump(mode="json")


def test_a_job_that_left_neither_adapter_nor_completions_has_no_result(tmp_path: Path) -> None:
    output, staging = tmp_path / "output", tmp_path / "staging"
    finished_job(output)
    (output / artifacts.ADAPTER_WEIGHTS_FILE).unlink()
    staging.mkdir()
    with pytest.raises(ValueError, match="neither an adapter nor completions"):
        artifacts.stage_result(output, staging, DATASET_SHA256)
