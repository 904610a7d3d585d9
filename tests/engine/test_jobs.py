"""Job specs refuse bad settings with messages that name the field."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from compute_swarm.engine.jobs import (
    ContentHash,
    LocalPath,
    LoraJobSpec,
    parse_buyer_spec,
    parse_job_spec,
    parse_stored_buyer_spec,
    relocated,
)

VALID = {"type": "lora", "base_model": "smollm2-135m-instruct", "dataset": "data.jsonl", "max_steps": 10}


def test_a_valid_spec_round_trips_through_json() -> None:
    spec = parse_job_spec({**VALID, "target_modules": ["q_proj", "v_proj"], "rank": 16})
    assert spec.target_modules == ("q_proj", "v_proj")
    assert parse_job_spec(spec.model_dump_json()) == spec
    assert spec.examples_per_step == spec.batch_size * spec.gradient_accumulation_steps


@pytest.mark.parametrize(
    "submitted",
    [
        {
            "type": "lora",
            "base_model": "m",
            "dataset": "file_1",
            "max_steps": 3,
            "target_modules": ["q_proj"],
        },
        {"type": "inference", "base_model": "m", "dataset": "file_2", "sampling": {"stop": ["###", "\n\n"]}},
    ],
)
def test_a_stored_spec_reads_back_as_the_buyer_submitted_it(submitted: dict) -> None:
    spec = parse_buyer_spec(submitted)
    # The coordinator stores the spec as JSON, whose lists stand for the spec's tuples.
    stored = json.loads(spec.model_dump_json())
    assert parse_stored_buyer_spec(stored) == spec


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"rank": 0}, "rank", "greater than or equal to 1"),
        ({"learning_rate": -1.0}, "learning_rate", "greater than 0"),
        ({"dropout": 1.0}, "dropout", "less than 1"),
        ({"eval_fraction": 1.5}, "eval_fraction", "less than 1"),
        ({"target_modules": ["model.layers.*"]}, "target_modules", "not a plain module name"),
        ({"target_modules": ["q_proj", "q_proj"]}, "target_modules", "twice"),
        ({"target_modules": []}, "target_modules", "at least 1"),
        ({"schedule": "exponential"}, "schedule", "'constant', 'linear' or 'cosine'"),
        ({"epochs": 2}, "", "exactly one of max_steps and epochs"),
        ({"max_steps": None}, "", "exactly one of max_steps and epochs"),
        ({"warmup_steps": 10}, "", "warmup_steps (10) must be smaller than max_steps (10)"),
        ({"batch_size": "4"}, "batch_size", "valid integer"),
        ({"surprise": 1}, "surprise", "Extra inputs are not permitted"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(change: dict, field: str, words: str) -> None:
    with pytest.raises(ValidationError) as raised:
        parse_job_spec({**VALID, **change})
    message = str(raised.value)
    assert words in message
    if field:
        assert f"lora.{field}" in message


def test_an_unknown_job_type_is_refused() -> None:
    with pytest.raises(ValidationError, match="does not match any of the expected tags: 'lora'"):
        parse_job_spec({**VALID, "type": "mine-bitcoin"})


def test_specs_are_immutable() -> None:
    spec = LoraJobSpec(base_model="m", dataset="d.jsonl", max_steps=1)
    with pytest.raises(ValidationError):
        spec.rank = 64  # type: ignore[misc]


def test_a_spec_names_its_data_in_the_form_of_where_it_is() -> None:
    submitted = parse_buyer_spec(
        {
            "type": "lora",
            "base_model": "smollm2-135m-instruct",
            "dataset": "file_0123",
            "max_steps": 5,
            "rank": 4,
        }
    )
    on_the_wire = relocated(submitted, ContentHash, dataset="a" * 64, adapter="b" * 64)
    on_the_node = relocated(on_the_wire, LocalPath, dataset="/data/a.jsonl", adapter="/data/delivered")
    assert isinstance(on_the_wire, LoraJobSpec[ContentHash]) and isinstance(on_the_node, LoraJobSpec)
    assert (on_the_wire.dataset, on_the_wire.evaluate_adapter) == ("a" * 64, "b" * 64)
    assert (on_the_node.dataset, on_the_node.evaluate_adapter) == ("/data/a.jsonl", "/data/delivered")
    settings = {"dataset", "evaluate_adapter"}
    assert submitted.model_dump(exclude=settings) == on_the_node.model_dump(exclude=settings)

    batch = parse_buyer_spec({"type": "inference", "base_model": "ft:x", "dataset": "file_prompts"})
    wire_batch = relocated(
        batch, ContentHash, dataset="c" * 64, adapter="d" * 64, base_model="smollm2-135m-instruct"
    )
    assert (wire_batch.base_model, wire_batch.adapter) == ("smollm2-135m-instruct", "d" * 64)


@pytest.mark.parametrize(
    ("parse", "dataset", "words"),
    [
        (parse_buyer_spec, "/home/buyer/data.jsonl", "is not a file id"),
        (parse_buyer_spec, "x" * 65, "at most 64 characters"),
        (
            lambda data: relocated(parse_job_spec(data), ContentHash, dataset="file_1"),
            "/d",
            "is not an artifact's sha256",
        ),
        (parse_job_spec, "", "at least 1 character"),
    ],
)
def test_a_reference_that_does_not_fit_its_form_is_refused(parse, dataset: str, words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        parse({"type": "lora", "base_model": "m", "dataset": dataset, "max_steps": 2})
