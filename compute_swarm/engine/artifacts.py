"""What a job leaves in its output directory, by name, and which of it makes the result a buyer gets.

Light on purpose (no torch): the node agent reads these names and stages results with them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from compute_swarm.engine.jobs import LoraJobSpec

# A LoRA adapter in peft's layout: peft's own loaders expect exactly these two names.
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
GGUF_ADAPTER_FILE = "adapter.gguf"  # the adapter for llama.cpp, beside peft's files
METRICS_FILE = "metrics.json"  # the training curves and the spec they came from
WORKER_LOG = "worker.log"  # the engine child's stderr, appended to by every attempt
# A batch inference job's answers, one JSON line per prompt in order (engine.inference).
COMPLETIONS_FILE = "completions.jsonl"

# Checkpoints: output_dir/checkpoints/step-00000003/{adapter files, trainer state, optimizer, RNG}.
CHECKPOINTS_DIRECTORY = "checkpoints"
CHECKPOINT_PREFIX = "step-"
CHECKPOINT_STATE_FILE = "trainer_state.json"  # written last: a checkpoint without it is incomplete
CHECKPOINT_OPTIMIZER_FILE = "optimizer.safetensors"
CHECKPOINT_RANDOM_STATE_FILE = "random_state.safetensors"

# What a finished job leaves for its buyer: a LoRA adapter (peft files, its llama.cpp form when the base
# model is a GGUF, the training curves) or a batch inference job's completions.
RESULT_FILES = (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    METRICS_FILE,
    GGUF_ADAPTER_FILE,
    COMPLETIONS_FILE,
)
RESULT_ARCHIVE = "result.tar"  # the result files, packed for upload (sdk.client.pack_directory)


def checkpoint_directory(output_dir: Path) -> Path:
    return output_dir / CHECKPOINTS_DIRECTORY


def checkpoint_name(step: int) -> str:
    """The checkpoint directory's name after `step` optimizer steps; names sort in step order."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def checkpoint_directories(output_dir: Path) -> list[Path]:
    """Every checkpoint directory of a job, complete or not, oldest first."""
    return sorted(checkpoint_directory(output_dir).glob(CHECKPOINT_PREFIX + "*"))


def write_training_metrics(
    output_dir: Path,
    spec: LoraJobSpec,
    history: dict[str, Any],
    *,
    train_examples: int,
    eval_examples: int,
) -> None:
    """metrics.json: the spec as this node ran it (its local paths included) and the training curves."""
    metrics = {
        "spec": spec.model_dump(mode="json"),
        "loss": history["loss"],
        "eval_loss": history["eval_loss"],
        "train_tokens": history["train_tokens"],
        "train_examples": train_examples,
        "eval_examples": eval_examples,
    }
    (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2))


def shareable_metrics(metrics: Any, dataset_sha256: str) -> Any:
    """metrics.json as it may leave this node: the spec names the dataset by its content hash, which is
    how the buyer knows it, not by this node's path, and no adapter under verification."""
    if not (isinstance(metrics, dict) and isinstance(metrics.get("spec"), dict)):
        return metrics
    spec = {**metrics["spec"], "dataset": dataset_sha256}
    spec.pop("evaluate_adapter", None)
    return {**metrics, "spec": spec}


def stage_result(output_dir: Path, staging: Path, dataset_sha256: str) -> None:
    """Copy the result files (no checkpoints, no log) of a finished job into the empty directory
    `staging`, metrics.json made shareable. Raises ValueError when the job left no result."""
    present = [name for name in RESULT_FILES if (output_dir / name).is_file()]
    if not {ADAPTER_WEIGHTS_FILE, COMPLETIONS_FILE} & set(present):
        raise ValueError("the job left neither an adapter nor completions")
    for name in present:
        source = output_dir / name
        if name == METRICS_FILE:
            metrics = shareable_metrics(json.loads(source.read_text(encoding="utf-8")), dataset_sha256)
            (staging / name).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        else:
            shutil.copyfile(source, staging / name)
