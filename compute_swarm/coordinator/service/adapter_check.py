"""A seller's llama.cpp adapter (GGUF), checked on the coordinator before any other machine loads it:
other sellers' llama.cpp serves it and buyers download it, so a node's file is untrusted input.

The check is the one llama.cpp itself would make, done first and bounded: a LoRA adapter GGUF for the
base model's architecture, whose every tensor is the `lora_a` or `lora_b` half of a pair for one of
the base model's 2-D weights, with the shapes that weight implies, one rank per pair, and float types.
The header's counts are read and bounded before the file is parsed at all.
"""

from __future__ import annotations

import functools
import math
import struct
from pathlib import Path

GGUF_MAGIC = b"GGUF"
MAXIMUM_KEYS = 64  # an adapter holds a handful (type, architecture, alpha...)
MAXIMUM_RANK = 1024
FLOAT_TYPES = {"F32", "F16", "BF16"}


class AdapterRejected(ValueError):
    """Why the file cannot be offered as an adapter of its base model."""


def check_adapter(adapter: Path, base_model: Path) -> None:
    """Raise AdapterRejected unless `adapter` is a LoRA adapter GGUF that fits `base_model` (a GGUF)."""
    from gguf import GGUFReader

    base = _base_weights(base_model)
    tensor_count, key_count = _header_counts(adapter)
    if tensor_count > 2 * len(base.shapes) or key_count > MAXIMUM_KEYS:
        raise AdapterRejected(
            f"the adapter's header announces {tensor_count} tensors and {key_count} keys; an adapter of "
            f"this base model has at most {2 * len(base.shapes)} tensors and {MAXIMUM_KEYS} keys"
        )
    try:
        reader = GGUFReader(adapter)
    except (ValueError, OSError, IndexError, struct.error) as error:
        raise AdapterRejected(f"the adapter is not a readable GGUF file: {error}") from None

    def value(key: str):
        field = reader.get_field(key)
        return None if field is None else field.contents()

    if value("general.type") != "adapter" or value("adapter.type") != "lora":
        raise AdapterRejected("the file is not a LoRA adapter GGUF (general.type adapter, adapter.type lora)")
    if value("general.architecture") != base.architecture:
        raise AdapterRejected(
            f"the adapter is for a {value('general.architecture')!r} model, the base model is {base.architecture!r}"
        )
    alpha = value("adapter.lora.alpha")
    if not isinstance(alpha, float) or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterRejected(f"the adapter's alpha {alpha!r} is not a positive number")
    halves: dict[str, dict[str, tuple[int, ...]]] = {}
    for tensor in reader.tensors:
        weight, dot, half = tensor.name.rpartition(".")
        if not dot or half not in ("lora_a", "lora_b") or weight not in base.shapes:
            raise AdapterRejected(
                f"tensor {tensor.name!r} is not half of a LoRA pair for a base model weight"
            )
        if tensor.tensor_type.name not in FLOAT_TYPES:
            raise AdapterRejected(
                f"tensor {tensor.name!r} is {tensor.tensor_type.name}, not F32, F16 or BF16"
            )
        halves.setdefault(weight, {})[half] = tuple(int(n) for n in tensor.shape)
    if not halves:
        raise AdapterRejected("the adapter holds no tensor")
    for weight, pair in halves.items():
        if set(pair) != {"lora_a", "lora_b"}:
            raise AdapterRejected(f"{weight} has only its {', '.join(pair)}")
        # ggml order: the base weight is (inputs, outputs); lora_a (inputs, rank), lora_b (rank, outputs).
        inputs, outputs = base.shapes[weight]
        (a_inputs, rank), (b_rank, b_outputs) = pair["lora_a"], pair["lora_b"]
        if (a_inputs, b_rank, b_outputs) != (inputs, rank, outputs) or not 1 <= rank <= MAXIMUM_RANK:
            raise AdapterRejected(
                f"{weight}: lora_a {pair['lora_a']} and lora_b {pair['lora_b']} do not fit the base weight "
                f"{(inputs, outputs)} with one rank of at most {MAXIMUM_RANK}"
            )


def _header_counts(path: Path) -> tuple[int, int]:
    """The tensor and key counts a GGUF header announces (version 2 and 3: two 64-bit counts)."""
    try:
        with open(path, "rb") as file:
            header = file.read(24)
    except OSError as error:
        raise AdapterRejected(f"the adapter cannot be read: {error}") from None
    if len(header) < 24 or header[:4] != GGUF_MAGIC:
        raise AdapterRejected("the file is not a GGUF file")
    version, tensors, keys = struct.unpack("<IQQ", header[4:24])
    if version not in (2, 3):
        raise AdapterRejected(f"GGUF version {version} is not supported")
    return tensors, keys


class _Base:
    def __init__(self, architecture: str, shapes: dict[str, tuple[int, int]]):
        self.architecture, self.shapes = architecture, shapes


@functools.lru_cache(maxsize=8)
def _base_weights(base_model: Path) -> _Base:
    """The base model's architecture and 2-D weights (read once per file: a few seconds)."""
    from gguf import GGUFReader

    reader = GGUFReader(base_model)
    architecture = reader.get_field("general.architecture").contents()
    shapes = {
        tensor.name: (int(tensor.shape[0]), int(tensor.shape[1]))
        for tensor in reader.tensors
        if len(tensor.shape) == 2 and tensor.name.endswith(".weight")
    }
    return _Base(architecture, shapes)
