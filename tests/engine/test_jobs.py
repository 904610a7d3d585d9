"""Job specs refuse bad settings with messages that name the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from compute_swarm.engine.jobs import LoraJobSpec, parse_job_spec

VALID = {"type": "lora", "base_model": "smollm2-135m-instruct", "dataset": "data.jsonl", "max_steps": 10}


def test_a_valid_spec_round_trips_through_json() -> None:
    spec = parse_job_spec({**VALID, "target_modules": ["q_proj", "v_proj"], "rank": 16})
    assert spec.target_modules == ("q_proj", "v_proj")
    assert parse_job_spec(spec.model_dump_json()) == spec
    assert spec.examples_per_step == spec.batch_size * spec.gradient_accumulation_steps


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
