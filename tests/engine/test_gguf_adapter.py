"""LoRA export to GGUF: llama.cpp applies the exported adapter as peft does, and bad pairs are refused."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file

from compute_swarm.engine.artifacts import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from compute_swarm.engine.gguf_adapter import AdapterExportError, export_lora_to_gguf
from compute_swarm.engine.models import fetch_catalogue_model, load_causal_lm, prepared_model_directory
from tests.tiny_models import LLAMA_CPP_RELATIVE_TOLERANCE, TinyModel, llama_cpp_logits, transformers_logits

MODEL = "smollm2-135m-instruct"
PROMPTS = [
    b"The three primary colours are red, yellow and",
    b"def fibonacci(n):",
    b"Once upon a time, in a small village,",
    b"The capital of France is",
    b"Water boils at a temperature of",
]
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]
RANK, ALPHA = 8, 16
# llama.cpp multiplies Q4_1 weights with 8-bit quantized activations, which moves its logits 1-10%
# away from transformers'. Weights this large make the adapter's effect dwarf that noise; at 0.03
# even a correct export agrees only to a cosine of about 0.93.
LORA_WEIGHT_SCALE = 0.08


@pytest.fixture(scope="module")
def base_gguf() -> Path:
    return fetch_catalogue_model(MODEL)


@pytest.fixture(scope="module")
def random_adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[PeftModel, Path]:
    """A peft adapter on the real model with seeded random A and B, saved as the engine saves it.

    peft starts B at zero, which would make every export look right; random B makes each module count."""
    model = load_causal_lm(prepared_model_directory(MODEL), dtype=torch.float32)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGET_MODULES, lora_dropout=0.0)
    adapted = get_peft_model(model, config).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_" in name:
                parameter.copy_(LORA_WEIGHT_SCALE * torch.randn(parameter.shape, generator=generator))
    directory = tmp_path_factory.mktemp("adapter")
    adapted.save_pretrained(directory)
    return adapted, directory


@torch.no_grad()
def peft_logit_change(adapted: PeftModel, token_ids: list[int]) -> np.ndarray:
    """How the adapter changes the next-token logits, as peft computes it."""
    inputs = torch.tensor([token_ids])
    with_adapter = adapted(input_ids=inputs).logits[0, -1]
    with adapted.disable_adapter():
        without_adapter = adapted(input_ids=inputs).logits[0, -1]
    return (with_adapter - without_adapter).double().numpy()


def llama_cpp_next_token_logits(
    base_gguf: Path, prompts: list[list[int]], lora_path: Path | None
) -> list[np.ndarray]:
    import llama_cpp

    options = {"lora_path": str(lora_path)} if lora_path else {}
    llm = llama_cpp.Llama(
        model_path=str(base_gguf), n_ctx=256, seed=0, logits_all=False, verbose=False, **options
    )
    try:
        logits = []
        for token_ids in prompts:
            llm.reset()
            llm.eval(token_ids)
            # Without logits_all, llama-cpp-python keeps no scores: read the last position from the context.
            last = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            logits.append(np.ctypeslib.as_array(last, shape=(llm.n_vocab(),)).astype(np.float64))
        return logits
    finally:
        llm.close()


@pytest.fixture(scope="module")
def exported_adapter(
    base_gguf: Path, random_adapter: tuple[PeftModel, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    output = tmp_path_factory.mktemp("exported") / "adapter.gguf"
    assert export_lora_to_gguf(random_adapter[1], base_gguf, output) == output
    return output


def test_the_exported_file_has_llama_cpp_adapter_metadata_and_names(exported_adapter: Path) -> None:
    exported = exported_adapter
    assert [path.name for path in exported.parent.iterdir()] == ["adapter.gguf"]  # no temporary file left
    reader = gguf.GGUFReader(exported)
    assert reader.get_field("general.type").contents() == "adapter"
    assert reader.get_field("general.architecture").contents() == "llama"
    assert reader.get_field("adapter.type").contents() == "lora"
    assert reader.get_field("adapter.lora.alpha").contents() == ALPHA
    shapes = {tensor.name: tuple(int(n) for n in tensor.shape) for tensor in reader.tensors}
    assert len(shapes) == 2 * len(TARGET_MODULES) * 30
    assert shapes["blk.29.attn_k.weight.lora_a"] == (576, RANK)  # ggml order: (in, rank)
    assert shapes["blk.29.attn_k.weight.lora_b"] == (RANK, 192)  # ggml order: (rank, out)
    assert shapes["blk.0.ffn_up.weight.lora_b"] == (RANK, 1536)
    assert {tensor.tensor_type for tensor in reader.tensors} == {gguf.GGMLQuantizationType.F32}


def test_llama_cpp_applies_the_exported_adapter_as_peft_does(
    base_gguf: Path, random_adapter: tuple[PeftModel, Path], exported_adapter: Path
) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    adapted = random_adapter[0]

    # Same token ids on both sides, so only the adapter's arithmetic is compared.
    vocabulary = llama_cpp.Llama(model_path=str(base_gguf), vocab_only=True, verbose=False)
    prompts = [vocabulary.tokenize(prompt) for prompt in PROMPTS]
    vocabulary.close()

    served_base = llama_cpp_next_token_logits(base_gguf, prompts, None)
    served_adapted = llama_cpp_next_token_logits(base_gguf, prompts, exported_adapter)
    agreement = []
    for token_ids, base_logits, adapted_logits in zip(prompts, served_base, served_adapted, strict=True):
        expected, served = peft_logit_change(adapted, token_ids), adapted_logits - base_logits
        cosine = expected @ served / (np.linalg.norm(expected) * np.linalg.norm(served))
        agreement.append(
            (round(float(cosine), 4), round(float(np.linalg.norm(served) / np.linalg.norm(expected)), 3))
        )
    # Measured: cosines 0.998-1.000 and norm ratios 0.95-1.05. Without the q/k row permutation two
    # prompts fall to 0.91 and 0.62; with alpha doubled or halved the norm ratios leave 0.8-1.25.
    assert all(cosine > 0.97 for cosine, _ in agreement), agreement
    assert all(0.8 < norm_ratio < 1.25 for _, norm_ratio in agreement), agreement


def write_adapter(directory: Path, weights: dict[str, torch.Tensor], **config_changes: object) -> Path:
    """A small adapter directory in peft's layout, for cases no training run would produce."""
    directory.mkdir()
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "use_rslora": False, **config_changes}
    (directory / ADAPTER_CONFIG_FILE).write_text(json.dumps(config))
    save_file(weights, directory / ADAPTER_WEIGHTS_FILE)
    return directory


def lora_pair(module: str, in_features: int, out_features: int) -> dict[str, torch.Tensor]:
    return {
        f"base_model.model.{module}.lora_A.weight": torch.ones(RANK, in_features),
        f"base_model.model.{module}.lora_B.weight": torch.ones(out_features, RANK),
    }


def test_rank_stabilised_lora_is_refused(base_gguf: Path, tmp_path: Path) -> None:
    adapter = write_adapter(
        tmp_path / "adapter", lora_pair("model.layers.0.self_attn.q_proj", 576, 576), use_rslora=True
    )
    with pytest.raises(AdapterExportError, match=r"use_rslora: .*alpha/sqrt\(rank\)"):
        export_lora_to_gguf(adapter, base_gguf, tmp_path / "adapter.gguf")
    assert list(tmp_path.glob("*.gguf")) == []


def test_a_base_model_of_an_unverified_architecture_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "phi3.gguf"
    writer = gguf.GGUFWriter(base, "phi3")
    writer.add_block_count(1)
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((64, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    adapter = write_adapter(tmp_path / "adapter", lora_pair("model.layers.0.self_attn.q_proj", 64, 64))
    with pytest.raises(
        AdapterExportError, match=r"phi3.gguf is a 'phi3' model; .* only for gemma2, llama, qwen2 models"
    ):
        export_lora_to_gguf(adapter, base, tmp_path / "adapter.gguf")
    assert not (tmp_path / "adapter.gguf").exists()


@pytest.mark.parametrize(
    ("module", "in_features", "out_features", "problem"),
    [
        (
            "model.layers.0.self_attn.gate_rotary",
            576,
            576,
            r"'model\.layers\.0\.self_attn\.gate_rotary' is not a",
        ),
        ("model.layers.30.self_attn.q_proj", 576, 576, r"with 30 blocks"),
        ("lm_head", 576, 49152, r"output\.weight, which SmolLM2-135M-Instruct\.Q4_1\.gguf does not have"),
        ("model.layers.2.self_attn.k_proj", 576, 256, r"blk\.2\.attn_k\.weight .* shape \(576, 192\)"),
    ],
    ids=["unknown-module", "layer-past-the-last", "lm-head-of-a-tied-model", "wrong-shape"],
)
def test_a_module_the_base_model_lacks_is_refused(
    base_gguf: Path, tmp_path: Path, module: str, in_features: int, out_features: int, problem: str
) -> None:
    weights = {
        **lora_pair("model.layers.0.self_attn.v_proj", 576, 192),
        **lora_pair(module, in_features, out_features),
    }
    adapter = write_adapter(tmp_path / "adapter", weights)
    with pytest.raises(AdapterExportError, match=problem):
        export_lora_to_gguf(adapter, base_gguf, tmp_path / "adapter.gguf")
    assert list(tmp_path.glob("*.gguf")) == []


TINY_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY_LORA_WEIGHT_SCALE = 0.1  # the adapter moves the tiny models' logits by about a third of their range


def test_llama_cpp_applies_an_adapter_to_each_architecture_as_peft_does(
    tiny_model: TinyModel, tmp_path: Path
) -> None:
    """On f32 models and an f32 KV cache, so the comparison is tight enough to catch any misplaced row."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model.directory, dtype=torch.float32)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TINY_TARGET_MODULES, lora_dropout=0.0)
    adapted = get_peft_model(model, config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_" in name:
                parameter.copy_(TINY_LORA_WEIGHT_SCALE * torch.randn(parameter.shape, generator=generator))
    adapted.save_pretrained(tmp_path / "adapter")
    exported = export_lora_to_gguf(tmp_path / "adapter", tiny_model.gguf_path, tmp_path / "adapter.gguf")

    token_ids = list(range(1000, 1024))  # longer than gemma2's sliding window
    expected = transformers_logits(adapted, token_ids)
    with adapted.disable_adapter():
        unadapted = transformers_logits(adapted, token_ids)
    served = llama_cpp_logits(tiny_model.gguf_path, token_ids, lora_path=exported)
    scale = np.abs(expected).max()
    assert np.abs(expected - unadapted).max() > 0.1 * scale  # the adapter matters
    difference = np.abs(served - expected).max() / scale
    assert difference < LLAMA_CPP_RELATIVE_TOLERANCE[tiny_model.architecture], difference
