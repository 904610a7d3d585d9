"""Memory a LoRA fine-tune (or a model served for inference) will need, estimated from weight shapes
read from file headers, and the check that refuses, with the numbers, a job that would not fit the
chosen device.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from compute_swarm.engine.jobs import LoraJobSpec

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

# When the number of attention heads is not given, assume heads of 64 dimensions: the smallest in
# common use (SmolLM2 64; Llama, Qwen, Mistral 128; Gemma 256). Smaller heads mean more of them and
# more attention-score memory, so the assumption can only over-estimate.
ASSUMED_HEAD_DIMENSION = 64

# safetensors refuses headers larger than this; so do we, before reading one into memory.
_MAX_SAFETENSORS_HEADER_BYTES = 100_000_000

# llama.cpp's GGUF tensor names (gguf-py's TENSOR_NAMES for MODEL_ARCH.LLAMA) → the module names
# Hugging Face and peft use, so a spec's target_modules match a GGUF model as they match the original.
GGUF_TO_HUGGING_FACE_MODULE: dict[str, str] = {
    "attn_q": "q_proj",
    "attn_k": "k_proj",
    "attn_v": "v_proj",
    "attn_output": "o_proj",
    "ffn_gate": "gate_proj",
    "ffn_up": "up_proj",
    "ffn_down": "down_proj",
}

# Token embeddings and output heads, as named by transformers (llama, mistral, qwen...), GPT-2 and GGUF.
_EMBEDDING_NAMES = ("embed_tokens.weight", "token_embd.weight", "wte.weight")
_OUTPUT_HEAD_NAMES = ("lm_head.weight", "output.weight")
# The MLP's widening projections: their out_features is the intermediate size.
_MLP_WIDENING_MODULES = ("gate_proj", "up_proj", "w1", "w3", "fc1", "c_fc")
# Pickle-based checkpoint formats: we never load these (a pickle can run code on the seller's machine).
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# A layer's index is the first all-digit component of a name: model.layers.3..., blk.3..., h.3...
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)\.")


class ResourceError(ValueError):
    """A model whose size cannot be read, or a job whose memory cannot be estimated."""


class InsufficientMemoryError(ResourceError):
    """A job that would need more memory than the chosen device has free."""

    def __init__(self, message: str, *, estimate: MemoryEstimate, available_bytes: int, device: str):
        super().__init__(message)
        self.estimate = estimate
        self.available_bytes = available_bytes
        self.device = device


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


# Reading shapes ------------------------------------------------------------------------------------


def read_weight_shapes(model_path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape (torch's order: a linear weight is (out_features, in_features)), read from
    file headers only; no weight is loaded.

    Accepts a Hugging Face directory (model.safetensors, or shards listed in
    model.safetensors.index.json), a .safetensors file, or a .gguf file. GGUF names keep their
    layout (blk.N....) but their llama module names become Hugging Face's (blk.0.attn_q.weight →
    blk.0.q_proj.weight), so target_modules match either form. Pickle checkpoints are refused.
    Raises ResourceError saying what is wrong with the path.
    """
    path = Path(model_path)
    if path.is_dir():
        shapes = _directory_shapes(path)
    elif path.is_file():
        shapes = _file_shapes(path)
    else:
        raise ResourceError(f"model path {str(path)!r} does not exist")
    if not shapes:
        raise ResourceError(f"{str(path)!r} holds no tensors")
    return shapes


def _directory_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return _sharded_safetensors_shapes(index)
    single = directory / "model.safetensors"
    if single.is_file():
        return _safetensors_shapes(single)
    pickles = sorted(entry.name for entry in directory.iterdir() if entry.suffix.lower() in _PICKLE_SUFFIXES)
    if pickles:
        raise ResourceError(
            f"{str(directory)!r} holds only pickle weights ({', '.join(pickles)}); compute-swarm loads "
            "safetensors or GGUF only, because a pickle can run code when loaded: convert the model "
            "to model.safetensors first"
        )
    raise ResourceError(
        f"{str(directory)!r} holds no model weights: expected model.safetensors or "
        "model.safetensors.index.json"
    )


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _safetensors_shapes(path)
    if suffix == ".gguf":
        return _gguf_shapes(path)
    if suffix in _PICKLE_SUFFIXES:
        raise ResourceError(
            f"{str(path)!r} is a pickle checkpoint; compute-swarm loads safetensors or GGUF only, "
            "because a pickle can run code when loaded"
        )
    raise ResourceError(f"{str(path)!r} is neither a .safetensors nor a .gguf file")


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    # The format: an 8-byte little-endian header length, then a JSON header
    # {name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}, then the raw data.
    # Parsing it here costs one small read and no import of safetensors or torch.
    not_safetensors = f"{str(path)!r} is not a readable safetensors file"
    try:
        with open(path, "rb") as file:
            prefix = file.read(8)
            file_size = os.fstat(file.fileno()).st_size
            if len(prefix) < 8:
                raise ResourceError(f"{not_safetensors}: it is shorter than its 8-byte header length")
            header_length = int.from_bytes(prefix, "little")
            if header_length > min(file_size - 8, _MAX_SAFETENSORS_HEADER_BYTES):
                raise ResourceError(
                    f"{not_safetensors}: its header claims {header_length:,} bytes in a file of {file_size:,}"
                )
            header = json.loads(file.read(header_length))
    except OSError as error:
        raise ResourceError(f"cannot read {str(path)!r}: {error.strerror or error}") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ResourceError(f"{not_safetensors}: its header is not JSON") from error
    if not isinstance(header, dict):
        raise ResourceError(f"{not_safetensors}: its header is not a JSON object")

    shapes: dict[str, tuple[int, ...]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(
            isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in shape
        ):
            raise ResourceError(f"{not_safetensors}: tensor {name!r} has no valid shape")
        shapes[name] = tuple(shape)
    return shapes


def _sharded_safetensors_shapes(index: Path) -> dict[str, tuple[int, ...]]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except OSError as error:
        raise ResourceError(f"cannot read {str(index)!r}: {error.strerror or error}") from error
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ResourceError(f"{str(index)!r} is not a safetensors index with a weight_map") from error
    if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
        raise ResourceError(f"{str(index)!r} has a weight_map that does not map names to shard files")

    shapes: dict[str, tuple[int, ...]] = {}
    for shard_name in sorted(set(weight_map.values())):
        # Shard names come from a file we did not write: plain names in this directory only.
        if Path(shard_name).name != shard_name or shard_name in ("", ".", ".."):
            raise ResourceError(f"{str(index)!r} names a shard outside its directory: {shard_name!r}")
        shard = index.parent / shard_name
        if not shard.is_file():
            raise ResourceError(f"{str(index)!r} lists shard {shard_name!r}, which is missing")
        shapes.update(_safetensors_shapes(shard))
    missing = sorted(name for name in weight_map if name not in shapes)
    if missing:
        raise ResourceError(
            f"{str(index)!r} lists {len(missing)} tensor(s) that its shards lack, e.g. {missing[0]!r}"
        )
    return shapes


def _gguf_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    try:
        import gguf
    except ImportError as error:
        raise ResourceError("reading a .gguf file needs the gguf package (compute-swarm[engine])") from error
    try:
        # The reader memory-maps the file and parses its header; tensor data is never touched.
        reader = gguf.GGUFReader(path, "r")
    except Exception as error:  # the reader raises ValueError, IndexError, struct errors...
        raise ResourceError(f"{str(path)!r} is not a readable GGUF file: {error}") from error

    shapes: dict[str, tuple[int, ...]] = {}
    for tensor in reader.tensors:
        # GGUF lists a tensor's dimensions innermost first (ggml's ne[0] is the contiguous row
        # length), torch outermost first: a linear weight torch holds as (out_features, in_features)
        # GGUF stores as [in_features, out_features]. Reverse to torch's order. The shape is the
        # logical one, whatever the quantization.
        shape = tuple(int(size) for size in reversed(tensor.shape.tolist()))
        shapes[_hugging_face_module_names(tensor.name)] = shape
    return shapes


def _hugging_face_module_names(gguf_name: str) -> str:
    return ".".join(GGUF_TO_HUGGING_FACE_MODULE.get(part, part) for part in gguf_name.split("."))


# Estimating -----------------------------------------------------------------------------------------


def _module_name(tensor_name: str) -> str | None:
    """'model.layers.0.self_attn.q_proj.weight' → 'q_proj'; None for a tensor that is not a weight."""
    parts = tensor_name.split(".")
    if len(parts) < 2 or parts[-1] != "weight":
        return None
    return parts[-2]


def _find_shape(shapes: Mapping[str, tuple[int, ...]], suffixes: Iterable[str]) -> tuple[int, ...] | None:
    for suffix in suffixes:
        for name, shape in shapes.items():
            if (name == suffix or name.endswith("." + suffix)) and len(shape) == 2:
                return shape
    return None


def _device_kind(device: str) -> str:
    kind = device.split(":", 1)[0].strip().lower()
    if kind not in OVERHEAD_BYTES_BY_DEVICE_KIND:
        raise ResourceError(
            f"unknown device {device!r}: expected one of {', '.join(OVERHEAD_BYTES_BY_DEVICE_KIND)} "
            "(optionally with an index, like cuda:0)"
        )
    return kind


def estimate_lora_memory(
    spec: LoraJobSpec,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    device: str,
    compute_dtype_bytes: int,
    attention_heads: int | None = None,
) -> MemoryEstimate:
    """The peak memory of one training micro-batch (batch_size × max_sequence_length tokens) of `spec`
    on `device`, from the model's weight `shapes` (see read_weight_shapes).

    compute_dtype_bytes is the size of the dtype weights and activations are held in: 4 for fp32
    (CPU), 2 for bf16/fp16 (GPU). attention_heads, when known (config.json's num_attention_heads,
    GGUF's llama.attention.head_count), makes the attention-score term exact; without it heads of
    ASSUMED_HEAD_DIMENSION are assumed. Gradient accumulation does not change the peak: the
    micro-batches run one after another. Raises ResourceError when no weight matches the spec's
    target_modules or the shapes lack what the estimate needs.
    """
    if compute_dtype_bytes not in (2, 4):
        raise ResourceError(
            f"compute_dtype_bytes must be 2 (bf16/fp16) or 4 (fp32), not {compute_dtype_bytes}"
        )
    if attention_heads is not None and attention_heads < 1:
        raise ResourceError(f"attention_heads must be positive, not {attention_heads}")
    overhead_bytes = OVERHEAD_BYTES_BY_DEVICE_KIND[_device_kind(device)]
    dtype_bytes = compute_dtype_bytes

    model_parameters = sum(math.prod(shape) for shape in shapes.values())

    # LoRA adds A (rank × in) and B (out × rank) beside every targeted weight W (out × in).
    targets = set(spec.target_modules)
    targeted = [shape for name, shape in shapes.items() if len(shape) == 2 and _module_name(name) in targets]
    if not targeted:
        found = sorted(
            {module for name, shape in shapes.items() if len(shape) == 2 and (module := _module_name(name))}
        )
        raise ResourceError(
            f"target modules {spec.target_modules!r} match no weight in this model; "
            f"it has {', '.join(found) or 'no 2-D weights'}"
        )
    lora_parameters = sum(spec.rank * (in_features + out_features) for out_features, in_features in targeted)

    embedding = _find_shape(shapes, _EMBEDDING_NAMES)
    if embedding is None:
        raise ResourceError(
            "cannot find the token embedding in this model (a 2-D weight named like "
            f"{', '.join(_EMBEDDING_NAMES)}), so its hidden size is unknown"
        )
    vocabulary_size, hidden_size = embedding
    output_head = _find_shape(shapes, _OUTPUT_HEAD_NAMES)
    if output_head is not None:  # absent when tied to the embedding
        vocabulary_size = output_head[0]
    layer_count = len({int(match.group(1)) for name in shapes if (match := _LAYER_INDEX.search(name))})
    if layer_count == 0:
        raise ResourceError("cannot find numbered layers in this model (names like model.layers.0....)")
    widening = [
        shape[0]
        for name, shape in shapes.items()
        if len(shape) == 2 and _module_name(name) in _MLP_WIDENING_MODULES
    ]
    # A model without recognisable MLP names gets GPT's 4 × hidden.
    intermediate_size = max(widening) if widening else 4 * hidden_size
    if attention_heads is None:
        query = _find_shape(shapes, ("q_proj.weight",))
        query_width = query[0] if query is not None else hidden_size
        attention_heads = max(1, math.ceil(query_width / ASSUMED_HEAD_DIMENSION))

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
    per_layer_16bit_bytes += 5 * attention_heads * tokens * sequence_length
    layer_bytes = layer_count * per_layer_16bit_bytes * dtype_bytes // 2
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
    logits_bytes = tokens * vocabulary_size * logits_bytes_per_entry

    return MemoryEstimate(
        weights_bytes=model_parameters * dtype_bytes,
        adapter_bytes=lora_parameters * ADAPTER_BYTES_PER_PARAMETER,
        activation_bytes=layer_bytes + adapter_activation_bytes + residual_bytes + logits_bytes,
        overhead_bytes=overhead_bytes,
        lora_parameters=lora_parameters,
        model_parameters=model_parameters,
    )


def check_fits(estimate: MemoryEstimate, *, available_bytes: int, device: str) -> None:
    """Raise InsufficientMemoryError, naming the numbers, unless the job fits in USABLE_PERCENT of
    `available_bytes` (the memory free on `device`, measured by the caller)."""
    if available_bytes < 0:
        raise ResourceError(f"available_bytes must not be negative, not {available_bytes}")
    usable_bytes = available_bytes * USABLE_PERCENT // 100
    if estimate.total_bytes <= usable_bytes:
        return
    if estimate.total_bytes - estimate.activation_bytes > usable_bytes:
        advice = "the model alone does not fit: choose a device with more free memory or a smaller model"
    else:
        advice = (
            "lower batch_size (raising gradient_accumulation_steps keeps the examples per step) "
            "or max_sequence_length"
        )
    raise InsufficientMemoryError(
        f"this job needs about {format_bytes(estimate.total_bytes)} on {device} ({estimate.breakdown()}) "
        f"but only {format_bytes(available_bytes)} is free, of which a job may use {USABLE_PERCENT}% "
        f"({format_bytes(usable_bytes)}); {advice}",
        estimate=estimate,
        available_bytes=available_bytes,
        device=device,
    )


# llama.cpp's compute buffers beside the weights and the cache (tens of MiB for small models).
INFERENCE_COMPUTE_BYTES = 64 * MIB


def estimate_inference_memory(
    model_path: str | Path, adapter_path: str | Path | None, context_tokens: int
) -> int:
    """Bytes llama.cpp holds to serve a GGUF model: its file (weights are used as stored, quantized),
    the adapter file, the KV cache of `context_tokens` in f16 (keys and values of every layer's
    k_proj and v_proj width) and compute buffers."""
    shapes = read_weight_shapes(model_path)
    cache_width = sum(
        shape[0]
        for name, shape in shapes.items()
        if _module_name(name) in ("k_proj", "v_proj") and len(shape) == 2
    )
    adapter_bytes = os.path.getsize(adapter_path) if adapter_path is not None else 0
    return (
        os.path.getsize(model_path)
        + adapter_bytes
        + 2 * context_tokens * cache_width
        + INFERENCE_COMPUTE_BYTES
    )
