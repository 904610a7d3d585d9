"""Model export to GGUF: llama.cpp serves each architecture as transformers runs it, and bad input is refused."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from compute_swarm.engine.gguf_export import ModelExportError, export_model_to_gguf
from tests.tiny_models import (
    GEMMA2_SLIDING_WINDOW,
    GGUF_NAME,
    LLAMA_CPP_RELATIVE_TOLERANCE,
    TinyModel,
    llama_cpp_logits,
    transformers_logits,
)

# Longer than gemma2's sliding window, with digits and punctuation for the pre-tokenizer.
PROMPT = "The three primary colours are red, yellow and blue; 1234 mixed with 56 gives brown."
GGUF_ARCHITECTURE = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma2": "gemma2"}


def served_metadata(path: Path) -> dict[str, str]:
    """The GGUF's scalar metadata as llama.cpp reads it (gguf.GGUFReader takes ~4 s on 49152 tokens)."""
    import llama_cpp

    vocabulary = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return dict(vocabulary.metadata)
    finally:
        vocabulary.close()


def test_llama_cpp_tokenizes_and_computes_as_transformers(tiny_model: TinyModel) -> None:
    import llama_cpp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    token_ids = AutoTokenizer.from_pretrained(tiny_model.directory)(PROMPT)["input_ids"]
    assert len(token_ids) > GEMMA2_SLIDING_WINDOW
    vocabulary = llama_cpp.Llama(model_path=str(tiny_model.gguf_path), vocab_only=True, verbose=False)
    assert vocabulary.tokenize(PROMPT.encode(), add_bos=False) == token_ids
    vocabulary.close()

    model = AutoModelForCausalLM.from_pretrained(tiny_model.directory, dtype=torch.float32).eval()
    expected = transformers_logits(model, token_ids)
    served = llama_cpp_logits(tiny_model.gguf_path, token_ids)
    difference = np.abs(served - expected).max() / np.abs(expected).max()
    assert difference < LLAMA_CPP_RELATIVE_TOLERANCE[tiny_model.architecture], difference


def test_the_gguf_carries_the_hyperparameters_and_chat_template(tiny_model: TinyModel) -> None:
    metadata = served_metadata(tiny_model.gguf_path)
    config = json.loads((tiny_model.directory / "config.json").read_text())
    architecture = GGUF_ARCHITECTURE[tiny_model.architecture]
    assert metadata["general.architecture"] == architecture
    assert metadata[f"{architecture}.context_length"] == "2048"
    assert metadata[f"{architecture}.block_count"] == "2"
    assert metadata[f"{architecture}.attention.head_count_kv"] == "2"
    assert metadata["tokenizer.ggml.model"] == "gpt2"
    assert metadata["tokenizer.ggml.pre"] == "smollm"  # the demo tokenizer's, as llama.cpp names it
    assert metadata["tokenizer.chat_template"] == (tiny_model.directory / "chat_template.jinja").read_text()
    assert metadata["tokenizer.ggml.eos_token_id"] == str(config["eos_token_id"])
    if tiny_model.architecture == "gemma2":
        assert metadata["gemma2.attention.key_length"] == "32"  # not hidden/heads = 16
        assert metadata["gemma2.attention.sliding_window"] == str(GEMMA2_SLIDING_WINDOW)
        assert float(metadata["gemma2.final_logit_softcapping"]) == 30.0
        assert float(metadata["gemma2.attn_logit_softcapping"]) == 50.0


# Llama is left out: its GGUF takes the same path through transformers as Mistral's (architecture
# "llama", q/k rows un-permuted), and each load costs ~12 s, mostly gguf-py reading 49152 tokens twice.
@pytest.mark.parametrize("architecture", ["mistral", "qwen2", "gemma2"])
def test_transformers_loads_the_gguf_back_with_the_same_weights(
    tiny_models: Callable[[str], TinyModel], architecture: str
) -> None:
    from transformers import AutoModelForCausalLM

    tiny_model = tiny_models(architecture)

    original = AutoModelForCausalLM.from_pretrained(tiny_model.directory, dtype=torch.float32).state_dict()
    loaded = AutoModelForCausalLM.from_pretrained(
        tiny_model.directory, gguf_file=GGUF_NAME, dtype=torch.float32
    ).state_dict()
    assert loaded.keys() == original.keys()
    for name, weight in original.items():
        # Gemma's norms come back through "+1" and "-1" in f32, the rest bit for bit.
        torch.testing.assert_close(loaded[name], weight, rtol=0, atol=1e-6, msg=name)


def test_f16_export_halves_the_file_and_serves_nearly_the_same_logits(
    tiny_llama: TinyModel, tmp_path: Path
) -> None:
    output = export_model_to_gguf(tiny_llama.directory, tmp_path / "model.f16.gguf")
    # Not quite half: the tokens and merges (about 1.7 MB) take the same room in both.
    assert output.stat().st_size < 0.6 * tiny_llama.gguf_path.stat().st_size
    assert served_metadata(output)["general.file_type"] == str(int(gguf.LlamaFileType.MOSTLY_F16))
    token_ids = list(range(100, 120))
    full = llama_cpp_logits(tiny_llama.gguf_path, token_ids)
    half = llama_cpp_logits(output, token_ids)
    assert np.abs(half - full).max() < 2e-2 * np.abs(full).max()  # f16 keeps about 3 decimal digits


def copy_without_weights(tiny_model: TinyModel, destination: Path) -> Path:
    destination.mkdir()
    for path in tiny_model.directory.iterdir():
        if path.suffix not in (".safetensors", ".gguf"):
            shutil.copy(path, destination)
    return destination


def edit_json(path: Path, **changes: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_sharded_checkpoint_exports_as_one_file(tiny_llama: TinyModel, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    sharded = copy_without_weights(tiny_llama, tmp_path / "sharded")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama.directory, dtype=torch.float32)
    model.save_pretrained(sharded, max_shard_size="2MB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    output = export_model_to_gguf(sharded, tmp_path / "sharded.gguf", dtype="f32")
    token_ids = list(range(100, 120))
    np.testing.assert_array_equal(
        llama_cpp_logits(output, token_ids), llama_cpp_logits(tiny_llama.gguf_path, token_ids)
    )

    (sharded / sorted(sharded.glob("*.safetensors"))[-1].name).unlink()
    with pytest.raises(
        ModelExportError, match=r"lacks weight files its model\.safetensors\.index\.json names"
    ):
        export_model_to_gguf(sharded, tmp_path / "broken.gguf")
    assert not (tmp_path / "broken.gguf").exists()


def test_an_unsupported_architecture_is_refused(tiny_llama: TinyModel, tmp_path: Path) -> None:
    directory = copy_without_weights(tiny_llama, tmp_path / "phi")
    edit_json(directory / "config.json", architectures=["Phi3ForCausalLM"])
    with pytest.raises(ModelExportError, match=r"Phi3ForCausalLM; only LlamaForCausalLM, .* can be exported"):
        export_model_to_gguf(directory, tmp_path / "model.gguf")
    assert list(tmp_path.glob("*.gguf")) == []


def test_a_tokenizer_that_is_not_byte_level_bpe_is_refused(tiny_llama: TinyModel, tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    directory = copy_without_weights(tiny_llama, tmp_path / "word-level")
    Tokenizer(WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>")).save(str(directory / "tokenizer.json"))
    with pytest.raises(ModelExportError, match=r"is a 'WordLevel' tokenizer; only byte-level .* BPE"):
        export_model_to_gguf(directory, tmp_path / "model.gguf")


def test_a_pre_tokenizer_llama_cpp_does_not_know_is_refused(tiny_llama: TinyModel, tmp_path: Path) -> None:
    directory = copy_without_weights(tiny_llama, tmp_path / "odd-split")
    description = json.loads((directory / "tokenizer.json").read_text())
    description["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [{"type": "WhitespaceSplit"}, description["pre_tokenizer"]],
    }
    (directory / "tokenizer.json").write_text(json.dumps(description))
    with pytest.raises(
        ModelExportError, match=r"splits text in a way llama\.cpp's known pre-tokenizers do not"
    ):
        export_model_to_gguf(directory, tmp_path / "model.gguf")


def test_a_directory_without_weights_is_refused(tiny_llama: TinyModel, tmp_path: Path) -> None:
    directory = copy_without_weights(tiny_llama, tmp_path / "no-weights")
    with pytest.raises(ModelExportError, match=r"has no \.safetensors weights"):
        export_model_to_gguf(directory, tmp_path / "model.gguf")
    (directory / "config.json").unlink()
    with pytest.raises(ModelExportError, match=r"not a Hugging Face model directory: it has no config\.json"):
        export_model_to_gguf(directory, tmp_path / "model.gguf")
    assert list(tmp_path.glob("*.gguf")) == []
