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
import re
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
from transformers import PreTrainedTokenizerBase

from compute_swarm.engine import artifacts, checkpoints, datasets, devices, memory, models, resources
from compute_swarm.engine.jobs import InvalidJobError, LoraJobSpec
from compute_swarm.engine.records import CheckpointSaved, Completed, Log, Progress, Record, Started
from compute_swarm.kernels.attention import backend_in_use

logger = logging.getLogger(__name__)


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


# ---- quantized bases (QLoRA): where bitsandbytes runs, how the base is loaded and prepared


class QuantizationUnavailableError(resources.InsufficientMemoryError):
    """A job asking for a quantized base, on a node where bitsandbytes cannot run, that the buyer does
    not allow to fall back to 16 bits. Refused before anything loads, as a job that does not fit is:
    another node may run it, and this one is not at fault."""


def device_backend(device: str) -> str:
    """The backend (protocol telemetry's name: cuda, rocm, mps, cpu) of a torch device string."""
    kind = device.split(":", 1)[0]
    if kind == "cuda" and torch.version.hip is not None:
        return "rocm"  # torch names ROCm GPUs "cuda"
    return kind


def quantization_problem(quantization: str, device: str) -> str | None:
    """Why bitsandbytes cannot hold a base as `quantization` (nf4, fp4, int8) on `device`; None when it
    can. Imports bitsandbytes (its own import checks its native library)."""
    backend = device_backend(device)
    if backend not in memory.QUANTIZATION_BACKENDS:
        return (
            f"the engine quantizes with bitsandbytes only on {', '.join(sorted(memory.QUANTIZATION_BACKENDS))}, "
            f"not on {backend}"
        )
    try:
        import bitsandbytes
    except ImportError:
        return "bitsandbytes is not installed (pip install 'compute-swarm[qlora]')"
    except Exception as error:  # its native library failed to load: a missing CUDA runtime, an odd CPU
        return f"bitsandbytes failed to load: {type(error).__name__}: {error}"
    version = tuple(int(part) for part in re.findall(r"\d+", bitsandbytes.__version__)[:2])
    if version < memory.MINIMUM_BITSANDBYTES:
        minimum = ".".join(map(str, memory.MINIMUM_BITSANDBYTES))
        return (
            f"bitsandbytes {bitsandbytes.__version__} is older than {minimum}, the first to run on {backend}"
        )
    if backend == "cuda":
        # bitsandbytes' PyPI builds: NF4/FP4 from compute capability 6.0 (Pascal), LLM.int8() 7.5 (Turing).
        needed = (7, 5) if quantization == "int8" else (6, 0)
        capability = torch.cuda.get_device_capability(torch.device(device))
        if capability < needed:
            return (
                f"bitsandbytes' {quantization} needs a GPU of compute capability {needed[0]}.{needed[1]} "
                f"or newer; {device} has {capability[0]}.{capability[1]}"
            )
    return None


def base_quantization_here(spec: LoraJobSpec, device: str) -> tuple[str, str | None]:
    """How this node holds the job's base on `device`: (spec.quantization, None) where bitsandbytes
    runs, ("none", why not) where it does not and the buyer allows the 16-bit fallback. Raises
    QuantizationUnavailableError, before any weight loads, where it does not and the buyer does not."""
    if spec.quantization == "none":
        return "none", None
    problem = quantization_problem(spec.quantization, device)
    if problem is None:
        return spec.quantization, None
    if spec.allow_16bit_fallback:
        return "none", problem
    estimate = _estimate(spec, device)
    available = devices.probe(check_torch=False).memory_available_bytes(device)
    raise QuantizationUnavailableError(
        f"this job asks for a {spec.quantization} base, which bitsandbytes holds, but it cannot run here: "
        f"{problem}; the buyer does not allow the 16-bit fallback (allow_16bit_fallback), so another "
        f"node must take it",
        estimate=estimate,
        available_bytes=available or 0,
        device=device,
    )


def quantization_config(quantization: str, precision: Precision) -> object:
    """transformers' BitsAndBytesConfig for a base held as `quantization` (nf4, fp4, int8): QLoRA's
    settings, stated rather than left to defaults (bitsandbytes' 4-bit default is fp4)."""
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=precision.weights_dtype,
    )


def prepare_quantized_base(model: torch.nn.Module) -> None:
    """Ready a bitsandbytes-quantized base for LoRA training, as QLoRA's reference code does
    (github.com/artidoro/qlora, qlora.py): freeze it and cast the norms and biases to fp32, leaving
    the embeddings and output head in the compute dtype. peft's prepare_model_for_kbit_training casts
    those to fp32 too: under autocast the head multiplies in 16 bits anyway, so that only adds their
    fp32 copy (2.2 GB more for Qwen2.5-7B) and a 16-bit cast of the head at every step.
    engine.memory.estimate_lora counts what this leaves."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
        if parameter.ndim == 1 and parameter.dtype in (torch.float16, torch.bfloat16):
            parameter.data = parameter.data.float()


def build_model(
    spec: LoraJobSpec, directory: Path, device: str, precision: Precision, *, quantization: str = "none"
) -> PeftModel:
    """The base, held as `quantization` says ("none", or the spec's where bitsandbytes runs: see
    base_quantization_here), with the spec's LoRA adapter on it."""
    base = models.load_causal_lm(
        directory,
        dtype=precision.weights_dtype,
        device=device,
        quantization_config=None if quantization == "none" else quantization_config(quantization, precision),
    )
    if quantization != "none":
        prepare_quantized_base(base)
    if spec.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad (the embeddings are frozen)
        # and restores the random state, so dropout is the same when a layer is recomputed.
        options = {"use_reentrant": False}
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.20's name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
        base.config.use_cache = False
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


def _estimate(spec: LoraJobSpec, device: str) -> resources.MemoryEstimate:
    # Read shapes from headers only: a GGUF not yet prepared is measured before it is dequantized.
    model = models.resolve_model(spec.base_model)
    config_file = model.directory / "config.json"
    heads = json.loads(config_file.read_text()).get("num_attention_heads") if model.is_prepared else None
    return resources.estimate_lora_memory(
        spec,
        resources.read_weight_shapes(model.directory if model.is_prepared else model.source),
        device=device,
        compute_dtype_bytes=choose_precision(device).bytes_per_weight,
        attention_heads=heads,
    )


def check_memory(spec: LoraJobSpec, device: str) -> resources.MemoryEstimate:
    """Refuse, before any weights load, a job that would not fit on the device, its base held as this
    node will hold it (base_quantization_here). Raises resources.InsufficientMemoryError naming the
    numbers, QuantizationUnavailableError (one) for a quantized base bitsandbytes cannot hold here."""
    quantization, _ = base_quantization_here(spec, device)
    if quantization != spec.quantization:
        spec = spec.model_copy(update={"quantization": quantization})
    estimate = _estimate(spec, device)
    available = devices.probe(check_torch=False).memory_available_bytes(device)
    if available is not None:
        resources.check_fits(estimate, available_bytes=available, device=device)
    return estimate


@dataclass(frozen=True)
class TrainingData:
    """A job's dataset, tokenized, split into training and held-out examples, and planned into steps."""

    train_examples: list[datasets.TokenizedExample]
    eval_examples: list[datasets.TokenizedExample]
    plan: BatchPlan
    total_steps: int
    pad_token_id: int


def prepare_data(spec: LoraJobSpec, tokenizer: PreTrainedTokenizerBase) -> TrainingData:
    """Tokenize the dataset, hold out the evaluation examples and plan the micro-batches of the run.
    Raises datasets.DatasetError for unusable data."""
    examples = datasets.tokenize_dataset(
        datasets.read_jsonl(spec.dataset), tokenizer, spec.max_sequence_length
    )
    train_examples, eval_examples = split_for_evaluation(examples, spec.eval_fraction, spec.seed)
    return TrainingData(
        train_examples=train_examples,
        eval_examples=eval_examples,
        plan=BatchPlan(train_examples, spec.batch_size, spec.seed),
        total_steps=total_optimizer_steps(spec, len(train_examples)),
        pad_token_id=tokenizer.pad_token_id,
    )


class TrainingRun:
    """The adapter being trained, its optimizer and its history, from the first (or a resumed) step
    to the last; it reports what it does through `report`."""

    def __init__(
        self,
        spec: LoraJobSpec,
        data: TrainingData,
        model: PeftModel,
        *,
        identity: dict[str, Any],
        output_dir: Path,
        device: str,
        precision: Precision,
        report: Callable[[Record], None],
    ):
        self.spec = spec
        self.data = data
        self.model = model
        self.identity = identity  # what a checkpoint of this run must match to be resumed
        self.output_dir = output_dir
        self.device = device
        self.precision = precision
        self.report = report
        self.model.train()
        self.parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.parameters, lr=spec.learning_rate, weight_decay=spec.weight_decay
        )
        self.scaler = torch.amp.GradScaler(device.split(":")[0]) if precision.loss_scaling else None
        self.step = 0
        self.history: dict[str, Any] = {"loss": [], "eval_loss": [], "train_tokens": 0}

    @property
    def final_loss(self) -> float | None:
        return self.history["loss"][-1] if self.history["loss"] else None

    @property
    def final_eval_loss(self) -> float | None:
        return self.history["eval_loss"][-1][1] if self.history["eval_loss"] else None

    def resume(self, resume_from: str | Path) -> None:
        """Restore a checkpoint: `resume_from` is its directory, or "latest" for the newest one in the
        output directory (none yet: start from step 0). Raises checkpoints.CheckpointError."""
        path = (
            checkpoints.latest_checkpoint(self.output_dir)
            if str(resume_from) == "latest"
            else Path(resume_from)
        )
        if path is None:
            logger.warning("no checkpoint in %s yet: starting from step 0", self.output_dir)
            return
        state = checkpoints.load_checkpoint(
            path, identity=self.identity, device=self.device, model=self.model, optimizer=self.optimizer
        )
        self.step, self.history = state.step, state.metrics
        if self.scaler is not None and state.scaler:
            self.scaler.load_state_dict(state.scaler)

    def report_started(self) -> None:
        self.report(
            Started(
                process_id=os.getpid(),
                device=self.device,
                total_steps=self.data.total_steps,
                resumed_from_step=self.step,
                train_examples=len(self.data.train_examples),
                eval_examples=len(self.data.eval_examples),
                attention=backend_in_use(self.model.config._attn_implementation, self.device),
            )
        )

    def train(self, should_stop: Callable[[], bool]) -> None:
        """Take the remaining optimizer steps, evaluating and checkpointing on the spec's interval and
        reporting each step. Raises TrainingCancelled (after saving a checkpoint) once should_stop()."""
        total_steps = self.data.total_steps
        run_tokens, run_started, first_step = 0, time.monotonic(), self.step
        last_checkpoint_step = self.step
        while self.step < total_steps:
            if should_stop():
                raise TrainingCancelled(
                    self.save_checkpoint()
                    if self.step > last_checkpoint_step
                    else checkpoints.latest_checkpoint(self.output_dir)
                )
            learning_rate = learning_rate_at(self.step, self.spec, total_steps)
            loss, tokens = self._optimizer_step(learning_rate)
            self.step += 1
            run_tokens += tokens
            self.history["loss"].append(loss)
            self.history["train_tokens"] += tokens

            checkpoint_due = (
                bool(self.spec.checkpoint_interval)
                and self.step % self.spec.checkpoint_interval == 0
                and self.step < total_steps
            )
            eval_loss = self.held_out_loss() if checkpoint_due or self.step == total_steps else None
            if eval_loss is not None:
                self.history["eval_loss"].append([self.step, eval_loss])
            elapsed = time.monotonic() - run_started
            seconds_per_step = elapsed / (self.step - first_step)
            self.report(
                Progress(
                    step=self.step,
                    total_steps=total_steps,
                    loss=loss,
                    learning_rate=learning_rate,
                    tokens_per_second=run_tokens / max(elapsed, 1e-9),
                    elapsed_seconds=elapsed,
                    eta_seconds=seconds_per_step * (total_steps - self.step),
                    eval_loss=eval_loss,
                )
            )
            if checkpoint_due:
                self.save_checkpoint()
                last_checkpoint_step = self.step

    def _optimizer_step(self, learning_rate: float) -> tuple[float, int]:
        """One optimizer step over the step's micro-batches; its mean loss per answer token, and the
        tokens it read. Raises FloatingPointError when the loss is no longer finite."""
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        accumulation = self.spec.gradient_accumulation_steps
        batches = [
            collate(
                self.data.plan.micro_batch(self.step * accumulation + index),
                self.data.pad_token_id,
                self.device,
            )
            for index in range(accumulation)
        ]
        # Normalise by the answer tokens of the whole step, so accumulation equals one large batch.
        step_label_count = max(1, sum(predicted_label_count(batch) for batch in batches))
        step_loss, step_tokens = 0.0, 0
        for batch in batches:
            micro_loss = answer_loss_sum(self.model, batch, self.precision) / step_label_count
            (self.scaler.scale(micro_loss) if self.scaler else micro_loss).backward()
            step_loss += micro_loss.item()
            step_tokens += int(batch["attention_mask"].sum())
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.parameters, self.spec.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(step_loss):
            raise FloatingPointError(
                f"the loss became {step_loss} at step {self.step + 1}; lower learning_rate or max_grad_norm"
            )
        return step_loss, step_tokens

    def held_out_loss(self) -> float | None:
        return evaluate(
            self.model,
            self.data.eval_examples,
            batch_size=self.spec.batch_size,
            pad_token_id=self.data.pad_token_id,
            device=self.device,
            precision=self.precision,
        )

    def save_checkpoint(self) -> Path:
        state = checkpoints.TrainerState(
            self.step, self.scaler.state_dict() if self.scaler else None, self.history
        )
        path = checkpoints.save_checkpoint(
            self.output_dir,
            spec=self.spec,
            identity=self.identity,
            device=self.device,
            model=self.model,
            optimizer=self.optimizer,
            state=state,
        )
        self.report(CheckpointSaved(step=self.step, path=str(path)))
        return path

    def evaluate_other_adapter(self, directory: Path) -> float | None:
        """The held-out loss of another adapter for this job (the one under verification); None when it
        does not fit this job's model. The model keeps that adapter's weights: save this run's first."""
        if not load_adapter_weights(self.model, directory):
            self.report(
                Log(level="warning", message="the adapter under verification does not fit this job's model")
            )
            return None
        loss = self.held_out_loss()
        self.report(Log(level="info", message=f"the adapter under verification: held-out loss {loss}"))
        return loss


def save_trained_adapter(model: PeftModel, output_dir: Path, base_gguf: Path | None) -> None:
    """The job's adapter in peft's layout, and for llama.cpp too when the base model has a GGUF (the
    file trained from, or the one beside a directory's safetensors: models.ResolvedModel.gguf)."""
    checkpoints.save_adapter(model, output_dir)
    if base_gguf is not None:
        _export_for_llama_cpp(output_dir, base_gguf)


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
    TrainingCancelled when should_stop() turned true (after saving a checkpoint),
    QuantizationUnavailableError (before loading anything) for a quantized base bitsandbytes cannot
    hold here without the buyer's leave to fall back.
    """
    started_at = time.monotonic()
    precision = choose_precision(device)
    quantization, fallback_reason = base_quantization_here(spec, device)
    if fallback_reason is not None:
        held_as = str(precision.weights_dtype).removeprefix("torch.")
        report(
            Log(
                level="warning",
                message=f"the job asks for a {spec.quantization} base but bitsandbytes cannot run here "
                f"({fallback_reason}): training with the base unquantized, in {held_as}, as the buyer allows",
            )
        )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(spec.seed)

    base_model = models.resolve_model(spec.base_model)
    data = prepare_data(spec, models.load_tokenizer(base_model.prepare()))
    # The adapter's initial weights come from the generator seed_everything seeded.
    model = build_model(spec, base_model.directory, device, precision, quantization=quantization)
    identity = checkpoints.job_identity(
        spec,
        model_fingerprint=base_model.fingerprint,
        dataset_sha256=models.sha256_of_file(Path(spec.dataset)),
    )
    run = TrainingRun(
        spec,
        data,
        model,
        identity=identity,
        output_dir=output_dir,
        device=device,
        precision=precision,
        report=report,
    )
    if resume_from is not None:
        run.resume(resume_from)
    run.report_started()
    run.train(should_stop)

    save_trained_adapter(run.model, output_dir, base_model.gguf)
    delivered_eval_loss = (
        run.evaluate_other_adapter(Path(spec.evaluate_adapter)) if spec.evaluate_adapter is not None else None
    )
    completed = Completed(
        output_dir=str(output_dir),
        steps=run.step,
        final_loss=run.final_loss,
        eval_loss=run.final_eval_loss,
        train_tokens=run.history["train_tokens"],
        seconds=time.monotonic() - started_at,
        delivered_eval_loss=delivered_eval_loss,
    )
    artifacts.write_training_metrics(
        output_dir,
        spec,
        run.history,
        train_examples=len(data.train_examples),
        eval_examples=len(data.eval_examples),
    )
    return completed


def load_adapter_weights(model: PeftModel, directory: Path) -> bool:
    """Put another adapter's LoRA weights (peft layout, safetensors) into this model's adapter, in
    place; False, leaving the model as it was, when they are not exactly its shapes (a different rank,
    other modules, a damaged or foreign file)."""
    path = directory / artifacts.ADAPTER_WEIGHTS_FILE
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
        export_lora_to_gguf(output_dir, base_gguf, output_dir / artifacts.GGUF_ADAPTER_FILE)
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
