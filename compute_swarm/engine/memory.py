"""Memory a LoRA fine-tune or a served model needs, worked out from the job and the model's shape. The
coordinator uses it to choose a node that can take a job, and the node uses it to refuse a job that
will not fit: the same arithmetic on the same shape, so the two agree.

This is only arithmetic: it imports no torch and reads no files, so the coordinator can use it.
engine.resources reads a model's shape from its weight files; CATALOGUE_SHAPES records the catalogue's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from compute_swarm.engine.jobs import CatalogueModel, LoraJobSpec

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

# A job may plan on this fraction of the free memory it is given. The estimate leaves out allocator
# fragmentation, temporaries of the backward pass and whatever else starts on the machine meanwhile;
# a 10% reserve turns most of those into a slower job instead of an out-of-memory crash.
USABLE_PERCENT = 90

# Memory a training process holds before its first weight, by device kind (the part before ':').
# cuda (torch also names ROCm GPUs so): the CUDA context (300-500 MiB on recent drivers, even with
# lazy module loading) plus cuBLAS workspaces and the caching allocator's rounding.
# cpu: the resident interpreter with torch, transformers and peft imported (340 MiB RSS measured
# with torch 2.13 and transformers 5 on Linux).
# mps/xpu: the runtime libraries plus the driver's context; Apple's memory is shared with the CPU
# side, so the interpreter's share is counted too.
OVERHEAD_BYTES_BY_DEVICE_KIND: dict[str, int] = {
    "cuda": 500 * MIB,
    "cpu": 400 * MIB,
    "mps": 500 * MIB,
    "xpu": 500 * MIB,
}

# Each LoRA parameter is fp32 and carries its gradient and AdamW's two moments: 4 tensors × 4 bytes.
ADAPTER_BYTES_PER_PARAMETER = 16

# llama.cpp's compute buffers beside the weights and the cache (tens of MiB for small models).
INFERENCE_COMPUTE_BYTES = 64 * MIB
# The context a node serves a model with unless its owner sets another, and so the KV cache the
# coordinator allows for (engine.inference serves with it).
DEFAULT_CONTEXT_TOKENS = 4096


class ResourceError(ValueError):
    """A model whose size cannot be read, or a job whose memory cannot be estimated."""


def format_bytes(count: int) -> str:
    """A byte count for people: '3.2 GiB', '40 MiB', '1.5 MiB', '12 KiB', '100 bytes'."""
    if count >= GIB:
        return f"{count / GIB:.1f} GiB"
    if count >= 10 * MIB:
        return f"{count / MIB:.0f} MiB"
    if count >= MIB:
        return f"{count / MIB:.1f} MiB"
    if count >= KIB:
        return f"{count / KIB:.0f} KiB"
    return f"{count} bytes"


# The headroom, both ways round -----------------------------------------------------------------------


def usable_bytes(free_bytes: int) -> int:
    """The share of `free_bytes` a job may plan on (USABLE_PERCENT)."""
    return free_bytes * USABLE_PERCENT // 100


def free_bytes_needed(held_bytes: int) -> int:
    """The least free memory whose usable share holds `held_bytes`: usable_bytes(free) >= held
    exactly when free >= free_bytes_needed(held)."""
    return -(-held_bytes * 100 // USABLE_PERCENT)


# Shapes ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer as the estimates see it."""

    parameters: int
    layer_count: int
    hidden_size: int
    intermediate_size: int  # the MLP's inner width
    vocabulary_size: int
    attention_heads: int
    # Every 2-D weight (what LoRA can adapt) by module name ("q_proj", "embed_tokens"), each as
    # (out_features, in_features), torch's order: a layer's projections appear once per layer.
    linear_weights: Mapping[str, tuple[tuple[int, int], ...]]

    @property
    def key_value_width(self) -> int:
        return key_value_width(self.linear_weights)


def key_value_width(linear_weights: Mapping[str, Iterable[tuple[int, int]]]) -> int:
    """Elements one token adds to the KV cache: the k_proj and v_proj widths of every layer, from 2-D
    weights by module name as (out_features, in_features)."""
    return sum(
        out_features for module in ("k_proj", "v_proj") for out_features, _ in linear_weights.get(module, ())
    )


def decoder_shape(
    *,
    layer_count: int,
    hidden_size: int,
    intermediate_size: int,
    attention_heads: int,
    key_value_heads: int,
    vocabulary_size: int,
    tied_embeddings: bool,
) -> ModelShape:
    """The shape of a Llama-style decoder (RMSNorm, SwiGLU MLP, no biases) from its config.json
    numbers, with the module names transformers gives it."""
    head_dimension = hidden_size // attention_heads
    query_width = attention_heads * head_dimension
    key_value_projection_width = key_value_heads * head_dimension
    per_layer = {
        "q_proj": (query_width, hidden_size),
        "k_proj": (key_value_projection_width, hidden_size),
        "v_proj": (key_value_projection_width, hidden_size),
        "o_proj": (hidden_size, query_width),
        "gate_proj": (intermediate_size, hidden_size),
        "up_proj": (intermediate_size, hidden_size),
        "down_proj": (hidden_size, intermediate_size),
    }
    linear_weights = {"embed_tokens": ((vocabulary_size, hidden_size),)}
    if not tied_embeddings:
        linear_weights["lm_head"] = ((vocabulary_size, hidden_size),)
    linear_weights |= {module: (shape,) * layer_count for module, shape in per_layer.items()}
    norm_parameters = (2 * layer_count + 1) * hidden_size  # two a layer, one after the last
    return ModelShape(
        parameters=norm_parameters
        + sum(math.prod(shape) for shapes in linear_weights.values() for shape in shapes),
        layer_count=layer_count,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        vocabulary_size=vocabulary_size,
        attention_heads=attention_heads,
        linear_weights=linear_weights,
    )


# The catalogue's models, by name, as their config.json describes them. The coordinator can only see
# the catalogue, not the weight files, so it estimates from these. The node reads the same shape from
# the files (tests/engine/test_memory.py checks that they match), so both get the same figure.
CATALOGUE_SHAPES: dict[str, ModelShape] = {
    "smollm2-135m-instruct": decoder_shape(
        layer_count=30,
        hidden_size=576,
        intermediate_size=1536,
        attention_heads=9,
        key_value_heads=3,
        vocabulary_size=49_152,
        tied_embeddings=True,
    ),
}


def catalogue_shape(model: CatalogueModel) -> ModelShape:
    """The recorded shape of a catalogue model. Raises ResourceError when none is recorded for it,
    or the one recorded under its name has another parameter count (it describes another model)."""
    shape = CATALOGUE_SHAPES.get(model.name)
    if shape is None or shape.parameters != model.parameters:
        raise ResourceError(
            f"no shape is recorded for model {model.name!r} with {model.parameters:,} parameters: "
            "add its config.json numbers to engine.memory.CATALOGUE_SHAPES"
        )
    return shape


# Estimates -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    """What a LoRA fine-tune will hold on its device at its peak, in bytes."""

    weights_bytes: int
    adapter_bytes: int
    activation_bytes: int
    overhead_bytes: int
    lora_parameters: int
    model_parameters: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.adapter_bytes + self.activation_bytes + self.overhead_bytes

    def breakdown(self) -> str:
        return (
            f"weights {format_bytes(self.weights_bytes)}, "
            f"LoRA + optimizer {format_bytes(self.adapter_bytes)}, "
            f"activations {format_bytes(self.activation_bytes)}, "
            f"overhead {format_bytes(self.overhead_bytes)}"
        )

    def describe(self) -> str:
        """One line for people, e.g. 'about 3.2 GiB (weights 1.1 GiB, ...; 134,515,008 model parameters,
        921,600 LoRA parameters)'."""
        return (
            f"about {format_bytes(self.total_bytes)} ({self.breakdown()}; "
            f"{self.model_parameters:,} model parameters, {self.lora_parameters:,} LoRA parameters)"
        )


def estimate_lora(
    spec: LoraJobSpec, shape: ModelShape, *, device_kind: str, compute_dtype_bytes: int
) -> MemoryEstimate:
    """The peak memory of one training micro-batch (batch_size × max_sequence_length tokens) of `spec`
    on a device of `device_kind` (a key of OVERHEAD_BYTES_BY_DEVICE_KIND).

    compute_dtype_bytes is the size of the dtype weights and activations are held in: 4 for fp32
    (the CPU and MPS), 2 for bf16/fp16 (CUDA and ROCm). Gradient accumulation does not change the
    peak: the micro-batches run one after another. Raises ResourceError when no weight matches the
    spec's target_modules.
    """
    if compute_dtype_bytes not in (2, 4):
        raise ResourceError(
            f"compute_dtype_bytes must be 2 (bf16/fp16) or 4 (fp32), not {compute_dtype_bytes}"
        )
    if device_kind not in OVERHEAD_BYTES_BY_DEVICE_KIND:
        raise ResourceError(
            f"unknown device kind {device_kind!r}: expected one of {', '.join(OVERHEAD_BYTES_BY_DEVICE_KIND)}"
        )
    dtype_bytes = compute_dtype_bytes

    # LoRA adds A (rank × in) and B (out × rank) beside every targeted weight W (out × in).
    targeted = [
        weight for module in set(spec.target_modules) for weight in shape.linear_weights.get(module, ())
    ]
    if not targeted:
        raise ResourceError(
            f"target modules {spec.target_modules!r} match no weight in this model; "
            f"it has {', '.join(sorted(shape.linear_weights)) or 'no 2-D weights'}"
        )
    lora_parameters = sum(spec.rank * (in_features + out_features) for out_features, in_features in targeted)

    hidden_size, intermediate_size = shape.hidden_size, shape.intermediate_size
    sequence_length = spec.max_sequence_length
    tokens = spec.batch_size * sequence_length

    # Activations kept for the backward pass. LoRA freezes W, but the gradient must still flow back
    # through every layer to the adapters below it, so a layer keeps nearly what full training keeps.
    # Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", §4.1
    # eq. (1): a layer keeps s·b·h·(34 + 5·a·s/h) bytes with 16-bit activations (s sequence, b batch,
    # h hidden, a heads): 11sbh attention inputs, 4sbh for the two norms, 19sbh for a 4h GeLU MLP, and
    # 5as²b for the attention scores (softmax output 2, its dropout mask 1, dropout output 2).
    # Llama's SwiGLU MLP keeps its input (2sbh) and four intermediate-wide tensors instead: gate,
    # silu(gate), up and their product (8sbI). Byte counts scale with the dtype from the 16-bit ones.
    # Fused attention kernels (flash, SDPA) never store the 5as²b scores; counting them anyway keeps
    # the estimate safe on back-ends that do (eager attention, CPU math paths).
    # Checked against one real step (transformers 5 + peft, SmolLM2-135M, fp32 on CPU, eager, rank 8
    # on q/k/v/o): batch × sequence 1 × 256, 2 × 256, 4 × 512 peaked at 1.5, 2.55, 7.8 GiB RSS; this
    # estimate says 1.6, 2.3, 7.9 GiB, and the USABLE_PERCENT reserve absorbs the difference.
    per_layer_16bit_bytes = tokens * (
        11 * hidden_size + 4 * hidden_size + 2 * hidden_size + 8 * intermediate_size
    )
    per_layer_16bit_bytes += 5 * shape.attention_heads * tokens * sequence_length
    layer_bytes = shape.layer_count * per_layer_16bit_bytes * dtype_bytes // 2
    # peft's LoRA branch keeps rank-wide A·x, and with dropout > 0 also the dropped-out copy of x and
    # its one-byte mask, for every targeted weight.
    dropout_bytes_per_input = dtype_bytes + 1 if spec.dropout > 0 else 0
    adapter_activation_bytes = tokens * sum(
        spec.rank * dtype_bytes + in_features * dropout_bytes_per_input for _, in_features in targeted
    )
    # The embedding output entering layer 0 and the final norm's output.
    residual_bytes = 2 * tokens * hidden_size * dtype_bytes
    # The logits dominate small models with large vocabularies: transformers' causal-LM loss upcasts
    # them to fp32, so one token holds vocab × 4 bytes three times (logits, log-softmax, their
    # gradient), plus the 16-bit logits they were upcast from.
    logits_bytes_per_entry = 3 * 4 + (dtype_bytes if dtype_bytes < 4 else 0)
    logits_bytes = tokens * shape.vocabulary_size * logits_bytes_per_entry

    return MemoryEstimate(
        weights_bytes=shape.parameters * dtype_bytes,
        adapter_bytes=lora_parameters * ADAPTER_BYTES_PER_PARAMETER,
        activation_bytes=layer_bytes + adapter_activation_bytes + residual_bytes + logits_bytes,
        overhead_bytes=OVERHEAD_BYTES_BY_DEVICE_KIND[device_kind],
        lora_parameters=lora_parameters,
        model_parameters=shape.parameters,
    )


def estimate_inference(
    *,
    model_file_bytes: int,
    adapter_file_bytes: int,
    key_value_width: int,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
) -> int:
    """Bytes llama.cpp holds to serve a GGUF model: its file (weights are used as stored, quantized),
    the adapter file, the KV cache of `context_tokens` in f16 (key_value_width elements a token, see
    ModelShape.key_value_width) and compute buffers."""
    return (
        model_file_bytes + adapter_file_bytes + 2 * context_tokens * key_value_width + INFERENCE_COMPUTE_BYTES
    )
