"""What a batch inference job holds and is charged: counted from the completions a node delivers."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from compute_swarm.coordinator.domain import pricing
from compute_swarm.coordinator.service import batch
from compute_swarm.engine.jobs import CATALOGUE, DEFAULT_MODEL, InferenceJobSpec, Sampling
from compute_swarm.sdk.client import pack_directory

MODEL = CATALOGUE[DEFAULT_MODEL]


def result_archive(tmp_path: Path, answers: list[object]) -> Path:
    directory = tmp_path / "result"
    directory.mkdir(parents=True)
    (directory / batch.COMPLETIONS_FILE).write_text(
        "".join((answer if isinstance(answer, str) else json.dumps(answer)) + "\n" for answer in answers)
    )
    archive = tmp_path / "result.tar"
    pack_directory(directory, archive)
    return archive


def answer(line: int, text: str, prompt_tokens: int = 10, completion_tokens: int = 3) -> dict:
    return {
        "line": line,
        "message": {"role": "assistant", "content": text},
        "finish_reason": "stop",
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
    }


def test_the_hold_covers_every_prompt_at_its_bound_and_every_answer_at_max_tokens():
    spec = InferenceJobSpec(base_model=DEFAULT_MODEL, dataset="file_1", sampling=Sampling(max_tokens=100))
    held = batch.hold_micro(MODEL, spec, dataset_bytes=1000, lines=4)
    assert held == pricing.inference_price_micro(MODEL, 1000 + 4 * 64 + 4 * 100)


def test_usage_is_counted_from_the_answers_with_each_claim_capped(tmp_path):
    archive = result_archive(
        tmp_path,
        [
            answer(1, "Red, green and blue.", completion_tokens=6),
            # A node claiming more tokens than its text can hold, or than max_tokens, is not believed.
            {
                "line": 2,
                "text": "ab",
                "finish_reason": "length",
                "prompt_tokens": 5,
                "completion_tokens": 900,
            },
            answer(3, "x" * 500, completion_tokens=400),
        ],
    )
    usage = batch.count_usage(archive, lines=3, max_tokens=64, dataset_bytes=10_000)
    assert usage == batch.BatchUsage(prompt_tokens=25, completion_tokens=6 + 3 + 64)
    # Prompt counts are capped by what the prompts' size allows.
    inflated = result_archive(tmp_path / "inflated", [answer(1, "a", prompt_tokens=10**6)])
    assert batch.count_usage(inflated, lines=1, max_tokens=64, dataset_bytes=100).prompt_tokens == 100 + 64


def test_with_the_models_tokenizer_answers_are_charged_what_it_counts_not_what_the_node_claims(tmp_path):
    from compute_swarm.coordinator.service.tokens import counter_from_gguf
    from compute_swarm.engine.models import fetch_catalogue_model

    counter = counter_from_gguf(fetch_catalogue_model(DEFAULT_MODEL))
    lima, long = "The capital of Peru is Lima.", "word " * 200
    archive = result_archive(
        tmp_path, [answer(1, lima, completion_tokens=60), answer(2, long, completion_tokens=1)]
    )
    usage = batch.count_usage(
        archive, lines=2, max_tokens=64, dataset_bytes=10_000, count_tokens=counter.count
    )
    # Over-claimed and under-claimed alike: the tokenizer's count, at most max_tokens an answer.
    assert counter.count(lima) == 7 and counter.count(long) > 64
    assert usage.completion_tokens == 7 + 64


def test_with_the_models_tokenizer_prompts_are_charged_what_it_counts_not_what_the_node_claims(tmp_path):
    from compute_swarm.coordinator.service.tokens import ChatMessage, counter_from_gguf
    from compute_swarm.engine.models import fetch_catalogue_model

    counter = counter_from_gguf(fetch_catalogue_model(DEFAULT_MODEL))
    chat = [{"role": "user", "content": "What is the capital of Peru?"}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"messages": chat}) + "\n\n" + json.dumps({"prompt": "Once upon a time"}) + "\n"
    )
    counted = batch.count_prompt_tokens(prompts, counter)
    expected = counter.count_chat([ChatMessage("user", "What is the capital of Peru?")]) + counter.count(
        "Once upon a time"
    )
    # The chat is counted in the model's template (more than its words), the text prompt as it is.
    assert counted == expected and expected > counter.count("What is the capital of Peru?") + 4
    archive = result_archive(
        tmp_path, [answer(1, "Lima.", prompt_tokens=10**6), answer(2, "there", prompt_tokens=0)]
    )
    usage = batch.count_usage(
        archive,
        lines=2,
        max_tokens=64,
        dataset_bytes=10_000,
        count_tokens=counter.count,
        prompt_tokens=counted,
    )
    assert usage.prompt_tokens == counted


def test_the_charge_never_exceeds_the_hold():
    usage = batch.BatchUsage(prompt_tokens=10**9, completion_tokens=10**9)
    assert batch.price_micro(MODEL, usage, held_micro=1234) == 1234
    small = batch.BatchUsage(prompt_tokens=100, completion_tokens=50)
    assert batch.price_micro(MODEL, small, held_micro=10**9) == pricing.inference_price_micro(MODEL, 150)


@pytest.mark.parametrize(
    ("answers", "problem"),
    [
        ([answer(1, "a")], "answers 1 of the 2 prompts"),
        ([answer(1, "a"), answer(2, "b"), answer(3, "c")], "more answers than the 2 prompts"),
        ([answer(1, "a"), answer(3, "b")], "answer 2 does not say it answers line 2"),
        ([answer(1, "a"), "not json"], "answer 2 is not JSON"),
        ([answer(1, "a"), {"line": 2, "message": {"content": "b"}, "prompt_tokens": 1}], "token counts"),
        ([answer(1, "a"), {**answer(2, "b"), "completion_tokens": -1}], "token counts"),
        ([answer(1, "a"), {**answer(2, "b"), "completion_tokens": True}], "token counts"),
    ],
)
def test_a_result_that_is_not_one_answer_per_prompt_is_refused(tmp_path, answers, problem):
    archive = result_archive(tmp_path, answers)
    with pytest.raises(batch.BatchResultError, match=problem):
        batch.count_usage(archive, lines=2, max_tokens=64, dataset_bytes=1000)


def test_a_result_without_completions_or_not_an_archive_is_refused(tmp_path):
    directory = tmp_path / "adapter"
    directory.mkdir()
    (directory / "adapter_config.json").write_text("{}")
    pack_directory(directory, tmp_path / "adapter.tar")
    with pytest.raises(batch.BatchResultError, match=r"no completions\.jsonl"):
        batch.count_usage(tmp_path / "adapter.tar", lines=1, max_tokens=8, dataset_bytes=10)
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(batch.BatchResultError, match="not a readable archive"):
        batch.count_usage(tmp_path / "junk.tar", lines=1, max_tokens=8, dataset_bytes=10)
    assert tarfile.is_tarfile(tmp_path / "adapter.tar")
