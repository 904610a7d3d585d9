"""A model's shape read from its weight files (file headers only: no weight is loaded), the memory a
job on this node will need (worked out by engine.memory, the estimate the coordinator uses too), and
the check that refuses, with the numbers, a job that would not fit the chosen device.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

# The node's code (engine.lora, engine.worker, engine.inference) reaches MemoryEstimate, ResourceError,
# format_bytes and USABLE_PERCENT through this module too.
from compute_swarm.engine.memory import (
    OVERHEAD_BYTES_BY_DEVICE_KIND,
    USABLE_PERCENT,
    MemoryEstimate,
    ModelShape,
    ResourceError,
    estimate_inference,
    estimate_lora,
    format_bytes,
    key_value_width,
    usable_bytes,
)
from compute_swarm.engine.offload import KV_CACHE_BYTES_PER_ELEMENT, GgufLayout

if TYPE_CHECKING:
    from compute_swarm.engine.jobs import LoraJobSpec

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


class InsufficientMemoryError(ResourceError):
    """A job that would need more memory than the chosen device has free."""

    def __init__(self, message: str, *, estimate: MemoryEstimate, available_bytes: int, device: str):
        super().__init__(message)
        self.estimate = estimate
        self.available_bytes = available_bytes
        self.device = device


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


def _linear_weights(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[tuple[int, int], ...]]:
    """Every 2-D weight by module name, as (out_features, in_features): ModelShape.linear_weights."""
    linear_weights: dict[str, list[tuple[int, int]]] = {}
    for name, shape in shapes.items():
        module = _module_name(name)
        if module and len(shape) == 2:
            linear_weights.setdefault(module, []).append((shape[0], shape[1]))
    return {module: tuple(weights) for module, weights in linear_weights.items()}


def _device_kind(device: str) -> str:
    kind = device.split(":", 1)[0].strip().lower()
    if kind not in OVERHEAD_BYTES_BY_DEVICE_KIND:
        raise ResourceError(
            f"unknown device {device!r}: expected one of {', '.join(OVERHEAD_BYTES_BY_DEVICE_KIND)} "
            "(optionally with an index, like cuda:0)"
        )
    return kind


def model_shape(shapes: Mapping[str, tuple[int, ...]], *, attention_heads: int | None = None) -> ModelShape:
    """The shape engine.memory estimates from, out of a model's weight `shapes` (see
    read_weight_shapes).

    attention_heads, when known (config.json's num_attention_heads, GGUF's llama.attention.head_count),
    is taken as it is; without it heads of ASSUMED_HEAD_DIMENSION are assumed. Raises ResourceError
    when the shapes lack the token embedding or numbered layers.
    """
    if attention_heads is not None and attention_heads < 1:
        raise ResourceError(f"attention_heads must be positive, not {attention_heads}")
    linear_weights = _linear_weights(shapes)

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
        out_features for module in _MLP_WIDENING_MODULES for out_features, _ in linear_weights.get(module, ())
    ]
    # A model without recognisable MLP names gets GPT's 4 × hidden.
    intermediate_size = max(widening) if widening else 4 * hidden_size
    if attention_heads is None:
        query = _find_shape(shapes, ("q_proj.weight",))
        query_width = query[0] if query is not None else hidden_size
        attention_heads = max(1, math.ceil(query_width / ASSUMED_HEAD_DIMENSION))

    return ModelShape(
        parameters=sum(math.prod(shape) for shape in shapes.values()),
        layer_count=layer_count,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        vocabulary_size=vocabulary_size,
        attention_heads=attention_heads,
        linear_weights=linear_weights,
    )


def estimate_lora_memory(
    spec: LoraJobSpec,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    device: str,
    compute_dtype_bytes: int,
    attention_heads: int | None = None,
) -> MemoryEstimate:
    """The peak memory of one training micro-batch of `spec` on `device` (cpu, cuda:0...), from the
    model's weight `shapes` (see read_weight_shapes): engine.memory.estimate_lora on model_shape(shapes,
    attention_heads=attention_heads).

    compute_dtype_bytes is the size of the dtype weights and activations are held in: 4 for fp32
    (CPU), 2 for bf16/fp16 (GPU). Raises ResourceError for an unknown device, when no weight matches
    the spec's target_modules or the shapes lack what the estimate needs.
    """
    device_kind = _device_kind(device)
    return estimate_lora(
        spec,
        model_shape(shapes, attention_heads=attention_heads),
        device_kind=device_kind,
        compute_dtype_bytes=compute_dtype_bytes,
    )


def check_fits(estimate: MemoryEstimate, *, available_bytes: int, device: str) -> None:
    """Raise InsufficientMemoryError, naming the numbers, unless the job fits in USABLE_PERCENT of
    `available_bytes` (the memory free on `device`, measured by the caller)."""
    if available_bytes < 0:
        raise ResourceError(f"available_bytes must not be negative, not {available_bytes}")
    usable = usable_bytes(available_bytes)
    if estimate.total_bytes <= usable:
        return
    if estimate.total_bytes - estimate.activation_bytes > usable:
        advice = "the model alone does not fit: choose a device with more free memory or a smaller model"
    else:
        advice = (
            "lower batch_size (raising gradient_accumulation_steps keeps the examples per step) "
            "or max_sequence_length"
        )
    raise InsufficientMemoryError(
        f"this job needs about {format_bytes(estimate.total_bytes)} on {device} ({estimate.breakdown()}) "
        f"but only {format_bytes(available_bytes)} is free, of which a job may use {USABLE_PERCENT}% "
        f"({format_bytes(usable)}); {advice}",
        estimate=estimate,
        available_bytes=available_bytes,
        device=device,
    )


def estimate_inference_memory(
    model_path: str | Path, adapter_path: str | Path | None, context_tokens: int
) -> int:
    """Bytes llama.cpp holds to serve a GGUF model (engine.memory.estimate_inference): its file, the
    adapter file, the KV cache of `context_tokens` and compute buffers."""
    return estimate_inference(
        model_file_bytes=os.path.getsize(model_path),
        adapter_file_bytes=os.path.getsize(adapter_path) if adapter_path is not None else 0,
        key_value_width=key_value_width(_linear_weights(read_weight_shapes(model_path))),
        context_tokens=context_tokens,
    )


def read_gguf_layout(model_path: str | Path, adapter_path: str | Path | None = None) -> GgufLayout:
    """The bytes of each part of a GGUF model as llama.cpp places them (engine.offload.GgufLayout),
    from its header: tensor sizes by block, the KV cache's width from the head counts, and the sizes
    the compute buffers depend on. A llama.cpp LoRA adapter's tensors (blk.N....lora_a/b) count with
    the blocks they change. Raises ResourceError when the file is not a GGUF model llama.cpp could
    load."""
    reader = _gguf_reader(Path(model_path))
    architecture = _gguf_value(reader, "general.architecture")
    if not isinstance(architecture, str):
        raise ResourceError(f"{str(model_path)!r} names no general.architecture")

    def number(key: str, default: int | None = None, *, block: int | None = None) -> int:
        value = _gguf_value(reader, f"{architecture}.{key}")
        if isinstance(value, list):  # per-block values (head counts of OpenELM, say)
            value = value[block or 0] if value else None
        if value is None:
            if default is None:
                raise ResourceError(f"{str(model_path)!r} lacks {architecture}.{key}")
            return default
        return int(value)

    block_count = number("block_count")
    block_bytes = [0] * block_count
    tensor_bytes: dict[str, int] = {}
    shapes: dict[str, list[int]] = {}
    readers = [reader] + ([_gguf_reader(Path(adapter_path))] if adapter_path is not None else [])
    outside = 0
    for source in readers:
        for tensor in source.tensors:
            match = re.match(r"blk\.(\d+)\.", tensor.name)
            if match and int(match.group(1)) < block_count:
                block_bytes[int(match.group(1))] += int(tensor.n_bytes)
            elif source is reader:
                tensor_bytes[tensor.name] = int(tensor.n_bytes)
                shapes[tensor.name] = [int(size) for size in tensor.shape.tolist()]
            else:
                outside += int(tensor.n_bytes)  # an adapter of the embedding or head: kept in RAM
    if "token_embd.weight" not in tensor_bytes:
        raise ResourceError(f"{str(model_path)!r} has no token_embd.weight")
    embedding_bytes = tensor_bytes.pop("token_embd.weight")
    embedding_length, vocabulary_size = shapes["token_embd.weight"][:2]  # GGUF: innermost first
    output_norm = sum(tensor_bytes.pop(name, 0) for name in ("output_norm.weight", "output_norm.bias"))
    head = sum(tensor_bytes.pop(name, 0) for name in ("output.weight", "output.bias"))
    tied = "output.weight" not in shapes
    heads = number("attention.head_count")
    head_dimension = number("embedding_length", embedding_length) // heads
    kv_bytes = []
    for block in range(block_count):
        kv_heads = number("attention.head_count_kv", heads, block=block)
        key_length = number("attention.key_length", head_dimension)
        value_length = number("attention.value_length", head_dimension)
        kv_bytes.append(kv_heads * (key_length + value_length) * KV_CACHE_BYTES_PER_ELEMENT)
    return GgufLayout(
        block_weight_bytes=tuple(block_bytes),
        block_kv_bytes_per_token=tuple(kv_bytes),
        input_bytes=embedding_bytes + sum(tensor_bytes.values()) + outside,
        output_gpu_bytes=output_norm + (embedding_bytes if tied else head),
        output_cpu_bytes=output_norm + (0 if tied else head),
        vocabulary_size=vocabulary_size,
        embedding_length=embedding_length,
        feed_forward_length=number("feed_forward_length", 4 * embedding_length),
        attention_heads=heads,
    )


def _gguf_reader(path: Path):
    try:
        import gguf
    except ImportError as error:
        raise ResourceError("reading a .gguf file needs the gguf package (compute-swarm[engine])") from error
    try:
        return gguf.GGUFReader(path, "r")
    except OSError as error:
        raise ResourceError(f"cannot read {str(path)!r}: {error.strerror or error}") from error
    except Exception as error:  # the reader raises ValueError, IndexError, struct errors...
        raise ResourceError(f"{str(path)!r} is not a readable GGUF file: {error}") from error


def _gguf_value(reader, key: str):
    field = reader.fields.get(key)
    return field.contents() if field is not None else None
