"""Tiny random models of the catalogue's architectures, as Hugging Face directories and as GGUFs.

Each keeps its real model's quirks (Llama 3.2's rope scaling and tied embeddings, Qwen2.5's q/k/v
biases, Mistral's untied output layer, Gemma 2's wide heads, soft-capping and sliding window) at sizes
that run in milliseconds, so export and adapter tests exercise real code paths without a download.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compute_swarm.engine.gguf_export import export_model_to_gguf

ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma2")
DEMO_MODEL = "smollm2-135m-instruct"
GGUF_NAME = "model.f32.gguf"

# Shared by every tiny model: the catalogue's sizes shrunk, still with grouped-query attention.
_SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}
# Largest difference between llama.cpp's logits (llama_cpp_logits) and transformers' in fp32, as a
# fraction of the largest logit. Both compute in f32 (weights and KV cache), so llama, qwen2 and
# mistral differ only by summation order: measured 4e-7. ggml's CPU GELU (gemma2's activation) goes
# through an f16 table: measured 9e-5. A q/k row permutation left out, or gemma's norms left
# un-shifted, gives 0.35 and 1.0.
LLAMA_CPP_RELATIVE_TOLERANCE = {"llama": 1e-5, "mistral": 1e-5, "qwen2": 1e-5, "gemma2": 5e-4}
# Gemma 2 attends within this window on every other layer; short, so test prompts cross it.
GEMMA2_SLIDING_WINDOW = 8


@dataclass(frozen=True)
class TinyModel:
    architecture: str
    directory: Path  # config.json, tokenizer files, model.safetensors
    gguf_path: Path  # the same model exported in f32


def save_demo_tokenizer(destination: Path) -> Path:
    """The demo model's tokenizer (a GPT-2 style BPE, 49152 tokens, with a chat template), read from
    its cached GGUF and saved as Hugging Face tokenizer files in `destination`."""
    from transformers import AutoTokenizer

    from compute_swarm.engine.catalogue import fetch_catalogue_model

    demo_gguf = fetch_catalogue_model(DEMO_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(demo_gguf.parent, gguf_file=demo_gguf.name)
    tokenizer.save_pretrained(destination)
    return destination


def tiny_config(architecture: str, vocabulary_size: int, special_token_ids: dict[str, int]):
    """A transformers config with the real model's features at tiny sizes."""
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = {**_SIZES, "vocab_size": vocabulary_size, **special_token_ids}
    if architecture == "llama":  # Llama 3.2 1B
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            # Real models: 8192 of 131072. Small enough here that some frequencies are stretched,
            # some kept and some blended, so every branch of the rope factors is used.
            "original_max_position_embeddings": 1024,
        }
        return LlamaConfig(**common, rms_norm_eps=1e-5, rope_parameters=rope, tie_word_embeddings=True)
    if architecture == "qwen2":  # Qwen2.5 0.5B: q/k/v biases are built into the architecture
        rope = {"rope_type": "default", "rope_theta": 1000000.0}
        return Qwen2Config(**common, rms_norm_eps=1e-6, rope_parameters=rope, tie_word_embeddings=True)
    if architecture == "mistral":  # Mistral 7B v0.3: no sliding window, untied output layer
        rope = {"rope_type": "default", "rope_theta": 1000000.0}
        return MistralConfig(
            **common, rms_norm_eps=1e-5, rope_parameters=rope, sliding_window=None, tie_word_embeddings=False
        )
    if architecture == "gemma2":  # Gemma 2 2B: heads wider than hidden/heads (32, not 16)
        rope = {"rope_type": "default", "rope_theta": 10000.0}
        return Gemma2Config(
            **common,
            head_dim=32,
            query_pre_attn_scalar=32,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            sliding_window=GEMMA2_SLIDING_WINDOW,
            rms_norm_eps=1e-6,
            rope_parameters=rope,
            tie_word_embeddings=True,
        )
    raise ValueError(f"no tiny {architecture!r} model; choose from {', '.join(ARCHITECTURES)}")


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that attention is far from uniform and every bias and norm matters: with
    transformers' initialisation (std 0.02, zero biases, unit norms) a wrongly ordered q/k row or a
    norm off by one would barely move the logits."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        noise = torch.randn(parameter.shape, generator=generator)
        if parameter.ndim == 1:
            # Gemma stores its norms as offsets from one; the others as the scale itself.
            centre = 0.0 if "norm" not in name or "gemma" in type(model).__name__.lower() else 1.0
            parameter.copy_(centre + 0.2 * noise)
        elif "embed_tokens" in name:
            parameter.copy_(noise)
        else:
            parameter.copy_(noise / parameter.shape[1] ** 0.5)


def build_tiny_model(architecture: str, directory: Path, *, tokenizer_source: Path) -> TinyModel:
    """Save a tiny random `architecture` model with the tokenizer in `tokenizer_source` to `directory`,
    and its f32 GGUF beside the Hugging Face files."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    special_token_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = tiny_config(architecture, len(tokenizer), special_token_ids)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed=ARCHITECTURES.index(architecture))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    gguf_path = export_model_to_gguf(directory, directory / GGUF_NAME, dtype="f32")
    return TinyModel(architecture, directory, gguf_path)


def llama_cpp_logits(gguf_path: Path, token_ids: list[int], lora_path: Path | None = None) -> np.ndarray:
    """llama.cpp's logits at every position of `token_ids`, (positions, vocabulary), float64.

    The KV cache is kept in f32: llama.cpp's default f16 cache alone moves logits by ~2e-4 of their
    range, which would hide the small errors these comparisons are there to catch."""
    import llama_cpp

    options = {"lora_path": str(lora_path)} if lora_path else {}
    llm = llama_cpp.Llama(
        model_path=str(gguf_path),
        n_ctx=256,
        n_threads=2,
        logits_all=True,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        verbose=False,
        **options,
    )
    try:
        llm.eval(token_ids)
        return np.array(llm.scores[: len(token_ids)], dtype=np.float64)
    finally:
        llm.close()


@torch.no_grad()
def transformers_logits(model: torch.nn.Module, token_ids: list[int]) -> np.ndarray:
    """The same as llama_cpp_logits, from a transformers (or peft) model in fp32."""
    return model(input_ids=torch.tensor([token_ids])).logits[0].double().numpy()
