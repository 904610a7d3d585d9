"""LoRA fine-tuning of a causal language model with transformers + peft.

Deterministic by construction: the data order, the adapter's initialisation and dropout all derive
from the spec's seed, and a checkpoint captures everything else (adapter, optimizer, random state),
so a resumed run ends with the same adapter bytes as an uninterrupted one on the same machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as functional
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors

from compute_swarm.engine import checkpoints, datasets, devices, models, resources
from compute_swarm.engine.jobs import InvalidJobError, LoraJobSpec
from compute_swarm.engine.records import CheckpointSaved, Completed, Log, Progress, Record, Started
from compute_swarm.kernels.attention import backend_in_use

logger = logging.getLogger(__name__)
GGUF_ADAPTER_FILE = "adapter.gguf"  # the adapter for llama.cpp, beside peft's files
METRICS_FILE = "metrics.json"


class TrainingCancelled(Exception):
    def __init__(self, checkpoint: Path | None):
        self.checkpoint = checkpoint
        super().__init__(f"cancelled; resumable from {checkpoint}" if checkpoint else "cancelled")


@dataclass(frozen=True)
class Precision:
    """How the base weights are stored and the forward pass is computed on a device."""

    weights_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    loss_scaling: bool  # fp16 needs a gradient scaler; bf16 and fp32 do not

    @property
    def bytes_per_weight(self) -> int:
        return torch.finfo(self.weights_dtype).bits // 8


def choose_precision(device: str) -> Precision:
    if device.startswith("cuda"):
        # Native bf16 arrived with compute capability 8 (Ampere); older cards only emulate it, slowly.
        if torch.cuda.get_device_capability(torch.device(device))[0] >= 8:
            return Precision(torch.bfloat16, torch.bfloat16, loss_scaling=False)
        return Precision(torch.float16, torch.float16, loss_scaling=True)
    # The CPU and MPS train in fp32: their half-precision matmuls are slow or inexact.
    return Precision(torch.float32, None, loss_scaling=False)


def total_optimizer_steps(spec: LoraJobSpec, train_examples: int) -> int:
    if spec.max_steps is not None:
        return spec.max_steps
    micro_batches_per_epoch = math.ceil(train_examples / spec.batch_size)
    return max(1, math.ceil(spec.epochs * micro_batches_per_epoch / spec.gradient_accumulation_steps))


def learning_rate_at(step: int, spec: LoraJobSpec, total_steps: int) -> float:
    """The learning rate for optimizer step `step` (0-based): linear warm-up, then the schedule."""
    if step < spec.warmup_steps:
        return spec.learning_rate * (step + 1) / spec.warmup_steps
    if spec.schedule == "constant":
        return spec.learning_rate
    progress = (step - spec.warmup_steps) / max(1, total_steps - spec.warmup_steps)
    if spec.schedule == "linear":
        return spec.learning_rate * (1.0 - progress)
    return spec.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))


def _seed_for(*parts: object) -> int:
    text = ":".join(str(part) for part in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def split_for_evaluation(
    examples: list[datasets.TokenizedExample], fraction: float, seed: int
) -> tuple[list[datasets.TokenizedExample], list[datasets.TokenizedExample]]:
    """A seeded split into (train, held-out); at least one example stays on each side when possible."""
    if fraction == 0 or len(examples) < 2:
        return examples, []
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(_seed_for(seed, "eval")))
    held_out = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    held_out_indices = set(order[:held_out].tolist())
    train = [example for index, example in enumerate(examples) if index not in held_out_indices]
    return train, [examples[index] for index in sorted(held_out_indices)]


class BatchPlan:
    """Micro-batch number n of the whole run, computed from n alone (no iterator state to save)."""

    def __init__(self, examples: list[datasets.TokenizedExample], batch_size: int, seed: int):
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.per_epoch = math.ceil(len(examples) / batch_size)
        self._epoch_orders: dict[int, list[int]] = {}

    def micro_batch(self, number: int) -> list[datasets.TokenizedExample]:
        epoch, position = divmod(number, self.per_epoch)
        if epoch not in self._epoch_orders:
            generator = torch.Generator().manual_seed(_seed_for(self.seed, "epoch", epoch))
            self._epoch_orders = {epoch: torch.randperm(len(self.examples), generator=generator).tolist()}
        indices = self._epoch_orders[epoch][position * self.batch_size : (position + 1) * self.batch_size]
        return [self.examples[index] for index in indices]


def collate(
    examples: list[datasets.TokenizedExample], pad_token_id: int, device: str
) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest example."""
    length = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), datasets.IGNORED_LABEL, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        size = len(example.input_ids)
        input_ids[row, :size] = torch.tensor(example.input_ids)
        labels[row, :size] = torch.tensor(example.labels)
        attention_mask[row, :size] = 1
    return {
        "input_ids": input_ids.to(device),
        "labels": labels.to(device),
        "attention_mask": attention_mask.to(device),
    }


def predicted_label_count(batch: dict[str, torch.Tensor]) -> int:
    # Position t predicts token t+1, so the first label of each row is never predicted.
    return int((batch["labels"][:, 1:] != datasets.IGNORED_LABEL).sum())


def answer_loss_sum(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], precision: Precision
) -> torch.Tensor:
    """Summed cross-entropy over the answer tokens (normalised by the caller over a whole step)."""
    device_type = batch["input_ids"].device.type
    autocast = (
        torch.autocast(device_type, dtype=precision.autocast_dtype)
        if precision.autocast_dtype
        else nullcontext()
    )
    with autocast:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # Shift the labels, not the logits: slicing the (batch, seq, vocab) logits would copy them.
    targets = functional.pad(batch["labels"][:, 1:], (0, 1), value=datasets.IGNORED_LABEL)
    return functional.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=datasets.IGNORED_LABEL, reduction="sum"
    )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    examples: list[datasets.TokenizedExample],
    *,
    batch_size: int,
    pad_token_id: int,
    device: str,
    precision: Precision,
) -> float | None:
    """Mean per-token loss on the answers of held-out examples."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_token_id, device)
        total_loss += float(answer_loss_sum(model, batch, precision))
        total_tokens += predicted_label_count(batch)
    model.train(was_training)
    return total_loss / max(1, total_tokens)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    # Deterministic kernels where torch has them; warn (not fail) for the few ops that have none.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def build_model(spec: LoraJobSpec, directory: Path, device: str, precision: Precision) -> PeftModel:
    base = models.load_causal_lm(directory, dtype=precision.weights_dtype, device=device)
    # peft adapts layers with a 2-D weight: linear (and GPT-2's Conv1D) and embedding layers.
    adaptable = {
        name.rsplit(".", 1)[-1]
        for name, module in base.named_modules()
        if isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.ndim == 2
    }
    missing = [name for name in spec.target_modules if name not in adaptable]
    if missing:
        raise InvalidJobError(
            f"target modules {', '.join(missing)} are not adaptable layers of this model; "
            f"it has {', '.join(sorted(adaptable))}"
        )
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, config)


def check_memory(
    spec: LoraJobSpec, device: str, *, memory_limit_bytes: int | None = None
) -> resources.MemoryEstimate:
    """Refuse, before any weights load, a job that would not fit on the device (or within the limit
    the seller set). Raises resources.InsufficientMemoryError naming the numbers."""
    # Read shapes from headers only: a GGUF not yet prepared is measured before it is dequantized.
    model = models.resolve_model(spec.base_model)
    config_file = model.directory / "config.json"
    heads = json.loads(config_file.read_text()).get("num_attention_heads") if model.is_prepared else None
    estimate = resources.estimate_lora_memory(
        spec,
        resources.read_weight_shapes(model.directory if model.is_prepared else model.source),
        device=device,
        compute_dtype_bytes=choose_precision(device).bytes_per_weight,
        attention_heads=heads,
    )
    available = devices.probe(check_torch=False).memory_available_bytes(device)
    if memory_limit_bytes is not None:
        available = memory_limit_bytes if available is None else min(available, memory_limit_bytes)
    if available is not None:
        resources.check_fits(estimate, available_bytes=available, device=device)
    return estimate


def train_lora(
    spec: LoraJobSpec,
    output_dir: str | Path,
    *,
    device: str = "cpu",
    resume_from: str | Path | None = None,
    report: Callable[[Record], None] = lambda record: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> Completed:
    """Fine-tune, writing the adapter (peft layout) and metrics.json into output_dir.

    resume_from: a checkpoint directory, or "latest" for the newest one in output_dir.
    Raises datasets.DatasetError for unusable data, checkpoints.CheckpointError for a bad checkpoint,
    TrainingCancelled when should_stop() turned true (after saving a checkpoint).
    """
    started_at = time.monotonic()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    precision = choose_precision(device)
    seed_everything(spec.seed)

    base_model = models.resolve_model(spec.base_model)
    directory = base_model.prepare()
    tokenizer = models.load_tokenizer(directory)
    examples = datasets.tokenize_dataset(
        datasets.read_jsonl(spec.dataset), tokenizer, spec.max_sequence_length
    )
    train_examples, eval_examples = split_for_evaluation(examples, spec.eval_fraction, spec.seed)
    total_steps = total_optimizer_steps(spec, len(train_examples))
    plan = BatchPlan(train_examples, spec.batch_size, spec.seed)
    pad_token_id = tokenizer.pad_token_id

    model = build_model(spec, directory, device, precision)
    model.train()
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    scaler = torch.amp.GradScaler(device.split(":")[0]) if precision.loss_scaling else None

    step = 0
    history: dict[str, Any] = {"loss": [], "eval_loss": [], "train_tokens": 0}
    identity = checkpoints.job_identity(
        spec,
        model_fingerprint=base_model.fingerprint,
        dataset_sha256=models.sha256_of_file(Path(spec.dataset)),
    )
    if resume_from is not None:
        path = (
            checkpoints.latest_checkpoint(output_dir) if str(resume_from) == "latest" else Path(resume_from)
        )
        if path is None:
            logger.warning("no checkpoint in %s yet: starting from step 0", output_dir)
        else:
            state = checkpoints.load_checkpoint(
                path, identity=identity, device=device, model=model, optimizer=optimizer
            )
            step, history = state.step, state.metrics
            if scaler is not None and state.scaler:
                scaler.load_state_dict(state.scaler)

    report(
        Started(
            process_id=os.getpid(),
            device=device,
            total_steps=total_steps,
            resumed_from_step=step,
            train_examples=len(train_examples),
            eval_examples=len(eval_examples),
            attention=backend_in_use(model.config._attn_implementation, device),
        )
    )

    def save(at_step: int) -> Path:
        state = checkpoints.TrainerState(at_step, scaler.state_dict() if scaler else None, history)
        path = checkpoints.save_checkpoint(
            output_dir,
            spec=spec,
            identity=identity,
            device=device,
            model=model,
            optimizer=optimizer,
            state=state,
        )
        report(CheckpointSaved(step=at_step, path=str(path)))
        return path

    def held_out_loss() -> float | None:
        return evaluate(
            model,
            eval_examples,
            batch_size=spec.batch_size,
            pad_token_id=pad_token_id,
            device=device,
            precision=precision,
        )

    run_tokens, run_started, first_step = 0, time.monotonic(), step
    last_checkpoint_step = step
    loss = history["loss"][-1] if history["loss"] else None
    while step < total_steps:
        if should_stop():
            raise TrainingCancelled(
                save(step) if step > last_checkpoint_step else checkpoints.latest_checkpoint(output_dir)
            )
        learning_rate = learning_rate_at(step, spec, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        batches = [
            collate(plan.micro_batch(step * spec.gradient_accumulation_steps + index), pad_token_id, device)
            for index in range(spec.gradient_accumulation_steps)
        ]
        # Normalise by the answer tokens of the whole step, so accumulation equals one large batch.
        step_label_count = max(1, sum(predicted_label_count(batch) for batch in batches))
        step_loss, step_tokens = 0.0, 0
        for batch in batches:
            micro_loss = answer_loss_sum(model, batch, precision) / step_label_count
            (scaler.scale(micro_loss) if scaler else micro_loss).backward()
            step_loss += micro_loss.item()
            step_tokens += int(batch["attention_mask"].sum())
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, spec.max_grad_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(step_loss):
            raise FloatingPointError(
                f"the loss became {step_loss} at step {step + 1}; lower learning_rate or max_grad_norm"
            )
        step += 1
        loss = step_loss
        run_tokens += step_tokens
        history["loss"].append(loss)
        history["train_tokens"] += step_tokens

        checkpoint_due = (
            spec.checkpoint_interval and step % spec.checkpoint_interval == 0 and step < total_steps
        )
        eval_loss = held_out_loss() if checkpoint_due or step == total_steps else None
        if eval_loss is not None:
            history["eval_loss"].append([step, eval_loss])
        elapsed = time.monotonic() - run_started
        seconds_per_step = elapsed / (step - first_step)
        report(
            Progress(
                step=step,
                total_steps=total_steps,
                loss=loss,
                learning_rate=learning_rate,
                tokens_per_second=run_tokens / max(elapsed, 1e-9),
                elapsed_seconds=elapsed,
                eta_seconds=seconds_per_step * (total_steps - step),
                eval_loss=eval_loss,
            )
        )
        if checkpoint_due:
            save(step)
            last_checkpoint_step = step

    checkpoints.save_adapter(model, output_dir)
    if base_model.source.suffix == ".gguf":
        _export_for_llama_cpp(output_dir, base_model.source)
    final_eval = history["eval_loss"][-1][1] if history["eval_loss"] else None
    delivered_eval = None
    if spec.evaluate_adapter is not None:
        # Our own adapter is saved: the model may now take the other one's weights.
        if load_adapter_weights(model, Path(spec.evaluate_adapter)):
            delivered_eval = held_out_loss()
            report(
                Log(level="info", message=f"the adapter under verification: held-out loss {delivered_eval}")
            )
        else:
            report(
                Log(level="warning", message="the adapter under verification does not fit this job's model")
            )
    completed = Completed(
        output_dir=str(output_dir),
        steps=step,
        final_loss=loss,
        eval_loss=final_eval,
        train_tokens=history["train_tokens"],
        seconds=time.monotonic() - started_at,
        delivered_eval_loss=delivered_eval,
    )
    metrics = {
        "spec": spec.model_dump(mode="json"),
        "loss": history["loss"],
        "eval_loss": history["eval_loss"],
        "train_tokens": history["train_tokens"],
        "train_examples": len(train_examples),
        "eval_examples": len(eval_examples),
    }
    (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return completed


def load_adapter_weights(model: PeftModel, directory: Path) -> bool:
    """Put another adapter's LoRA weights (peft layout, safetensors) into this model's adapter, in
    place; False, leaving the model as it was, when they are not exactly its shapes (a different rank,
    other modules, a damaged or foreign file)."""
    path = directory / "adapter_model.safetensors"
    try:
        weights = load_safetensors(path, device="cpu")
    except (OSError, ValueError, RuntimeError, SafetensorError):
        return False
    own = {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}
    # peft saves "…lora_A.weight" for the parameter "…lora_A.default.weight".
    named = {name.replace(".default.", "."): name for name in own}
    if set(weights) != set(named) or any(weights[key].shape != own[named[key]].shape for key in weights):
        return False
    if not all(torch.isfinite(tensor).all() for tensor in weights.values()):
        return False
    with torch.no_grad():
        for key, tensor in weights.items():
            own[named[key]].copy_(tensor.to(own[named[key]].dtype))
    return True


def _export_for_llama_cpp(output_dir: Path, base_gguf: Path) -> None:
    """Write the adapter as a llama.cpp LoRA file too, so its fine-tuned model can be served. A failure
    costs only that: the peft adapter, the job's result, stays good."""
    from compute_swarm.engine.gguf_adapter import AdapterExportError, export_lora_to_gguf

    try:
        export_lora_to_gguf(output_dir, base_gguf, output_dir / GGUF_ADAPTER_FILE)
    except (AdapterExportError, OSError) as error:
        logger.warning("the adapter could not be exported for llama.cpp, so it cannot be served: %s", error)


@torch.no_grad()
def compare_answers(
    spec: LoraJobSpec, adapter_dir: str | Path, prompt: str, *, device: str = "cpu", max_new_tokens: int = 48
) -> tuple[str, str]:
    """Greedy answers to one chat prompt from the base model and from the base model with the adapter,
    so a person can see what the fine-tune changed."""
    directory = models.prepared_model_directory(spec.base_model)
    tokenizer = models.load_tokenizer(directory)
    datasets.ensure_chat_template(tokenizer)
    model = PeftModel.from_pretrained(
        models.load_causal_lm(directory, dtype=choose_precision(device).weights_dtype, device=device),
        str(adapter_dir),
    )
    model.eval()
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    ).to(device)

    def answer() -> str:
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    with model.disable_adapter():
        base_answer = answer()
    return base_answer, answer()
