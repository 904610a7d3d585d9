"""Resumable training checkpoints, written atomically, in safetensors and JSON only (never pickle).

A checkpoint directory holds the adapter in peft's layout, the optimizer's tensors, the random number
generators' states and a JSON file with the step, the spec it belongs to and the loss scaler's state.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from compute_swarm.engine.artifacts import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    CHECKPOINT_OPTIMIZER_FILE,
    CHECKPOINT_RANDOM_STATE_FILE,
    CHECKPOINT_STATE_FILE,
    checkpoint_directories,
    checkpoint_directory,
    checkpoint_name,
)
from compute_swarm.engine.jobs import InvalidJobError, LoraJobSpec

FORMAT_VERSION = 1
KEEP_LATEST = 2
# Fields that may change between the run that saved a checkpoint and the run that resumes it: the
# interval, and the local paths of the model and data (each node keeps its own; their contents count).
RESUMABLE_CHANGES = {"checkpoint_interval", "base_model", "dataset", "evaluate_adapter"}


class CheckpointError(InvalidJobError):
    """A checkpoint that is missing, damaged, or belongs to a different job."""


@dataclass(frozen=True)
class TrainerState:
    step: int
    scaler: dict[str, Any] | None  # torch.amp.GradScaler state for fp16 training, else None
    metrics: dict[str, Any]


def latest_checkpoint(output_dir: Path) -> Path | None:
    complete = [
        path for path in checkpoint_directories(output_dir) if (path / CHECKPOINT_STATE_FILE).is_file()
    ]
    return complete[-1] if complete else None


def save_adapter(model: PeftModel, directory: Path) -> None:
    """Save in peft's layout, with the same bytes for the same weights in every process."""
    model.save_pretrained(directory)
    # peft keeps target_modules as a set, whose order follows Python's per-process string hashing;
    # a sorted list makes the file reproducible (peft reads either).
    config_path = directory / ADAPTER_CONFIG_FILE
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def job_identity(spec: LoraJobSpec, *, model_fingerprint: str, dataset_sha256: str) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the spec's settings and its inputs' contents."""
    identity = {
        key: value for key, value in spec.model_dump(mode="json").items() if key not in RESUMABLE_CHANGES
    }
    return {**identity, "model": model_fingerprint, "dataset_sha256": dataset_sha256}


def save_checkpoint(
    output_dir: Path,
    *,
    spec: LoraJobSpec,
    identity: dict[str, Any],
    device: str,
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
) -> Path:
    parent = checkpoint_directory(output_dir)
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / checkpoint_name(state.step)
    scratch = parent / f".{checkpoint_name(state.step)}.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    save_adapter(model, scratch)
    save_file(_optimizer_tensors(optimizer), scratch / CHECKPOINT_OPTIMIZER_FILE)
    save_file(_random_state(device), scratch / CHECKPOINT_RANDOM_STATE_FILE)
    document = {
        "format": FORMAT_VERSION,
        "step": state.step,
        "identity": identity,
        # Without paths: a checkpoint travels to other machines and must not carry this one's user names.
        "spec": spec.model_dump(mode="json", exclude=RESUMABLE_CHANGES),
        "scaler": state.scaler,
        "metrics": state.metrics,
    }
    # The state file is written last: a directory without it is an interrupted save and is ignored.
    (scratch / CHECKPOINT_STATE_FILE).write_text(json.dumps(document, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(scratch, final)
    for old in checkpoint_directories(output_dir)[:-KEEP_LATEST]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: Path,
    *,
    identity: dict[str, Any],
    device: str,
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
) -> TrainerState:
    """Restore the adapter, optimizer and random state into freshly built objects."""
    try:
        document = json.loads((path / CHECKPOINT_STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not a complete checkpoint: {error}") from None
    if document.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {document.get('format')}, expected {FORMAT_VERSION}"
        )
    saved = document.get("identity")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path} does not say which job it belongs to")
    if saved != identity:
        differences = sorted(key for key in identity if saved.get(key) != identity[key])
        raise CheckpointError(f"{path} belongs to a different job: {', '.join(differences)} differ")
    try:
        set_peft_model_state_dict(model, load_file(path / ADAPTER_WEIGHTS_FILE))
        _restore_optimizer(optimizer, load_file(path / CHECKPOINT_OPTIMIZER_FILE))
        _restore_random_state(load_file(path / CHECKPOINT_RANDOM_STATE_FILE), device)
        return TrainerState(
            step=int(document["step"]), scaler=document["scaler"], metrics=document["metrics"]
        )
    except (OSError, KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path} cannot be restored: {error}") from None


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    # Optimizer state is {parameter index: {name: tensor}}; the hyperparameters are rebuilt from the
    # spec on resume, so only the per-parameter tensors need saving.
    tensors = {}
    for index, values in optimizer.state_dict()["state"].items():
        for name, value in values.items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            tensors[f"{index}.{name}"] = value.detach().to("cpu").contiguous()
    return tensors


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def _random_state(device: str) -> dict[str, torch.Tensor]:
    # Only the generators this run draws from: the CPU's, and the training device's own.
    tensors = {"cpu": torch.get_rng_state()}
    if device.startswith("cuda"):
        tensors["device"] = torch.cuda.get_rng_state(torch.device(device))
    elif device == "mps":
        tensors["device"] = torch.mps.get_rng_state()
    return tensors


def _restore_random_state(tensors: dict[str, torch.Tensor], device: str) -> None:
    torch.set_rng_state(tensors["cpu"])
    if "device" not in tensors:
        return
    if device.startswith("cuda"):
        torch.cuda.set_rng_state(tensors["device"], torch.device(device))
    elif device == "mps":
        torch.mps.set_rng_state(tensors["device"])
