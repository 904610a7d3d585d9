"""LoRA training: it learns, it is deterministic, it resumes exactly, and stock peft reads its output."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from compute_swarm.engine import artifacts, lora
from compute_swarm.engine.checkpoints import CheckpointError, latest_checkpoint
from compute_swarm.engine.datasets import read_jsonl, tokenize_dataset
from compute_swarm.engine.jobs import InvalidJobError, LoraJobSpec
from compute_swarm.engine.records import CheckpointSaved, Progress

ADAPTER_FILES = (artifacts.ADAPTER_CONFIG_FILE, artifacts.ADAPTER_WEIGHTS_FILE)


def adapter_bytes(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in ADAPTER_FILES}


def tiny_spec(model: Path, data: Path, **changes) -> LoraJobSpec:
    settings = dict(
        base_model=str(model),
        dataset=str(data),
        max_steps=6,
        batch_size=2,
        max_sequence_length=48,
        learning_rate=5e-3,
        dropout=0.1,
        eval_fraction=0.2,
        seed=3,
    )
    return LoraJobSpec(**{**settings, **changes})


@torch.no_grad()
def mean_answer_loss(model, tokenizer, data: Path) -> float:
    examples = tokenize_dataset(read_jsonl(data), tokenizer, max_length=64)
    batch = lora.collate(examples, tokenizer.pad_token_id, "cpu")
    precision = lora.choose_precision("cpu")
    return float(lora.answer_loss_sum(model, batch, precision)) / lora.predicted_label_count(batch)


def test_fine_tuning_smollm2_lowers_the_loss_and_stock_peft_loads_the_adapter(
    demo_model_directory: Path, chat_dataset: Path, tmp_path: Path
) -> None:
    spec = LoraJobSpec(
        base_model="smollm2-135m-instruct",
        dataset=str(chat_dataset),
        max_steps=8,
        batch_size=4,
        max_sequence_length=64,
        learning_rate=2e-3,
        dropout=0.0,
        eval_fraction=0.0,
        schedule="constant",
    )
    progress: list[Progress] = []
    completed = lora.train_lora(
        spec, tmp_path / "adapter", report=lambda r: progress.append(r) if isinstance(r, Progress) else None
    )
    assert completed.steps == 8 and len(progress) == 8
    losses = [record.loss for record in progress]
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:2]) / 2, losses
    assert progress[-1].tokens_per_second > 0 and progress[-1].eta_seconds == 0

    # What a buyer does with the result: stock transformers + peft, nothing of ours.
    tokenizer = AutoTokenizer.from_pretrained(demo_model_directory)
    base = AutoModelForCausalLM.from_pretrained(demo_model_directory, dtype=torch.float32)
    prompt = tokenizer("What is 3 plus 4?", return_tensors="pt")
    base_logits = base(**prompt).logits
    base_loss = mean_answer_loss(base, tokenizer, chat_dataset)
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter")
    adapted_logits = adapted(**prompt).logits
    assert not torch.allclose(base_logits, adapted_logits, atol=1e-3)
    assert mean_answer_loss(adapted, tokenizer, chat_dataset) < 0.7 * base_loss


def test_same_spec_and_seed_give_the_same_adapter_bytes(
    tiny_model_directory: Path, chat_dataset: Path, tmp_path: Path
) -> None:
    spec = tiny_spec(tiny_model_directory, chat_dataset)
    lora.train_lora(spec, tmp_path / "first")
    lora.train_lora(spec, tmp_path / "second")
    lora.train_lora(spec.model_copy(update={"seed": 4}), tmp_path / "other-seed")
    assert adapter_bytes(tmp_path / "first") == adapter_bytes(tmp_path / "second")
    assert adapter_bytes(tmp_path / "first") != adapter_bytes(tmp_path / "other-seed")


def test_resuming_from_a_checkpoint_equals_an_uninterrupted_run(
    tiny_model_directory: Path, chat_dataset: Path, tmp_path: Path
) -> None:
    spec = tiny_spec(tiny_model_directory, chat_dataset, max_steps=7, checkpoint_interval=3, epochs=None)
    uninterrupted = lora.train_lora(spec, tmp_path / "uninterrupted")

    saved: list[int] = []
    stop_after_first_checkpoint = lambda: bool(saved)  # noqa: E731
    with pytest.raises(lora.TrainingCancelled) as cancelled:
        lora.train_lora(
            spec,
            tmp_path / "resumed",
            should_stop=stop_after_first_checkpoint,
            report=lambda r: saved.append(r.step) if isinstance(r, CheckpointSaved) else None,
        )
    assert saved == [3] and cancelled.value.checkpoint == latest_checkpoint(tmp_path / "resumed")

    resumed = lora.train_lora(spec, tmp_path / "resumed", resume_from="latest")
    assert adapter_bytes(tmp_path / "resumed") == adapter_bytes(tmp_path / "uninterrupted")
    assert resumed.final_loss == uninterrupted.final_loss
    assert resumed.eval_loss == uninterrupted.eval_loss


def test_gradient_accumulation_matches_one_large_batch(
    tiny_model_directory: Path, chat_dataset: Path, tmp_path: Path
) -> None:
    large = tiny_spec(tiny_model_directory, chat_dataset, max_steps=2, batch_size=4, dropout=0.0)
    accumulated = large.model_copy(update={"batch_size": 2, "gradient_accumulation_steps": 2})
    one = lora.train_lora(large, tmp_path / "large")
    two = lora.train_lora(accumulated, tmp_path / "accumulated")
    assert math.isclose(one.final_loss, two.final_loss, rel_tol=1e-4)
    weights_one = load_file(tmp_path / "large" / artifacts.ADAPTER_WEIGHTS_FILE)
    weights_two = load_file(tmp_path / "accumulated" / artifacts.ADAPTER_WEIGHTS_FILE)
    for name, tensor in weights_one.items():
        torch.testing.assert_close(tensor, weights_two[name], rtol=1e-3, atol=1e-5)


def test_a_checkpoint_of_another_job_is_refused(
    tiny_model_directory: Path, chat_dataset: Path, tmp_path: Path
) -> None:
    spec = tiny_spec(tiny_model_directory, chat_dataset, max_steps=2, checkpoint_interval=1)
    lora.train_lora(spec, tmp_path / "run")
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert checkpoint is not None and checkpoint.name == artifacts.checkpoint_name(1)
    other = spec.model_copy(update={"learning_rate": 1e-4, "rank": 4})
    with pytest.raises(CheckpointError, match="belongs to a different job: learning_rate, rank differ"):
        lora.train_lora(other, tmp_path / "run", resume_from=checkpoint)


def test_unknown_target_modules_are_refused_naming_the_real_ones(
    tiny_model_directory: Path, chat_dataset: Path, tmp_path: Path
) -> None:
    spec = tiny_spec(tiny_model_directory, chat_dataset, target_modules=("query", "v_proj"))
    with pytest.raises(
        InvalidJobError, match=r"query are not adaptable layers of this model; it has .*q_proj"
    ):
        lora.train_lora(spec, tmp_path / "run")


def test_learning_rate_schedules() -> None:
    spec = LoraJobSpec(base_model="m", dataset="d", max_steps=11, warmup_steps=2, learning_rate=1.0)
    cosine = [lora.learning_rate_at(step, spec, 11) for step in range(11)]
    assert cosine[:3] == [0.5, 1.0, 1.0]
    assert cosine[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 8 / 9)))
    assert all(a >= b for a, b in itertools.pairwise(cosine[1:]))
    linear = spec.model_copy(update={"schedule": "linear"})
    assert lora.learning_rate_at(2, linear, 11) == 1.0 and lora.learning_rate_at(
        10, linear, 11
    ) == pytest.approx(1 / 9)
    constant = spec.model_copy(update={"schedule": "constant"})
    assert {lora.learning_rate_at(step, constant, 11) for step in range(2, 11)} == {1.0}


def test_epochs_set_the_number_of_steps() -> None:
    spec = LoraJobSpec(base_model="m", dataset="d", epochs=3, batch_size=4, gradient_accumulation_steps=2)
    # 10 examples: 3 micro-batches per epoch, 9 micro-batches, 5 optimizer steps (the last one short).
    assert lora.total_optimizer_steps(spec, 10) == 5


@pytest.mark.gpu
def test_mixed_precision_training_on_the_gpu_learns_and_is_deterministic(
    tiny_model_directory: Path, chat_dataset: Path, tmp_path: Path
) -> None:
    device = "cuda:0" if torch.cuda.is_available() else "mps"
    spec = tiny_spec(tiny_model_directory, chat_dataset, max_steps=12, checkpoint_interval=6)
    first = lora.train_lora(spec, tmp_path / "first", device=device)
    second = lora.train_lora(spec, tmp_path / "second", device=device)
    assert math.isfinite(first.final_loss) and first.final_loss == second.final_loss
    assert adapter_bytes(tmp_path / "first") == adapter_bytes(tmp_path / "second")
    metrics = json.loads((tmp_path / "first" / artifacts.METRICS_FILE).read_text())
    assert sum(metrics["loss"][-3:]) < sum(metrics["loss"][:3])


def test_a_checkpoint_resumes_wherever_the_same_data_lives_but_not_on_other_data(
    tiny_model_directory: Path, chat_dataset: Path, tmp_path: Path
) -> None:
    spec = tiny_spec(tiny_model_directory, chat_dataset, max_steps=4, checkpoint_interval=2)
    with pytest.raises(lora.TrainingCancelled):
        lora.train_lora(
            spec, tmp_path / "run", should_stop=lambda: latest_checkpoint(tmp_path / "run") is not None
        )
    # Another node keeps the same bytes under another name: the job resumes there.
    elsewhere = tmp_path / "node-b" / "data.jsonl"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(chat_dataset.read_bytes())
    moved = spec.model_copy(update={"dataset": str(elsewhere)})
    assert lora.train_lora(moved, tmp_path / "run", resume_from="latest").steps == 4
    # Different bytes under the original name: refused.
    chat_dataset.write_text(chat_dataset.read_text().replace("Ahoy", "Hello"))
    with pytest.raises(CheckpointError, match="dataset_sha256 differ"):
        lora.train_lora(spec, tmp_path / "run", resume_from=latest_checkpoint(tmp_path / "run"))


def test_gradient_checkpointing_trains_the_same_adapter(
    tiny_model_directory: Path, chat_dataset: Path, tmp_path: Path
) -> None:
    stored = lora.train_lora(tiny_spec(tiny_model_directory, chat_dataset, max_steps=3), tmp_path / "stored")
    recomputed = lora.train_lora(
        tiny_spec(tiny_model_directory, chat_dataset, max_steps=3, gradient_checkpointing=True),
        tmp_path / "recomputed",
    )
    # Recomputation restores the random state, so dropout masks and losses match.
    assert recomputed.final_loss == pytest.approx(stored.final_loss, rel=1e-5)
    first, second = (
        load_file(str(path / artifacts.ADAPTER_WEIGHTS_FILE))
        for path in (tmp_path / "stored", tmp_path / "recomputed")
    )
    assert all(torch.allclose(first[name], second[name], atol=1e-6) for name in first)
