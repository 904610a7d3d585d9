"""engine.memory: the one memory estimate. The coordinator works out its figure from the catalogue's
record of a model's shape, and the node works out its own from the model's files. These tests check
that the two figures are the same, so the coordinator leases a job only where the node will run it."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from compute_swarm.coordinator.domain.scheduler import inference_memory_bytes, required_memory_bytes
from compute_swarm.engine.catalogue import fetch_catalogue_model
from compute_swarm.engine.jobs import CATALOGUE, DEFAULT_MODEL, LoraJobSpec
from compute_swarm.engine.memory import (
    CATALOGUE_SHAPES,
    DEFAULT_CONTEXT_TOKENS,
    MIB,
    ResourceError,
    catalogue_shape,
    decoder_shape,
    estimate_lora,
    free_bytes_needed,
    usable_bytes,
)
from compute_swarm.engine.resources import (
    InsufficientMemoryError,
    check_fits,
    estimate_inference_memory,
    estimate_lora_memory,
    model_shape,
    read_weight_shapes,
)

DEMO_MODEL = CATALOGUE[DEFAULT_MODEL]
# SmolLM2-1.7B's config.json, for a model bigger than the catalogue's.
SMOLLM2_1_7B = {
    "layer_count": 24,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "attention_heads": 32,
    "key_value_heads": 32,
    "vocabulary_size": 49_152,
}


def demo_spec(**fields: object) -> LoraJobSpec:
    return LoraJobSpec(base_model=DEFAULT_MODEL, dataset="data.jsonl", max_steps=30, **fields)


def hugging_face_shapes(
    *,
    layer_count: int,
    hidden_size: int,
    intermediate_size: int,
    attention_heads: int,
    key_value_heads: int,
    vocabulary_size: int,
    tied_embeddings: bool,
) -> dict[str, tuple[int, ...]]:
    """The weight shapes transformers writes for a Llama-style model of this config."""
    key_value_width = key_value_heads * hidden_size // attention_heads
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocabulary_size, hidden_size),
        "model.norm.weight": (hidden_size,),
    }
    if not tied_embeddings:
        shapes["lm_head.weight"] = (vocabulary_size, hidden_size)
    for layer in range(layer_count):
        prefix = f"model.layers.{layer}."
        shapes |= {
            prefix + "input_layernorm.weight": (hidden_size,),
            prefix + "post_attention_layernorm.weight": (hidden_size,),
            prefix + "self_attn.q_proj.weight": (hidden_size, hidden_size),
            prefix + "self_attn.k_proj.weight": (key_value_width, hidden_size),
            prefix + "self_attn.v_proj.weight": (key_value_width, hidden_size),
            prefix + "self_attn.o_proj.weight": (hidden_size, hidden_size),
            prefix + "mlp.gate_proj.weight": (intermediate_size, hidden_size),
            prefix + "mlp.up_proj.weight": (intermediate_size, hidden_size),
            prefix + "mlp.down_proj.weight": (hidden_size, intermediate_size),
        }
    return shapes


# The catalogue's records -------------------------------------------------------------------------------


def test_every_catalogue_model_has_its_shape_recorded() -> None:
    for model in CATALOGUE.values():
        assert catalogue_shape(model).parameters == model.parameters


def test_a_shape_recorded_for_another_model_is_not_used() -> None:
    with pytest.raises(ResourceError, match="no shape is recorded for model 'elsewhere'"):
        catalogue_shape(dataclasses.replace(DEMO_MODEL, name="elsewhere"))
    with pytest.raises(ResourceError, match="with 135,000,000 parameters"):
        catalogue_shape(dataclasses.replace(DEMO_MODEL, parameters=135_000_000))


@pytest.mark.parametrize("tied_embeddings", [True, False])
def test_a_decoder_shape_is_what_the_node_reads_from_such_a_model(tied_embeddings: bool) -> None:
    shapes = hugging_face_shapes(**SMOLLM2_1_7B, tied_embeddings=tied_embeddings)

    read = model_shape(shapes, attention_heads=SMOLLM2_1_7B["attention_heads"])

    assert read == decoder_shape(**SMOLLM2_1_7B, tied_embeddings=tied_embeddings)
    assert read.parameters == (1_711_376_384 if tied_embeddings else 1_711_376_384 + 49_152 * 2048)


def test_the_recorded_shape_is_the_one_the_node_reads_from_the_demo_models_files(
    demo_model_directory: Path,
) -> None:
    recorded = CATALOGUE_SHAPES[DEFAULT_MODEL]
    heads = json.loads((demo_model_directory / "config.json").read_text())["num_attention_heads"]

    # The prepared directory, with its config's heads, as engine.lora.check_memory reads it.
    assert model_shape(read_weight_shapes(demo_model_directory), attention_heads=heads) == recorded
    # The GGUF, before it is prepared: its heads are derived from the query width, and its
    # embedding keeps llama.cpp's name.
    from_gguf = model_shape(read_weight_shapes(fetch_catalogue_model(DEFAULT_MODEL)))
    linear_weights = dict(from_gguf.linear_weights)
    linear_weights["embed_tokens"] = linear_weights.pop("token_embd")
    assert dataclasses.replace(from_gguf, linear_weights=linear_weights) == recorded


# The coordinator's figure is the node's ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "device", "weight_bytes"),
    [("cuda", "cuda:0", 2), ("rocm", "cuda:0", 2), ("mps", "mps", 4), ("cpu", "cpu", 4)],
)
@pytest.mark.parametrize(
    "spec",
    [demo_spec(), demo_spec(batch_size=1, max_sequence_length=256, rank=64, dropout=0.0)],
    ids=["demo", "small-batch"],
)
def test_a_node_leased_a_job_finds_it_fits(
    demo_model_directory: Path, spec: LoraJobSpec, backend: str, device: str, weight_bytes: int
) -> None:
    required = required_memory_bytes(spec, DEMO_MODEL, backend=backend)

    for weights in (demo_model_directory, fetch_catalogue_model(DEFAULT_MODEL)):
        estimate = estimate_lora_memory(
            spec, read_weight_shapes(weights), device=device, compute_dtype_bytes=weight_bytes
        )
        check_fits(estimate, available_bytes=required, device=device)
        if backend == "cpu":
            # The fp32 figure serves MPS nodes too, whose runtime takes 100 MiB more than the CPU's:
            # a CPU node with up to about 111 MiB less free could still have run it.
            assert 0 < required - free_bytes_needed(estimate.total_bytes) <= free_bytes_needed(100 * MIB)
        else:
            # One byte less, and the node would have refused it: the coordinator does not leave out a
            # node that could run the job either.
            with pytest.raises(InsufficientMemoryError):
                check_fits(estimate, available_bytes=required - 1, device=device)


def test_a_node_chosen_to_serve_a_model_finds_it_fits() -> None:
    gguf = fetch_catalogue_model(DEFAULT_MODEL)
    adapter = gguf  # any file stands for an adapter: only its size counts
    for adapter_path, adapter_size in ((None, 0), (adapter, adapter.stat().st_size)):
        held = estimate_inference_memory(gguf, adapter_path, DEFAULT_CONTEXT_TOKENS)
        assert inference_memory_bytes(DEMO_MODEL, adapter_size) == free_bytes_needed(held)


# The arithmetic ----------------------------------------------------------------------------------------


def test_the_headroom_reads_the_same_both_ways_round() -> None:
    for held in [0, 1, 8, 9, 10, 89, 90, 91, 5_422_846_592, 10**12 + 7]:
        needed = free_bytes_needed(held)
        assert usable_bytes(needed) >= held
        assert needed == 0 or usable_bytes(needed - 1) < held


@pytest.mark.parametrize("weight_bytes", [2, 4])
def test_a_bigger_model_needs_more(weight_bytes: int) -> None:
    smollm2_360m = decoder_shape(
        layer_count=32,
        hidden_size=960,
        intermediate_size=2560,
        attention_heads=15,
        key_value_heads=5,
        vocabulary_size=49_152,
        tied_embeddings=True,
    )
    shapes = [
        CATALOGUE_SHAPES[DEFAULT_MODEL],
        smollm2_360m,
        decoder_shape(**SMOLLM2_1_7B, tied_embeddings=True),
    ]
    totals = [
        estimate_lora(demo_spec(), shape, device_kind="cuda", compute_dtype_bytes=weight_bytes).total_bytes
        for shape in shapes
    ]
    assert totals == sorted(set(totals))


def test_nonsense_is_refused() -> None:
    shape = CATALOGUE_SHAPES[DEFAULT_MODEL]
    with pytest.raises(ResourceError, match="unknown device kind 'tpu'"):
        estimate_lora(demo_spec(), shape, device_kind="tpu", compute_dtype_bytes=2)
    with pytest.raises(ResourceError, match="compute_dtype_bytes"):
        estimate_lora(demo_spec(), shape, device_kind="cpu", compute_dtype_bytes=1)
    with pytest.raises(ResourceError, match="match no weight in this model; it has down_proj, embed_tokens"):
        estimate_lora(demo_spec(target_modules=("c_attn",)), shape, device_kind="cpu", compute_dtype_bytes=4)


def test_importing_the_module_imports_nothing_heavy() -> None:
    # The coordinator imports it, on a small VM without torch.
    code = "import sys, compute_swarm.engine.memory; print(sorted({'torch', 'transformers', 'peft', 'gguf', 'numpy', 'safetensors'} & {m.split('.')[0] for m in sys.modules}))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"
