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

from engine.jobs import InvalidJobError, LoraJobSpec

FORMAT_VERSION = 1
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RANDOM_STATE_FILE = "random_state.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"
KEEP_LATEST = 2
# Fields that may change between the run that saved a checkpoint and the run that resumes it.
RESUMABLE_CHANGES = {"checkpoint_interval"}


class CheckpointError(InvalidJobError):
    """A checkpoint that is missing, damaged, or belongs to a different job."""


@dataclass(frozen=True)
class TrainerState:
    step: int
    scaler: dict[str, Any] | None  # torch.amp.GradScaler state for fp16 training, else None
    metrics: dict[str, Any]


def checkpoint_directory(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def latest_checkpoint(output_dir: Path) -> Path | None:
    candidates = sorted(checkpoint_directory(output_dir).glob("step-*"))
    complete = [path for path in candidates if (path / STATE_FILE).is_file()]
    return complete[-1] if complete else None


def save_adapter(model: PeftModel, directory: Path) -> None:
    """Save in peft's layout, with the same bytes for the same weights in every process."""
    model.save_pretrained(directory)
    # peft keeps target_modules as a set, whose order follows Python's per-process string hashing;
    # a sorted list makes the file reproducible (peft reads either).
    config_path = directory / "adapter_config.json"
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_checkpoint(
    output_dir: Path,
    *,
    spec: LoraJobSpec,
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
) -> Path:
    parent = checkpoint_directory(output_dir)
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / f"step-{state.step:08d}"
    scratch = parent / f".step-{state.step:08d}.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    save_adapter(model, scratch)
    save_file(_optimizer_tensors(optimizer), scratch / OPTIMIZER_FILE)
    save_file(_random_state(), scratch / RANDOM_STATE_FILE)
    document = {
        "format": FORMAT_VERSION,
        "step": state.step,
        "spec": spec.model_dump(mode="json"),
        "scaler": state.scaler,
        "metrics": state.metrics,
    }
    # The state file is written last: a directory without it is an interrupted save and is ignored.
    (scratch / STATE_FILE).write_text(json.dumps(document, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(scratch, final)
    for old in sorted(parent.glob("step-*"))[:-KEEP_LATEST]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: Path, *, spec: LoraJobSpec, model: PeftModel, optimizer: torch.optim.Optimizer
) -> TrainerState:
    """Restore the adapter, optimizer and random state into freshly built objects."""
    try:
        document = json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not a complete checkpoint: {error}") from None
    if document.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {document.get('format')}, expected {FORMAT_VERSION}"
        )
    saved_spec = {key: value for key, value in document["spec"].items() if key not in RESUMABLE_CHANGES}
    current_spec = {
        key: value for key, value in spec.model_dump(mode="json").items() if key not in RESUMABLE_CHANGES
    }
    if saved_spec != current_spec:
        differences = sorted(key for key in current_spec if saved_spec.get(key) != current_spec[key])
        raise CheckpointError(f"{path} belongs to a different job: {', '.join(differences)} differ")
    try:
        set_peft_model_state_dict(model, load_file(path / ADAPTER_FILE))
        _restore_optimizer(optimizer, load_file(path / OPTIMIZER_FILE))
        _restore_random_state(load_file(path / RANDOM_STATE_FILE))
    except (OSError, KeyError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path} cannot be restored: {error}") from None
    return TrainerState(step=int(document["step"]), scaler=document["scaler"], metrics=document["metrics"])


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


def _random_state() -> dict[str, torch.Tensor]:
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = cuda_state
    return tensors


def _restore_random_state(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["cpu"])
    cuda_keys = sorted((key for key in tensors if key.startswith("cuda.")), key=lambda key: int(key[5:]))
    cuda_states = [tensors[key] for key in cuda_keys]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
