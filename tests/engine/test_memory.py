"""engine.memory: the one memory estimate. The coordinator works out its figure from the catalogue's
record of a model's shape, and the node works out its own from the model's files. These tests check
that the two figures are the same, so the coordinator leases a job only where the node will run it."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from compute_swarm.coordinator.domain.scheduler import inference_memory_bytes, required_memory_bytes
from compute_swarm.engine.catalogue import fetch_catalogue_model
from compute_swarm.engine.jobs import CATALOGUE, DEFAULT_MODEL, LoraJobSpec
from compute_swarm.engine.memory import (
    CATALOGUE_SHAPES,
    DEFAULT_CONTEXT_TOKENS,
    GIB,
    MIB,
    PUBLISHED_SHAPES,
    ResourceError,
    base_quantization,
    catalogue_shape,
    decoder_shape,
    estimate_lora,
    free_bytes_needed,
    quantized_weight_bytes,
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


# Quantized bases, gradient checkpointing and the published models ----------------------------------


def qlora_spec(**fields: object) -> LoraJobSpec:
    settings: dict[str, object] = dict(
        rank=16, batch_size=1, max_sequence_length=512, gradient_checkpointing=True, quantization="nf4"
    )
    return demo_spec(**{**settings, **fields})


def test_the_published_models_shapes_have_their_published_parameter_counts() -> None:
    for name, (shape, published) in PUBLISHED_SHAPES.items():
        assert shape.parameters == published, name


def test_a_catalogue_model_with_its_own_shape_is_estimated_from_it() -> None:
    shape, parameters = PUBLISHED_SHAPES["Qwen2.5-7B"]
    model = types.SimpleNamespace(name="qwen2.5-7b", parameters=parameters, shape=shape)
    assert catalogue_shape(model) is shape  # type: ignore[arg-type]


def test_four_bit_weights_cost_what_qloras_paper_says() -> None:
    # 4 bits a weight, plus 0.127 bits of double-quantized block constants (QLoRA §3).
    bits = 8 * quantized_weight_bytes("nf4", 4096, 4096) / (4096 * 4096)
    assert bits == pytest.approx(4.127, abs=0.001)
    assert quantized_weight_bytes("fp4", 4096, 4096) == quantized_weight_bytes("nf4", 4096, 4096)
    assert quantized_weight_bytes("int8", 4096, 4096) == 4096 * 4096 + 4 * 4096


def test_fewer_bits_need_less_and_only_the_layers_are_quantized() -> None:
    shape, _ = PUBLISHED_SHAPES["Qwen2.5-7B"]
    estimates = {
        quantization: estimate_lora(
            qlora_spec(quantization=quantization), shape, device_kind="cuda", compute_dtype_bytes=2
        )
        for quantization in ("nf4", "int8", "none")
    }
    assert estimates["nf4"].total_bytes < estimates["int8"].total_bytes < estimates["none"].total_bytes
    assert estimates["none"].weights_bytes == shape.parameters * 2
    # The untied embedding and head (2 × 152,064 × 3,584) stay in bf16, norms and biases go to fp32.
    embeddings = 2 * 152_064 * 3584
    vectors = (2 * 28 + 1) * 3584 + 28 * (3584 + 2 * 512)
    linears = shape.parameters - embeddings - vectors
    assert estimates["nf4"].weights_bytes == pytest.approx(
        linears * 4.127 / 8 + embeddings * 2 + vectors * 4, rel=1e-3
    )
    # The activations do not depend on how the base is held (beyond the fp32 norm outputs).
    assert estimates["nf4"].activation_bytes - estimates["none"].activation_bytes == 2 * 512 * 3584 * 2


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_checkpointing_keeps_one_layers_activations_and_length_grows_them(quantization: str) -> None:
    shape, _ = PUBLISHED_SHAPES["Llama-3.1-8B"]

    def activations(**fields: object) -> int:
        spec = qlora_spec(quantization=quantization, **fields)
        return estimate_lora(spec, shape, device_kind="cuda", compute_dtype_bytes=2).activation_bytes

    for length in (512, 2048):
        full = activations(gradient_checkpointing=False, max_sequence_length=length)
        checkpointed = activations(gradient_checkpointing=True, max_sequence_length=length)
        assert checkpointed < full / 4
    assert activations(max_sequence_length=2048) > 3 * activations(max_sequence_length=512)
    assert activations(gradient_checkpointing=False, max_sequence_length=2048) > 4 * activations(
        gradient_checkpointing=False, max_sequence_length=512
    )  # the attention scores grow with the square of the length


def test_a_7b_qlora_job_fits_a_12_gb_card_and_not_an_8_gb_one() -> None:
    # A card's free memory: its VRAM (12 GB cards have 12 GiB) less 1 GiB the desktop keeps.
    for name in ("Qwen2.5-7B", "Llama-3.1-8B"):
        shape, _ = PUBLISHED_SHAPES[name]
        held = estimate_lora(qlora_spec(), shape, device_kind="cuda", compute_dtype_bytes=2).total_bytes
        assert usable_bytes(7 * GIB) < held <= usable_bytes(11 * GIB), name
        # In 16 bits it takes a 24 GB card.
        unquantized = estimate_lora(
            qlora_spec(quantization="none"), shape, device_kind="cuda", compute_dtype_bytes=2
        ).total_bytes
        assert usable_bytes(15 * GIB) < unquantized <= usable_bytes(23 * GIB), name


def test_a_job_falls_back_to_16_bits_only_where_allowed() -> None:
    assert base_quantization("nf4", False, "cuda") == "nf4"
    assert base_quantization("nf4", False, "cpu") == "nf4"
    assert base_quantization("nf4", False, "mps") is None
    assert base_quantization("nf4", True, "mps") == "none"
    assert base_quantization("none", False, "mps") == "none"


def test_quantization_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="allow_16bit_fallback applies only to a quantized base"):
        demo_spec(allow_16bit_fallback=True)
    with pytest.raises(ValueError, match="quantization"):
        demo_spec(quantization="nf3")


_PEAK_SCRIPT = """
import json, sys, torch
from compute_swarm.engine import lora
from compute_swarm.engine.jobs import LoraJobSpec
from compute_swarm.engine.models import DEFAULT_MODEL, load_tokenizer, prepared_model_directory
spec = LoraJobSpec.model_validate_json(sys.argv[1])
directory = prepared_model_directory(DEFAULT_MODEL)
precision = lora.choose_precision("cpu")
model = lora.build_model(spec, directory, "cpu", precision)
model.train()
tokens = torch.randint(0, 49152, (spec.batch_size, spec.max_sequence_length))
batch = {"input_ids": tokens, "labels": tokens, "attention_mask": torch.ones_like(tokens)}
lora.answer_loss_sum(model, batch, precision).backward()
# VmHWM is this program's own high-water mark; ru_maxrss would also count the parent's resident set,
# which Linux carries over when a (v)forked child calls exec: a large pytest process set it in CI.
status = open("/proc/self/status").read()
print(int(status.split("VmHWM:")[1].split()[0]) * 1024)
"""


def _measured_peak(spec: LoraJobSpec) -> int:
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, spec.model_dump_json()],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return int(result.stdout.split()[-1])


@pytest.mark.slow
def test_the_cpu_estimate_is_near_a_measured_peak(demo_model_directory: Path) -> None:
    shape = CATALOGUE_SHAPES[DEFAULT_MODEL]
    peaks, estimates = {}, {}
    for checkpointing in (False, True):
        spec = demo_spec(batch_size=2, max_sequence_length=256, gradient_checkpointing=checkpointing)
        peaks[checkpointing] = _measured_peak(spec)
        estimates[checkpointing] = estimate_lora(
            spec, shape, device_kind="cpu", compute_dtype_bytes=4
        ).total_bytes
    # The resident set counts the interpreter, the libraries and allocator slack as the estimate's
    # overhead does: within the USABLE_PERCENT reserve either way round.
    assert 0.8 * peaks[False] < estimates[False] < 1.25 * peaks[False], (estimates, peaks)
    # Checkpointed, the step holds less than loading the model did (safetensors' copies), which then
    # sets the peak: the estimate stays below it, and both fall.
    assert estimates[True] < 1.25 * peaks[True], (estimates, peaks)
    # Loading may set both peaks alike; the step itself never holds more with checkpointing.
    assert peaks[True] <= peaks[False] and estimates[True] < estimates[False]
