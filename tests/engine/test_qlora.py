"""QLoRA: a LoRA fine-tune of a base held in 4 or 8 bits by bitsandbytes. Where bitsandbytes runs
(its CPU backend here) the base really is quantized and the adapter learns; where it cannot, the job is
refused before anything loads, or runs unquantized when the buyer allows, and says so."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from compute_swarm.engine import artifacts, lora, resources
from compute_swarm.engine.jobs import LoraJobSpec
from compute_swarm.engine.memory import MINIMUM_BITSANDBYTES, estimate_lora
from compute_swarm.engine.records import Log, Record
from tests.engine.test_lora import tiny_spec

BITSANDBYTES_VERSION = ".".join(map(str, MINIMUM_BITSANDBYTES))


def qlora_spec(model: Path, data: Path, **changes: object) -> LoraJobSpec:
    return tiny_spec(model, data, **{"quantization": "nf4", **changes})


@pytest.fixture
def without_bitsandbytes(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry makes `import bitsandbytes` raise ImportError, as on a node that lacks it.
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)


def test_a_quantized_job_is_refused_before_loading_where_bitsandbytes_is_missing(
    tiny_model_directory: Path, chat_dataset: Path, tmp_path: Path, without_bitsandbytes: None
) -> None:
    spec = qlora_spec(tiny_model_directory, chat_dataset)

    with pytest.raises(lora.QuantizationUnavailableError, match="bitsandbytes is not installed") as refusal:
        lora.check_memory(spec, "cpu")
    assert "does not allow the 16-bit fallback" in str(refusal.value)
    # The worker reports it as insufficient_memory: the coordinator gives the job to another node
    # without counting an attempt, and keeps it off this one.
    assert isinstance(refusal.value, resources.InsufficientMemoryError)

    output = tmp_path / "out"
    with pytest.raises(lora.QuantizationUnavailableError):
        lora.train_lora(spec, output)
    assert not output.exists()


def test_with_the_buyers_leave_it_runs_unquantized_and_says_so(
    tiny_model_directory: Path, chat_dataset: Path, tmp_path: Path, without_bitsandbytes: None
) -> None:
    spec = qlora_spec(tiny_model_directory, chat_dataset, allow_16bit_fallback=True, max_steps=2)
    records: list[Record] = []

    estimate = lora.check_memory(spec, "cpu")
    completed = lora.train_lora(spec, tmp_path / "out", report=records.append)

    assert estimate.quantization == "none"
    assert completed.steps == 2
    warnings = [record.message for record in records if isinstance(record, Log) and record.level == "warning"]
    assert any("training with the base unquantized, in float32" in message for message in warnings), warnings
    assert any("bitsandbytes is not installed" in message for message in warnings)


def test_bitsandbytes_is_not_used_on_apple_gpus() -> None:
    problem = lora.quantization_problem("nf4", "mps")
    assert problem is not None and "not on mps" in problem


@pytest.mark.parametrize("quantization", ["nf4", "fp4", "int8"])
def test_a_quantized_base_trains_on_the_cpu_and_holds_what_the_estimate_says(
    tiny_model_directory: Path, chat_dataset: Path, tmp_path: Path, quantization: str
) -> None:
    bitsandbytes = pytest.importorskip(
        "bitsandbytes",
        minversion=BITSANDBYTES_VERSION,
        reason=f"bitsandbytes >= {BITSANDBYTES_VERSION} (the qlora extra) is not installed",
    )
    spec = qlora_spec(
        tiny_model_directory, chat_dataset, quantization=quantization, gradient_checkpointing=True
    )
    precision = lora.choose_precision("cpu")

    model = lora.build_model(spec, tiny_model_directory, "cpu", precision, quantization=quantization)

    # Every projection of the layers is quantized; the embeddings stay in the compute dtype.
    layer = model.base_model.model.model.layers[0]
    quantized_type = bitsandbytes.nn.Linear8bitLt if quantization == "int8" else bitsandbytes.nn.Linear4bit
    assert isinstance(layer.mlp.down_proj, quantized_type)
    assert isinstance(layer.self_attn.q_proj.base_layer, quantized_type)
    assert model.base_model.model.model.embed_tokens.weight.dtype == precision.weights_dtype
    # What bitsandbytes holds is what the estimate counts: the weights with their quantization
    # constants (4-bit: the double-quantized absmax and its own constants; 8-bit: a scale a row).
    held = sum(
        parameter.numel() * parameter.element_size() for parameter in model.base_model.model.parameters()
    )
    held -= sum(
        parameter.numel() * parameter.element_size()
        for name, parameter in model.named_parameters()
        if "lora_" in name
    )
    for module in model.modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            state = module.weight.quant_state
            held += state.absmax.nbytes + state.state2.absmax.nbytes
        elif isinstance(module, bitsandbytes.nn.Linear8bitLt):
            held += module.weight.SCB.nbytes
    shape = resources.model_shape(resources.read_weight_shapes(tiny_model_directory), attention_heads=4)
    estimate = estimate_lora(spec, shape, device_kind="cpu", compute_dtype_bytes=4)
    assert estimate.weights_bytes == pytest.approx(held, rel=0.01)

    completed = lora.train_lora(spec, tmp_path / "out")

    losses = json.loads((tmp_path / "out" / "metrics.json").read_text())["loss"]
    assert completed.steps == 6 and all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0]  # the adapter learns on top of the quantized base
    assert (tmp_path / "out" / artifacts.ADAPTER_WEIGHTS_FILE).is_file()
