"""Write a Hugging Face decoder directory (config, tokenizer, safetensors) as a GGUF llama.cpp serves.

Ops may add a catalogue model from a Hugging Face directory alone; the coordinator then makes the GGUF
that llama.cpp serves with this module. It does what llama.cpp's convert_hf_to_gguf.py does for the
architectures in ARCHITECTURES and refuses anything else: a wrong guess gives a file that loads and
quietly answers badly.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from hashlib import sha256
from itertools import groupby
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
import torch
from safetensors import safe_open

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"

OutputType = Literal["f16", "f32"]


class ModelExportError(ValueError):
    """A model directory that cannot become a llama.cpp GGUF; the message says why."""


@dataclass(frozen=True)
class _Architecture:
    gguf_architecture: gguf.MODEL_ARCH
    # Hugging Face rotates the two halves of each q/k head, llama's ggml graph adjacent pairs, so
    # llama.cpp's converter interleaves the rows (LlamaModel.permute). Its qwen2 and gemma2 graphs
    # rotate halves ("neox" rope) and take the rows as they are.
    permutes_query_and_key_rows: bool
    # Gemma's RMSNorm multiplies by (1 + weight); llama.cpp's by the weight, so the converter adds one.
    adds_one_to_norm_weights: bool


ARCHITECTURES: dict[str, _Architecture] = {
    "LlamaForCausalLM": _Architecture(gguf.MODEL_ARCH.LLAMA, True, False),
    # llama.cpp's converter writes Mistral as llama: the same graph, and it ignores the sliding window.
    "MistralForCausalLM": _Architecture(gguf.MODEL_ARCH.LLAMA, True, False),
    "Qwen2ForCausalLM": _Architecture(gguf.MODEL_ARCH.QWEN2, False, False),
    "Gemma2ForCausalLM": _Architecture(gguf.MODEL_ARCH.GEMMA2, False, True),
}

_FILE_TYPES: dict[str, tuple[np.dtype, gguf.LlamaFileType]] = {
    "f16": (np.dtype(np.float16), gguf.LlamaFileType.MOSTLY_F16),
    "f32": (np.dtype(np.float32), gguf.LlamaFileType.ALL_F32),
}

# llama.cpp names a BPE tokenizer's pre-tokenizer (how text is split before merging) by the sha256 of
# the token ids of this text, a table its converter keeps (get_vocab_base_pre). These are the entries
# for the tokenizers of the models ops curate.
_PRE_TOKENIZER_PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE_TOKENIZERS: dict[str, str] = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3.x
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen 1.5 to 2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM 1 and 2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}

_ROPE_FACTORS_NAME = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"

# llama.cpp knows Gemma 2 27B by its layer count and scales its queries by 1/sqrt(hidden/heads).
_GEMMA2_27B_BLOCK_COUNT = 46


@dataclass(frozen=True)
class _Vocabulary:
    tokens: list[str]
    token_types: list[int]
    pre_tokenizer: str


@dataclass(frozen=True)
class _SourceTensor:
    file: Path
    name: str
    gguf_name: str
    shape: tuple[int, ...]


def export_model_to_gguf(hf_directory: str | Path, output: str | Path, *, dtype: OutputType = "f16") -> Path:
    """Write the Hugging Face model in `hf_directory` to `output` as a GGUF llama.cpp loads.

    Matrices are stored as `dtype` (f16 as llama.cpp's converter does by default, f32 for exactness);
    norms, biases and rope factors always as f32. Tensors are read and written one at a time."""
    directory, output = Path(hf_directory), Path(output)
    if dtype not in _FILE_TYPES:
        raise ModelExportError(f"dtype must be one of {', '.join(_FILE_TYPES)}, not {dtype!r}")
    matrix_dtype, file_type = _FILE_TYPES[dtype]
    config = _read_config(directory)
    architecture = _architecture_of(config, directory)
    vocabulary = _read_vocabulary(directory, config)
    sources = _source_tensors(directory, config, architecture)
    is_llama = architecture.gguf_architecture == gguf.MODEL_ARCH.LLAMA
    rope_factors = _llama3_rope_factors(config) if is_llama else None

    # Same directory, so os.replace is atomic: a reader never sees half a file.
    temporary = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        writer = gguf.GGUFWriter(temporary, gguf.MODEL_ARCH_NAMES[architecture.gguf_architecture])
        _add_hyperparameters(writer, config, architecture, file_type)
        _add_vocabulary(writer, vocabulary, directory, config)
        # Tensor descriptions first, from the safetensors headers; the data then streams in the same
        # order, one tensor in memory at a time, rather than the whole model held by the writer.
        for source in sources:
            stored_dtype = _stored_dtype(source.shape, matrix_dtype)
            writer.add_tensor_info(
                source.gguf_name, source.shape, stored_dtype, math.prod(source.shape) * stored_dtype.itemsize
            )
        if rope_factors is not None:
            writer.add_tensor_info(
                _ROPE_FACTORS_NAME, rope_factors.shape, rope_factors.dtype, rope_factors.nbytes
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for source, tensor in _converted_tensors(sources, config, architecture):
            writer.write_tensor_data(tensor.astype(_stored_dtype(source.shape, matrix_dtype)))
        if rope_factors is not None:
            writer.write_tensor_data(rope_factors)
        writer.close()
        os.replace(temporary, output)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return output


def _read_config(directory: Path) -> dict[str, Any]:
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise ModelExportError(f"{directory} is not a Hugging Face model directory: it has no {CONFIG_FILE}")
    config = json.loads(config_path.read_text())
    if config.get("quantization_config"):
        raise ModelExportError(f"{directory} holds a quantized checkpoint; export its unquantized weights")
    required = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
    missing = [key for key in required if key not in config]
    if missing:
        raise ModelExportError(f"{config_path} lacks {', '.join(missing)}")
    return config


def _architecture_of(config: dict[str, Any], directory: Path) -> _Architecture:
    names = config.get("architectures") or []
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        raise ModelExportError(
            f"{directory.name} is a {' / '.join(names) or 'model of no stated architecture'}; only "
            f"{', '.join(ARCHITECTURES)} models can be exported to GGUF so far"
        )
    return ARCHITECTURES[names[0]]


def _head_dimension(config: dict[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """Transformers 5 writes `rope_parameters` (theta included); older configs `rope_scaling` and a
    top-level `rope_theta`."""
    parameters = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    parameters.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    parameters["rope_type"] = parameters.get("rope_type", parameters.get("type", "default"))
    return parameters


def _add_hyperparameters(
    writer: gguf.GGUFWriter, config: dict[str, Any], architecture: _Architecture, file_type: int
) -> None:
    head_count = config["num_attention_heads"]
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(head_count)
    writer.add_head_count_kv(config.get("num_key_value_heads") or head_count)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_file_type(file_type)
    if "head_dim" in config:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])

    rope = _rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    match rope["rope_type"]:
        case "default":
            pass
        case "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))
        case "yarn":
            writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(float(rope["factor"]))
            writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        case "llama3" if architecture.gguf_architecture == gguf.MODEL_ARCH.LLAMA:
            pass  # written as the rope_freqs tensor
        case other:
            raise ModelExportError(f"rope scaling {other!r} is not supported by this export")

    if architecture.gguf_architecture == gguf.MODEL_ARCH.LLAMA:
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(_head_dimension(config))
    if architecture.gguf_architecture == gguf.MODEL_ARCH.GEMMA2:
        _check_gemma2_attention_scale(config)
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
        writer.add_sliding_window(config["sliding_window"])


def _check_gemma2_attention_scale(config: dict[str, Any]) -> None:
    """llama.cpp ignores query_pre_attn_scalar and scales queries by 1/sqrt(head_dim), or for the 27B
    layout by 1/sqrt(hidden/heads): a model scaled otherwise would be served wrongly."""
    if config["num_hidden_layers"] == _GEMMA2_27B_BLOCK_COUNT:
        served = config["hidden_size"] // config["num_attention_heads"]
    else:
        served = _head_dimension(config)
    trained = config.get("query_pre_attn_scalar", served)
    if trained != served:
        raise ModelExportError(
            f"this Gemma2 model scales queries by 1/sqrt({trained}); llama.cpp would use 1/sqrt({served})"
        )
    for key in ("attn_logit_softcapping", "final_logit_softcapping", "sliding_window"):
        if config.get(key) is None:
            raise ModelExportError(f"this Gemma2 config has no {key}, which llama.cpp's gemma2 graph needs")


def _read_vocabulary(directory: Path, config: dict[str, Any]) -> _Vocabulary:
    """The token list as llama.cpp's converter builds it for a byte-level BPE (its "gpt2" model)."""
    from tokenizers import Tokenizer

    tokenizer_path = directory / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise ModelExportError(
            f"{directory} has no {TOKENIZER_FILE}; only byte-level BPE tokenizers in that file export so far"
        )
    description = json.loads(tokenizer_path.read_text(encoding="utf-8"))
    model_type = description.get("model", {}).get("type")
    if model_type != "BPE" or "ByteLevel" not in json.dumps(description.get("pre_tokenizer")):
        kind = "SentencePiece-style BPE" if model_type == "BPE" else repr(model_type)
        raise ModelExportError(
            f"{tokenizer_path} is a {kind} tokenizer; only byte-level (GPT-2 style) BPE exports so far"
        )

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    probe_hash = sha256(str(tokenizer.encode(_PRE_TOKENIZER_PROBE).ids).encode()).hexdigest()
    if probe_hash not in KNOWN_PRE_TOKENIZERS:
        raise ModelExportError(
            f"{tokenizer_path} splits text in a way llama.cpp's known pre-tokenizers do not (probe "
            f"hash {probe_hash}); llama.cpp would tokenize differently from the model's training"
        )

    vocabulary_size = config["vocab_size"]
    by_id: dict[int, str] = {token_id: token for token, token_id in description["model"]["vocab"].items()}
    added = {entry["id"]: entry for entry in description.get("added_tokens", [])}
    for token_id, entry in added.items():
        by_id[token_id] = entry["content"]
    if max(by_id) >= vocabulary_size:
        raise ModelExportError(
            f"{tokenizer_path} has token id {max(by_id)}, past the model's vocab_size {vocabulary_size}"
        )
    tokens: list[str] = []
    token_types: list[int] = []
    for token_id in range(vocabulary_size):
        if token_id not in by_id:
            tokens.append(f"[PAD{token_id}]")  # embedding rows no token uses
            token_types.append(gguf.TokenType.UNUSED)
            continue
        token = by_id[token_id]
        if token_id in added:
            entry = added[token_id]
            if not entry.get("normalized", True):
                # llama.cpp takes added tokens as already normalized; the converter makes them so.
                token = tokenizer.decode(
                    tokenizer.encode(token, add_special_tokens=False).ids, skip_special_tokens=False
                )
            special = entry.get("special") or _looks_special(token)
            token_types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            token_types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return _Vocabulary(tokens, token_types, KNOWN_PRE_TOKENIZERS[probe_hash])


def _looks_special(token: str) -> bool:
    """Added tokens some models forget to mark special, as llama.cpp's converter recognises them."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _add_vocabulary(
    writer: gguf.GGUFWriter, vocabulary: _Vocabulary, directory: Path, config: dict[str, Any]
) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocabulary.pre_tokenizer)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_types(vocabulary.token_types)
    # Merges, bos/eos/pad ids, whether to add bos, and the chat template (tokenizer_config.json or
    # chat_template.jinja), read as the converter reads them.
    special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=config["vocab_size"])
    if not special.merges:
        raise ModelExportError(f"{directory / TOKENIZER_FILE} has no BPE merges")
    special.add_to_gguf(writer, quiet=True)


def _weight_files(directory: Path) -> list[Path]:
    index_path = directory / WEIGHTS_INDEX_FILE
    if index_path.is_file():
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [path.name for path in files if not path.is_file()]
        if missing:
            raise ModelExportError(
                f"{directory} lacks weight files its {WEIGHTS_INDEX_FILE} names: {', '.join(missing)}"
            )
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelExportError(f"{directory} has no .safetensors weights (pickled weights are never read)")
    return files


def _source_tensors(
    directory: Path, config: dict[str, Any], architecture: _Architecture
) -> list[_SourceTensor]:
    """Every weight to write, with its GGUF name and shape, from the safetensors headers alone."""
    name_map = gguf.get_tensor_name_map(architecture.gguf_architecture, config["num_hidden_layers"])
    tied = config.get("tie_word_embeddings", architecture.gguf_architecture == gguf.MODEL_ARCH.GEMMA2)
    sources: list[_SourceTensor] = []
    for path in _weight_files(directory):
        with safe_open(path, framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                if name.endswith(".rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
                    continue  # recomputed by llama.cpp / the embedding doubles as the output layer
                gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise ModelExportError(
                        f"{path.name} holds {name!r}, which has no place in a "
                        f"{gguf.MODEL_ARCH_NAMES[architecture.gguf_architecture]} GGUF"
                    )
                shape = tuple(weights.get_slice(name).get_shape())
                sources.append(_SourceTensor(path, name, gguf_name, shape))
    written = {source.gguf_name for source in sources}
    if "token_embd.weight" not in written:
        raise ModelExportError(f"{directory}'s weights have no token embedding (model.embed_tokens.weight)")
    expected_blocks = set(range(config["num_hidden_layers"]))
    blocks = {int(name.split(".")[1]) for name in written if name.startswith("blk.")}
    if blocks != expected_blocks:
        raise ModelExportError(f"{directory}'s weights lack layers {sorted(expected_blocks - blocks)}")
    return sources


def _stored_dtype(shape: tuple[int, ...], matrix_dtype: np.dtype) -> np.dtype:
    # As the converter does: vectors (norms, biases) stay f32, llama.cpp computes them in f32 anyway.
    return matrix_dtype if len(shape) >= 2 else np.dtype(np.float32)


def _converted_tensors(
    sources: list[_SourceTensor], config: dict[str, Any], architecture: _Architecture
) -> Iterator[tuple[_SourceTensor, np.ndarray]]:
    """The weights in `sources` order, one loaded at a time, in float32 with llama.cpp's layout."""
    head_count = config["num_attention_heads"]
    head_count_kv = config.get("num_key_value_heads") or head_count
    for path, group in groupby(sources, key=lambda source: source.file):
        with safe_open(path, framework="pt") as weights:
            for source in group:
                tensor = weights.get_tensor(source.name).to(torch.float32)
                if architecture.permutes_query_and_key_rows:
                    if source.name.endswith(("q_proj.weight", "q_proj.bias")):
                        tensor = _interleave_rotary_rows(tensor, head_count)
                    elif source.name.endswith(("k_proj.weight", "k_proj.bias")):
                        tensor = _interleave_rotary_rows(tensor, head_count_kv)
                if architecture.adds_one_to_norm_weights and source.name.endswith("norm.weight"):
                    tensor = tensor + 1
                yield source, tensor.numpy()


def _interleave_rotary_rows(tensor: torch.Tensor, head_count: int) -> torch.Tensor:
    """Each head's rows [first half, second half] become [h0, s0, h1, s1, ...] (LlamaModel.permute)."""
    rows = tensor.shape[0]
    by_head = tensor.reshape(head_count, 2, rows // head_count // 2, *tensor.shape[1:])
    return by_head.swapaxes(1, 2).reshape(tensor.shape)


def _llama3_rope_factors(config: dict[str, Any]) -> np.ndarray | None:
    """Llama 3.1+ stretches low rope frequencies; llama.cpp reads the per-frequency divisors from a
    rope_freqs tensor, computed here as the converter computes it (LlamaModel.generate_extra_tensors)."""
    rope = _rope_parameters(config)
    if rope["rope_type"] != "llama3":
        return None
    dimension = _head_dimension(config)
    frequencies = 1.0 / (rope["rope_theta"] ** (np.arange(0, dimension, 2, dtype=np.float32) / dimension))
    factor = rope.get("factor", 8.0)
    low_frequency_factor = rope.get("low_freq_factor", 1.0)
    high_frequency_factor = rope.get("high_freq_factor", 4.0)
    original_context = rope.get("original_max_position_embeddings", 8192)
    low_frequency_wavelength = original_context / low_frequency_factor
    high_frequency_wavelength = original_context / high_frequency_factor
    factors = []
    for frequency in frequencies:
        wavelength = 2 * math.pi / frequency
        if wavelength < high_frequency_wavelength:
            factors.append(1.0)
        elif wavelength > low_frequency_wavelength:
            factors.append(factor)
        else:
            smooth = (original_context / wavelength - low_frequency_factor) / (
                high_frequency_factor - low_frequency_factor
            )
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)
