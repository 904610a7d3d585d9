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

# Quantized bases (QLoRA), as bitsandbytes stores them. Only the linear projections inside the decoder
# layers are quantized: transformers leaves the embeddings (nn.Embedding) and the output head
# (llm_int8_skip_modules defaults to it) in 16 bits, and so do norms and biases.
QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
FOUR_BIT_QUANTIZATIONS = frozenset({"nf4", "fp4"})
# The backends (protocol telemetry's names) where the engine quantizes a base with bitsandbytes
# (>= MINIMUM_BITSANDBYTES, checked on the node by engine.lora.quantization_problem):
# cuda: bitsandbytes' home; NF4/FP4 need compute capability 6.0, LLM.int8() 7.5.
# rocm: official in the PyPI wheels since 0.50 (they ship libbitsandbytes_rocm64...72); not tested
#   here, and the node refuses, with its reason, where bitsandbytes fails to load.
# cpu: its CPU backend quantizes and trains 4-bit and 8-bit LoRA (tested with 0.50.2 and torch
#   2.13+cpu, tests/engine/test_qlora.py); slow, but the scheduler tries GPUs first.
# Not mps: bitsandbytes' Apple backend is new (0.50), runs pure-PyTorch fallbacks before macOS 26 and
#   is untested here; no wheel exists for Intel Macs at all.
QUANTIZATION_BACKENDS: frozenset[str] = frozenset({"cuda", "rocm", "cpu"})
MINIMUM_BITSANDBYTES = (0, 50)
# Modules that stay unquantized: embeddings and output heads, as transformers, GPT-2 and GGUF name them.
EMBEDDING_MODULES = frozenset({"embed_tokens", "lm_head", "wte", "token_embd", "output"})
# bitsandbytes' 4-bit blocks: one absmax constant per 64 weights. With double quantization (which the
# engine always turns on, as QLoRA does) each block's fp32 absmax is itself quantized to one byte, with
# one fp32 constant per 256 blocks: 8/64 + 32/(64·256) = 0.127 bits a weight (Dettmers et al. 2023,
# "QLoRA", §3), against 32/64 = 0.5 bits without.
FOUR_BIT_BLOCK_SIZE = 64
DOUBLE_QUANTIZATION_BLOCK_SIZE = 256


def base_quantization(quantization: str, allow_16bit_fallback: bool, backend: str) -> str | None:
    """How a job asking for `quantization` holds its base on `backend` (cuda, rocm, mps, cpu): as
    asked where bitsandbytes runs (QUANTIZATION_BACKENDS) or where nothing is asked, "none" elsewhere
    when the buyer allows the fallback, and None where it cannot run at all."""
    if quantization == "none" or backend in QUANTIZATION_BACKENDS:
        return quantization
    return "none" if allow_16bit_fallback else None


def quantized_weight_bytes(quantization: str, out_features: int, in_features: int) -> int:
    """Bytes bitsandbytes holds for one (out_features × in_features) linear weight quantized as
    `quantization` ("nf4", "fp4": two weights a byte plus the double-quantized block constants;
    "int8": LLM.int8()'s byte a weight plus one fp32 scale per output row)."""
    count = out_features * in_features
    if quantization in FOUR_BIT_QUANTIZATIONS:
        blocks = -(-count // FOUR_BIT_BLOCK_SIZE)
        return -(-count // 2) + blocks + 4 * -(-blocks // DOUBLE_QUANTIZATION_BLOCK_SIZE)
    if quantization == "int8":
        return count + 4 * out_features
    raise ResourceError(f"unknown quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")


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


# Graphics cards as sellers have them, in GB of VRAM (an "N GB" card reports N GiB: an RTX 3060 12 GB
# shows 12288 MiB), less what the desktop itself holds of one (compositor, browser, the game launcher).
CARD_SIZES_GB = (8, 12, 16, 24, 48, 80)
DESKTOP_BYTES = GIB


def smallest_card_gb(needed_free_bytes: int) -> int | None:
    """The smallest common card whose free memory (its size less DESKTOP_BYTES) is at least
    `needed_free_bytes` (a figure from free_bytes_needed); None when not even the largest has it."""
    return next((card for card in CARD_SIZES_GB if needed_free_bytes <= card * GIB - DESKTOP_BYTES), None)


def reference_lora_spec(quantization: str, base_model: str = "reference") -> LoraJobSpec:
    """The job the catalogue quotes each model's memory for: rank 16 on q/k/v/o, batch 1 × 512 tokens,
    gradient checkpointing on (QLoRA's settings, and what a buyer sets to fit a gaming card)."""
    from compute_swarm.engine.jobs import LoraJobSpec

    return LoraJobSpec(
        base_model=base_model,
        dataset="reference.jsonl",
        max_steps=1,
        rank=16,
        batch_size=1,
        max_sequence_length=512,
        gradient_checkpointing=True,
        quantization=quantization,
    )


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

    def __hash__(self) -> int:
        # Frozen, so usable as a key (the coordinator remembers estimates by shape), though its weights
        # come as a mapping, which Python does not hash.
        return hash(
            (self.parameters, self.layer_count, self.hidden_size, self.intermediate_size,
             self.vocabulary_size, self.attention_heads, tuple(sorted(self.linear_weights.items())))
        )  # fmt: skip


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
    head_dimension: int | None = None,
    attention_bias: bool = False,
    norms_per_layer: int = 2,
) -> ModelShape:
    """The shape of a Llama-style decoder (RMSNorm, SwiGLU MLP) from its config.json numbers, with the
    module names transformers gives it.

    head_dimension: config.json's head_dim where it is not hidden_size / heads (Gemma 2: 256).
    attention_bias: q_proj, k_proj and v_proj carry biases (Qwen2: counted in `parameters`; only 2-D
    weights are linear_weights). norms_per_layer: 2 (Llama, Qwen, Mistral), 4 (Gemma 2's pre- and
    post-norms around attention and MLP).
    """
    if head_dimension is None:
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
    norm_parameters = (norms_per_layer * layer_count + 1) * hidden_size  # and one after the last layer
    bias_parameters = layer_count * (query_width + 2 * key_value_projection_width) if attention_bias else 0
    return ModelShape(
        parameters=norm_parameters
        + bias_parameters
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


# Popular 0.5-8B bases from their config.json on the Hugging Face hub, with the parameter count each
# model card publishes (tests/engine/test_memory.py checks decoder_shape gives exactly that). What a
# QLoRA job on each needs: bench/model_memory.py.
PUBLISHED_SHAPES: dict[str, tuple[ModelShape, int]] = {
    name: (decoder_shape(**config), published)
    for name, config, published in [
        ("Qwen2.5-0.5B", dict(layer_count=24, hidden_size=896, intermediate_size=4864, attention_heads=14,
            key_value_heads=2, vocabulary_size=151_936, tied_embeddings=True, attention_bias=True), 494_032_768),
        ("Qwen2.5-1.5B", dict(layer_count=28, hidden_size=1536, intermediate_size=8960, attention_heads=12,
            key_value_heads=2, vocabulary_size=151_936, tied_embeddings=True, attention_bias=True), 1_543_714_304),
        ("Qwen2.5-3B", dict(layer_count=36, hidden_size=2048, intermediate_size=11008, attention_heads=16,
            key_value_heads=2, vocabulary_size=151_936, tied_embeddings=True, attention_bias=True), 3_085_938_688),
        ("Qwen2.5-7B", dict(layer_count=28, hidden_size=3584, intermediate_size=18944, attention_heads=28,
            key_value_heads=4, vocabulary_size=152_064, tied_embeddings=False, attention_bias=True), 7_615_616_512),
        ("Llama-3.2-1B", dict(layer_count=16, hidden_size=2048, intermediate_size=8192, attention_heads=32,
            key_value_heads=8, vocabulary_size=128_256, tied_embeddings=True), 1_235_814_400),
        ("Llama-3.2-3B", dict(layer_count=28, hidden_size=3072, intermediate_size=8192, attention_heads=24,
            key_value_heads=8, vocabulary_size=128_256, tied_embeddings=True), 3_212_749_824),
        ("Llama-3.1-8B", dict(layer_count=32, hidden_size=4096, intermediate_size=14336, attention_heads=32,
            key_value_heads=8, vocabulary_size=128_256, tied_embeddings=False), 8_030_261_248),
        ("Mistral-7B-v0.3", dict(layer_count=32, hidden_size=4096, intermediate_size=14336, attention_heads=32,
            key_value_heads=8, vocabulary_size=32_768, tied_embeddings=False), 7_248_023_552),
        ("gemma-2-2b", dict(layer_count=26, hidden_size=2304, intermediate_size=9216, attention_heads=8,
            key_value_heads=4, vocabulary_size=256_000, tied_embeddings=True, head_dimension=256,
            norms_per_layer=4), 2_614_341_888),
        ("TinyLlama-1.1B", dict(layer_count=22, hidden_size=2048, intermediate_size=5632, attention_heads=32,
            key_value_heads=4, vocabulary_size=32_000, tied_embeddings=False), 1_100_048_384),
    ]
}  # fmt: skip


def catalogue_shape(model: CatalogueModel) -> ModelShape:
    """The recorded shape of a catalogue model: its own `shape` where it has one (models ops add),
    else the one CATALOGUE_SHAPES records under its name. Raises ResourceError when none is recorded
    for it, or the one recorded under its name has another parameter count (it describes another
    model)."""
    own_shape = getattr(model, "shape", None)
    if own_shape is not None:
        return own_shape
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
    # A quantized base: the one weight at a time bitsandbytes dequantizes to multiply by it.
    dequantized_bytes: int = 0
    quantization: str = "none"  # how the base is held: "none" (the compute dtype), "nf4", "fp4", "int8"

    @property
    def total_bytes(self) -> int:
        return (
            self.weights_bytes
            + self.dequantized_bytes
            + self.adapter_bytes
            + self.activation_bytes
            + self.overhead_bytes
        )

    def breakdown(self) -> str:
        weights = f"weights {format_bytes(self.weights_bytes)}"
        if self.quantization != "none":
            weights = (
                f"{self.quantization} weights {format_bytes(self.weights_bytes)}, "
                f"dequantized {format_bytes(self.dequantized_bytes)}"
            )
        return (
            f"{weights}, "
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
    on a device of `device_kind` (a key of OVERHEAD_BYTES_BY_DEVICE_KIND), its base held as
    spec.quantization says (a node that falls back to 16 bits estimates a copy of the spec with
    quantization "none"; see base_quantization) and with spec.gradient_checkpointing.

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
    quantization = spec.quantization
    if quantization not in QUANTIZATIONS:
        raise ResourceError(
            f"unknown quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}"
        )
    quantized = quantization != "none"

    # LoRA adds A (rank × in) and B (out × rank) beside every targeted weight W (out × in).
    targeted_modules = set(spec.target_modules)
    targeted = [weight for module in targeted_modules for weight in shape.linear_weights.get(module, ())]
    if not targeted:
        raise ResourceError(
            f"target modules {spec.target_modules!r} match no weight in this model; "
            f"it has {', '.join(sorted(shape.linear_weights)) or 'no 2-D weights'}"
        )
    lora_parameters = sum(spec.rank * (in_features + out_features) for out_features, in_features in targeted)

    # The base's weights. Unquantized, every parameter is held in the compute dtype. Quantized, the
    # layers' linear weights are held as bitsandbytes stores them; the embeddings and output head stay
    # in the compute dtype, and the norms and biases are cast to fp32 (engine.lora's preparation does
    # what QLoRA's reference code does: peft's prepare_model_for_kbit_training would also cast the
    # embeddings and head to fp32, 4.4 GB instead of 2.2 for Qwen2.5-7B's untied 152k vocabulary).
    layer_linears = [
        weight
        for module, weights in shape.linear_weights.items()
        if module not in EMBEDDING_MODULES
        for weight in weights
    ]
    dequantized_bytes = 0
    if quantized:
        embedding_parameters = sum(
            math.prod(weight)
            for module in EMBEDDING_MODULES
            for weight in shape.linear_weights.get(module, ())
        )
        layer_linear_parameters = sum(math.prod(weight) for weight in layer_linears)
        vector_parameters = max(0, shape.parameters - embedding_parameters - layer_linear_parameters)
        weights_bytes = (
            sum(quantized_weight_bytes(quantization, *weight) for weight in layer_linears)
            + embedding_parameters * dtype_bytes
            + vector_parameters * 4
        )
        # bitsandbytes multiplies by a weight dequantized into the compute dtype (forward, and again
        # for the input's gradient), one weight at a time: the largest one's copy is the peak.
        dequantized_bytes = max((math.prod(weight) for weight in layer_linears), default=0) * dtype_bytes
    else:
        weights_bytes = shape.parameters * dtype_bytes

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
    one_layer_bytes = per_layer_16bit_bytes * dtype_bytes // 2
    if quantized and dtype_bytes < 4:
        # Norm weights cast to fp32 make the two norms' outputs fp32: 2 bytes more an element each.
        one_layer_bytes += 2 * tokens * hidden_size * 2
    # peft's LoRA branch keeps rank-wide A·x, and with dropout > 0 also the dropped-out copy of x and
    # its one-byte mask, for every targeted weight.
    dropout_bytes_per_input = dtype_bytes + 1 if spec.dropout > 0 else 0

    def adapter_activations(weights: Iterable[tuple[int, int]]) -> int:
        return tokens * sum(
            spec.rank * dtype_bytes + in_features * dropout_bytes_per_input for _, in_features in weights
        )

    in_layer_adapter_bytes = adapter_activations(
        weight
        for module in targeted_modules - EMBEDDING_MODULES
        for weight in shape.linear_weights.get(module, ())
    )
    outside_adapter_bytes = adapter_activations(
        weight
        for module in targeted_modules & EMBEDDING_MODULES
        for weight in shape.linear_weights.get(module, ())
    )
    if spec.gradient_checkpointing:
        # Full recomputation (Chen et al. 2016; Korthikanti et al. 2022 §2 and §5: "2sbhL" at 16
        # bits): a decoder layer keeps only its input, s·b·h in the compute dtype, and the backward
        # pass recomputes one layer at a time, holding that layer's full activations (LoRA's
        # included) while it runs back through it.
        layer_bytes = shape.layer_count * tokens * hidden_size * dtype_bytes + one_layer_bytes
        layer_bytes += -(-in_layer_adapter_bytes // shape.layer_count)
    else:
        layer_bytes = shape.layer_count * one_layer_bytes + in_layer_adapter_bytes
    # The embedding output entering layer 0 and the final norm's output.
    residual_bytes = 2 * tokens * hidden_size * dtype_bytes
    # The logits dominate small models with large vocabularies: transformers' causal-LM loss upcasts
    # them to fp32, so one token holds vocab × 4 bytes three times (logits, log-softmax, their
    # gradient), plus the 16-bit logits they were upcast from.
    logits_bytes_per_entry = 3 * 4 + (dtype_bytes if dtype_bytes < 4 else 0)
    logits_bytes = tokens * shape.vocabulary_size * logits_bytes_per_entry

    return MemoryEstimate(
        weights_bytes=weights_bytes,
        adapter_bytes=lora_parameters * ADAPTER_BYTES_PER_PARAMETER,
        activation_bytes=layer_bytes + outside_adapter_bytes + residual_bytes + logits_bytes,
        overhead_bytes=OVERHEAD_BYTES_BY_DEVICE_KIND[device_kind],
        lora_parameters=lora_parameters,
        model_parameters=shape.parameters,
        dequantized_bytes=dequantized_bytes,
        quantization=quantization,
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
