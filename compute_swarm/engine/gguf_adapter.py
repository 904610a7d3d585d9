"""Export a LoRA adapter trained by the engine (peft layout) as a llama.cpp adapter GGUF.

llama.cpp serves the file on top of the base GGUF the adapter was trained from (`--lora`,
`Llama(lora_path=...)`). Tensor names, shapes and head counts come from that base GGUF itself, so no
Hugging Face config or hub access is needed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

from compute_swarm.engine.artifacts import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE

# Architectures checked end to end against llama.cpp, and whether llama.cpp's converter reorders the
# rows of their q/k projections (LlamaModel.permute; "llama" covers Mistral, which it writes as llama).
# Qwen2 and Gemma2 rotate halves of each head in llama.cpp as in transformers, so their rows stay. Add
# one only after checking both, as tests/engine/test_gguf_adapter.py does: a wrong answer gives a file
# that loads and quietly misbehaves.
PERMUTES_QUERY_AND_KEY_ROWS: dict[str, bool] = {"llama": True, "qwen2": False, "gemma2": False}

# peft settings whose adapters llama.cpp would apply differently from peft, with the reason.
UNSUPPORTED_SETTINGS: dict[str, str] = {
    "use_rslora": "rank-stabilised LoRA scales by alpha/sqrt(rank), llama.cpp always by alpha/rank",
    "use_dora": "DoRA's magnitude vectors have no place in a llama.cpp adapter",
    "rank_pattern": "per-module ranks (rank_pattern) are not supported by this export",
    "alpha_pattern": "llama.cpp holds one alpha for the whole adapter, not one per module",
    "modules_to_save": "fully trained module copies (modules_to_save) are not LoRA pairs",
    "lora_bias": "llama.cpp adapters have no LoRA bias",
    "layer_replication": "replicated layers do not exist in the base GGUF",
    "alora_invocation_tokens": "activated LoRA (aLoRA) adapters are not supported by this export",
}


class AdapterExportError(ValueError):
    """An adapter and base model pair that cannot become a llama.cpp adapter; the message says why."""


@dataclass(frozen=True)
class _BaseModel:
    architecture: str
    tensor_shapes: dict[str, tuple[int, ...]]  # ggml order: ne[0] is the input features
    block_count: int
    head_count: int
    head_count_kv: int


def export_lora_to_gguf(adapter_dir: str | Path, base_gguf: str | Path, output: str | Path) -> Path:
    """Write the peft adapter in `adapter_dir` as a llama.cpp LoRA adapter for `base_gguf` to `output`."""
    adapter_dir, base_gguf, output = Path(adapter_dir), Path(base_gguf), Path(output)
    alpha = _read_alpha(adapter_dir)
    base = _read_base(base_gguf)
    tensors = _adapter_tensors(adapter_dir, base, base_gguf.name)

    # Same directory, so os.replace is atomic: a reader never sees half a file.
    temporary = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        writer = gguf.GGUFWriter(temporary, base.architecture)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for name, tensor in tensors.items():
            writer.add_tensor(name, tensor)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(temporary, output)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return output


def _read_alpha(adapter_dir: Path) -> float:
    config_path = adapter_dir / ADAPTER_CONFIG_FILE
    if not config_path.is_file():
        raise AdapterExportError(
            f"{adapter_dir} is not a peft adapter directory: it has no {ADAPTER_CONFIG_FILE}"
        )
    config = json.loads(config_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterExportError(f"only LoRA adapters can be exported, not {config['peft_type']}")
    for setting, reason in UNSUPPORTED_SETTINGS.items():
        if config.get(setting):
            raise AdapterExportError(f"cannot export an adapter with {setting}: {reason}")
    alpha = float(config["lora_alpha"])
    if alpha == 0:
        # peft scales such an adapter by zero, llama.cpp reads alpha 0 as "scale by one".
        raise AdapterExportError(
            "cannot export an adapter with lora_alpha 0: llama.cpp reads it as no scaling"
        )
    return alpha


def _read_base(base_gguf: Path) -> _BaseModel:
    try:
        reader = gguf.GGUFReader(base_gguf)
    except ValueError as error:
        raise AdapterExportError(f"{base_gguf} is not a readable GGUF file: {error}") from error

    def field(key: str) -> object:
        found = reader.get_field(key)
        return None if found is None else found.contents()

    architecture = str(field(gguf.Keys.General.ARCHITECTURE))
    if architecture not in PERMUTES_QUERY_AND_KEY_ROWS:
        raise AdapterExportError(
            f"{base_gguf.name} is a {architecture!r} model; adapters can be exported only for "
            f"{', '.join(sorted(PERMUTES_QUERY_AND_KEY_ROWS))} models so far"
        )
    head_count = field(f"{architecture}.attention.head_count")
    if not isinstance(head_count, int):
        raise AdapterExportError(f"{base_gguf.name} has no single {architecture}.attention.head_count")
    head_count_kv = field(f"{architecture}.attention.head_count_kv")
    return _BaseModel(
        architecture=architecture,
        tensor_shapes={tensor.name: tuple(int(n) for n in tensor.shape) for tensor in reader.tensors},
        block_count=int(field(f"{architecture}.block_count")),
        head_count=head_count,
        head_count_kv=head_count_kv if isinstance(head_count_kv, int) else head_count,
    )


def _adapter_tensors(adapter_dir: Path, base: _BaseModel, base_name: str) -> dict[str, np.ndarray]:
    """The adapter's tensors under llama.cpp's names: `<base tensor>.lora_a` is (rank, in) and
    `<base tensor>.lora_b` is (out, rank) in numpy order, like peft's lora_A and lora_B."""
    weights_path = adapter_dir / ADAPTER_WEIGHTS_FILE
    if not weights_path.is_file():
        raise AdapterExportError(f"{adapter_dir} has no {ADAPTER_WEIGHTS_FILE}")
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in load_file(weights_path).items():
        module, _, kind = key.rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise AdapterExportError(f"adapter tensor {key!r} is not a LoRA A or B weight; only those export")
        module = module.removeprefix("base_model.model.")
        pairs.setdefault(module, {})[kind[0]] = tensor.to(torch.float32).numpy()

    model_arch = next(arch for arch, name in gguf.MODEL_ARCH_NAMES.items() if name == base.architecture)
    name_map = gguf.get_tensor_name_map(model_arch, base.block_count)
    tensors: dict[str, np.ndarray] = {}
    for module, pair in sorted(pairs.items()):
        found = name_map.get_type_and_name(f"{module}.weight", try_suffixes=(".weight",))
        if found is None:
            raise AdapterExportError(
                f"adapter module {module!r} is not a tensor of a {base.architecture} model with "
                f"{base.block_count} blocks, so llama.cpp cannot apply it (wrong base model?)"
            )
        tensor_type, name = found
        if name not in base.tensor_shapes:
            raise AdapterExportError(f"adapter module {module!r} is {name}, which {base_name} does not have")
        missing = {"A", "B"} - set(pair)
        if missing:
            raise AdapterExportError(f"adapter module {module!r} lacks its lora_{missing.pop()} weight")
        lora_a, lora_b = pair["A"], pair["B"]
        if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.shape[0] != lora_b.shape[1]:
            raise AdapterExportError(
                f"adapter module {module!r} has lora_A {lora_a.shape} and lora_B {lora_b.shape}, "
                "which are not a (rank, in) and (out, rank) pair"
            )
        # ggml lists dimensions innermost first: a base weight's (in, out) is numpy's (out, in).
        expected = (lora_a.shape[1], lora_b.shape[0])
        if base.tensor_shapes[name] != expected:
            raise AdapterExportError(
                f"adapter module {module!r} maps {expected[0]} inputs to {expected[1]} outputs, but "
                f"{name} in {base_name} has shape {base.tensor_shapes[name]} (wrong base model?)"
            )
        if PERMUTES_QUERY_AND_KEY_ROWS[base.architecture]:
            if tensor_type == gguf.MODEL_TENSOR.ATTN_Q:
                lora_b = _permute_rotary_rows(lora_b, base.head_count, module)
            elif tensor_type == gguf.MODEL_TENSOR.ATTN_K:
                lora_b = _permute_rotary_rows(lora_b, base.head_count_kv, module)
        tensors[f"{name}.lora_a"] = np.ascontiguousarray(lora_a, dtype=np.float32)
        tensors[f"{name}.lora_b"] = np.ascontiguousarray(lora_b, dtype=np.float32)
    if not tensors:
        raise AdapterExportError(f"{weights_path} holds no LoRA weights")
    return tensors


def _permute_rotary_rows(lora_b: np.ndarray, head_count: int, module: str) -> np.ndarray:
    """Reorder output rows the way llama.cpp's converter reorders the base q/k weights.

    Hugging Face rotates the two halves of each head, ggml's llama graph rotates adjacent pairs, so the
    converter interleaves each head's halves. Transformers undoes that when it loads the GGUF we train
    from, which leaves the adapter's rows in Hugging Face order: they need the same interleaving.
    """
    rows = lora_b.shape[0]
    if rows % (2 * head_count):
        raise AdapterExportError(
            f"adapter module {module!r} has {rows} outputs, not a multiple of 2×{head_count} heads"
        )
    by_head = lora_b.reshape(head_count, 2, rows // head_count // 2, lora_b.shape[1])
    return by_head.swapaxes(1, 2).reshape(lora_b.shape)
