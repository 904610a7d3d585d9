"""Datasets: every bad line is named, and the loss covers the answers and nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from compute_swarm.engine.datasets import (
    IGNORED_LABEL,
    ChatExample,
    DatasetError,
    PromptCompletionExample,
    read_jsonl,
    tokenize_dataset,
)
from tests.conftest import write_jsonl


@pytest.fixture(scope="module")
def tokenizer(demo_model_directory: Path):
    return AutoTokenizer.from_pretrained(demo_model_directory)


def answer_text(tokenizer, example) -> str:
    return tokenizer.decode(
        [
            token
            for token, label in zip(example.input_ids, example.labels, strict=True)
            if label != IGNORED_LABEL
        ]
    )


def test_reads_both_line_shapes_and_skips_blank_lines(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
            "",
            {"prompt": "2+2=", "completion": "4"},
        ],
    )
    examples = read_jsonl(path)
    assert [type(example) for example in examples] == [ChatExample, PromptCompletionExample]


def test_every_bad_line_is_reported_with_its_number(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"prompt": "fine", "completion": "line"},
            "{not json",
            "[1, 2]",
            {"messages": [{"role": "user", "content": "no answer here"}]},
            {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]},
            {"prompt": "missing its completion"},
            {"text": "unknown shape"},
        ],
    )
    (tmp_path / "bad.jsonl").open("ab").write(b'{"prompt": "\xff", "completion": "x"}\n')
    with pytest.raises(DatasetError) as raised:
        read_jsonl(path)
    error = raised.value
    assert [line.line_number for line in error.errors] == [2, 3, 4, 5, 6, 7, 8]
    message = str(error)
    assert "7 bad line(s)" in message
    assert "line 2: not valid JSON" in message
    assert "line 3: expected a JSON object, got list" in message
    assert "line 4: a chat needs at least one non-empty assistant message" in message
    assert "line 5: messages.0.role: Input should be 'system', 'user' or 'assistant'" in message
    assert "line 6: completion: Field required" in message
    assert "line 7: expected a 'messages' list or 'prompt' and 'completion'" in message
    assert "line 8: not UTF-8" in message


def test_an_empty_or_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="holds no examples"):
        read_jsonl(write_jsonl(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(DatasetError, match="does not exist"):
        read_jsonl(tmp_path / "absent.jsonl")


def test_chat_loss_covers_only_the_assistant_turns(tmp_path: Path, tokenizer) -> None:
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "What is 2+2?"},
                    {"role": "assistant", "content": "Four."},
                    {"role": "user", "content": "And 3+3?"},
                    {"role": "assistant", "content": "Six."},
                ]
            }
        ],
    )
    [example] = tokenize_dataset(read_jsonl(path), tokenizer, max_length=512)
    answers = answer_text(tokenizer, example)
    # Each answer and its end-of-turn marker, so the model also learns when to stop.
    assert answers == "Four.<|im_end|>\nSix.<|im_end|>\n"
    assert "What is 2+2?" in tokenizer.decode(example.input_ids)


def test_prompt_completion_loss_covers_the_completion_and_end_token(tmp_path: Path, tokenizer) -> None:
    path = write_jsonl(
        tmp_path / "pairs.jsonl", [{"prompt": "The capital of France is", "completion": " Paris"}]
    )
    [example] = tokenize_dataset(read_jsonl(path), tokenizer, max_length=512)
    assert answer_text(tokenizer, example) == " Paris" + tokenizer.eos_token


def test_truncation_drops_examples_whose_answer_is_cut_off(tmp_path: Path, tokenizer) -> None:
    long_prompt = "word " * 100
    path = write_jsonl(
        tmp_path / "long.jsonl",
        [{"prompt": long_prompt, "completion": "lost"}, {"prompt": "short", "completion": " kept"}],
    )
    examples = tokenize_dataset(read_jsonl(path), tokenizer, max_length=16)
    assert len(examples) == 1
    assert all(len(example.input_ids) <= 16 for example in examples)
    only_long = write_jsonl(tmp_path / "only-long.jsonl", [{"prompt": long_prompt, "completion": "lost"}])
    with pytest.raises(DatasetError, match="max_sequence_length=16"):
        tokenize_dataset(read_jsonl(only_long), tokenizer, max_length=16)
