"""Our attention inside transformers: a LoRA training step of the engine with the Triton kernel selected
gives the loss and gradients eager attention gives (a tiny llama, padded batches, grouped-query heads)."""

from __future__ import annotations

import pytest
import torch

from compute_swarm.engine import datasets, lora, models
from compute_swarm.engine.jobs import LoraJobSpec
from compute_swarm.kernels import attention as dispatch

pytest.importorskip("triton", reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def training_step(spec, directory, backend, monkeypatch):
    """(loss, {lora parameter name: gradient}) of one step from the same seed."""
    monkeypatch.setenv(dispatch.SETTING, backend)
    lora.seed_everything(spec.seed)
    precision = lora.choose_precision(DEVICE)
    model = lora.build_model(spec, directory, DEVICE, precision)
    assert model.config._attn_implementation == ("swarm" if backend == "triton" else backend)
    tokenizer = models.load_tokenizer(directory)
    examples = datasets.tokenize_dataset(
        datasets.read_jsonl(spec.dataset), tokenizer, spec.max_sequence_length
    )
    batch = lora.collate(examples[:3], tokenizer.pad_token_id, DEVICE)
    assert (batch["attention_mask"] == 0).any()  # padded rows: the kernel gets a padding mask
    model.train()
    loss = lora.answer_loss_sum(model, batch, precision) / lora.predicted_label_count(batch)
    loss.backward()
    gradients = {
        name: parameter.grad.float().clone()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }
    return loss.item(), gradients


def test_a_lora_step_with_our_kernel_matches_eager_attention(tiny_model_directory, tmp_path, monkeypatch):
    rows = [
        '{"messages": [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "Ahoy! 5."}]}',
        '{"prompt": "The sky is", "completion": " blue, as it has always been on a clear day."}',
        '{"messages": [{"role": "user", "content": "Name a colour, please, any colour at all."}, {"role": "assistant", "content": "Red."}]}',
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(rows) + "\n")
    spec = LoraJobSpec(
        base_model=str(tiny_model_directory),
        dataset=str(tmp_path / "data.jsonl"),
        max_steps=1,
        dropout=0.0,
        max_sequence_length=48,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
    )
    eager_loss, eager_gradients = training_step(spec, tiny_model_directory, "eager", monkeypatch)
    our_loss, our_gradients = training_step(spec, tiny_model_directory, "triton", monkeypatch)
    assert our_loss == pytest.approx(eager_loss, rel=1e-5)
    assert eager_gradients.keys() == our_gradients.keys() and len(our_gradients) == 2 * 4 * 2
    for name, gradient in eager_gradients.items():
        scale = gradient.abs().max().item()
        assert (our_gradients[name] - gradient).abs().max().item() <= 1e-4 * scale + 1e-7, name
