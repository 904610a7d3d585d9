"""Pricing: integer micro-credits from the spec, steps as the engine counts them, exact fee splits."""

from __future__ import annotations

import dataclasses
import random
from fractions import Fraction

import pytest

from compute_swarm.coordinator.domain.pricing import (
    DEFAULT_MICRO_PER_MILLION_TOKEN_PARAMETERS,
    held_out_examples,
    planned_steps,
    price_micro,
    split_payment,
    token_budget,
)
from compute_swarm.engine.jobs import CATALOGUE, DEFAULT_MODEL, LoraJobSpec
from compute_swarm.protocol import MICRO_PER_CREDIT

DEMO_MODEL = CATALOGUE[DEFAULT_MODEL]


def lora(**fields: object) -> LoraJobSpec:
    fields.setdefault("base_model", DEFAULT_MODEL)
    fields.setdefault("dataset", "data.jsonl")
    if "epochs" not in fields:
        fields.setdefault("max_steps", 30)
    return LoraJobSpec(**fields)


def test_demo_job_costs_a_fraction_of_a_credit() -> None:
    spec = lora(max_steps=30, batch_size=4, max_sequence_length=512)

    assert token_budget(spec, 100) == 30 * 4 * 512
    price = price_micro(spec, DEMO_MODEL, 100)

    assert price == 165_293  # ceil(61,440 × 134,515,008 × 20,000 / 10^12)
    assert 0.05 * MICRO_PER_CREDIT <= price <= 0.5 * MICRO_PER_CREDIT


def test_price_is_the_exact_integer_ceiling_of_the_formula() -> None:
    generator = random.Random(7)
    for _ in range(500):
        spec = lora(
            max_steps=generator.randint(1, 10_000),
            batch_size=generator.randint(1, 64),
            gradient_accumulation_steps=generator.randint(1, 8),
            max_sequence_length=generator.randint(8, 8192),
        )
        model = dataclasses.replace(DEMO_MODEL, parameters=generator.randint(1, 10**11))
        rate = generator.randint(1, 10**6)

        price = price_micro(spec, model, None, micro_per_million_token_parameters=rate)

        exact = Fraction(token_budget(spec, None) * model.parameters * rate, 10**12)
        assert type(price) is int
        assert price == max(1, -(-exact.numerator // exact.denominator))
        assert price >= exact


def test_every_job_costs_at_least_one_micro_credit() -> None:
    tiny_model = dataclasses.replace(DEMO_MODEL, parameters=1)

    assert price_micro(lora(max_steps=1, batch_size=1, max_sequence_length=8), tiny_model, None) == 1


@pytest.mark.parametrize(
    ("field", "values"),
    [
        ("max_steps", [1, 2, 30, 31, 1000]),
        ("batch_size", [1, 2, 4, 5, 64]),
        ("gradient_accumulation_steps", [1, 2, 3, 16]),
        ("max_sequence_length", [8, 9, 512, 513, 4096]),
    ],
)
def test_price_grows_with_the_work(field: str, values: list[int]) -> None:
    prices = [price_micro(lora(**{field: value}), DEMO_MODEL, None) for value in values]

    assert prices == sorted(prices)
    assert prices[0] < prices[-1]


def test_price_grows_with_model_size_rate_and_dataset() -> None:
    spec = lora(max_steps=30)
    by_parameters = [
        price_micro(spec, dataclasses.replace(DEMO_MODEL, parameters=parameters), None)
        for parameters in [10**6, 10**7, 134_515_008, 10**9, 7 * 10**9]
    ]
    by_rate = [
        price_micro(spec, DEMO_MODEL, None, micro_per_million_token_parameters=rate)
        for rate in [1, 2, 20_000, 10**6]
    ]
    epochs_spec = lora(epochs=2, batch_size=4)
    by_lines = [price_micro(epochs_spec, DEMO_MODEL, lines) for lines in range(1, 300)]

    for prices in (by_parameters, by_rate, by_lines):
        assert prices == sorted(prices)
        assert prices[0] < prices[-1]
    assert (
        price_micro(spec, DEMO_MODEL, None)
        == DEFAULT_MICRO_PER_MILLION_TOKEN_PARAMETERS * 61_440 * 134_515_008 // 10**12 + 1
    )


def test_epochs_based_steps_match_a_hand_computation() -> None:
    # 103 examples, 10% held out: round(10.3) = 10 → 93 train. Batches of 4: 24 micro-batches an
    # epoch; 3 epochs = 72 micro-batches; 2 per optimizer step → 36 steps.
    spec = lora(epochs=3, batch_size=4, gradient_accumulation_steps=2, eval_fraction=0.1)
    assert planned_steps(spec, 103) == 36
    assert token_budget(spec, 103) == 36 * 8 * 512

    # 11 examples, 10% held out: round(1.1) = 1 → 10 train; 3 micro-batches of 4 an epoch. The engine
    # counts micro-batches over the whole run, so 3 epochs take ceil(9 / 2) = 5 steps, not 3 × 2.
    assert planned_steps(lora(epochs=3, batch_size=4, gradient_accumulation_steps=2), 11) == 5

    # No held-out share: all 10 train, one step of 16 an epoch.
    assert planned_steps(lora(epochs=4, batch_size=16, eval_fraction=0.0), 10) == 4
    # One example cannot be split: it trains.
    assert planned_steps(lora(epochs=1, batch_size=1, eval_fraction=0.5), 1) == 1


def test_held_out_share_matches_the_rules_of_the_split() -> None:
    assert held_out_examples(0, 0.1) == 0
    assert held_out_examples(1, 0.9) == 0  # too few to split
    assert held_out_examples(2, 0.01) == 1  # at least one held out
    assert held_out_examples(10, 0.99) == 9  # at least one left to train on
    assert held_out_examples(25, 0.1) == 2  # round half to even, as the engine's round()
    assert held_out_examples(100, 0.0) == 0


def test_steps_agree_with_the_engine() -> None:
    pytest.importorskip("torch")
    from compute_swarm.engine.lora import split_for_evaluation, total_optimizer_steps

    for fraction in [0.0, 0.01, 0.05, 0.1, 0.15, 0.25, 0.5, 0.7, 0.99]:
        for lines in range(1, 80):
            examples = list(range(lines))
            train, held_out = split_for_evaluation(examples, fraction, seed=3)  # type: ignore[arg-type]
            assert held_out_examples(lines, fraction) == len(held_out), (lines, fraction)
            for batch_size, accumulation, epochs in [(1, 1, 1), (4, 1, 3), (4, 3, 2), (16, 2, 5)]:
                spec = lora(
                    epochs=epochs,
                    batch_size=batch_size,
                    gradient_accumulation_steps=accumulation,
                    eval_fraction=fraction,
                )
                assert planned_steps(spec, lines) == total_optimizer_steps(spec, len(train))


def test_max_steps_specs_need_no_dataset_size() -> None:
    spec = lora(max_steps=12)

    assert planned_steps(spec, None) == planned_steps(spec, 0) == planned_steps(spec, 10**6) == 12


@pytest.mark.parametrize(
    ("lines", "message"),
    [(None, "needs the dataset's line count"), (0, "holds no examples"), (-1, "must not be negative")],
)
def test_epochs_specs_without_a_usable_dataset_are_refused(lines: int | None, message: str) -> None:
    spec = lora(epochs=1)

    with pytest.raises(ValueError, match=message):
        planned_steps(spec, lines)
    with pytest.raises(ValueError, match=message):
        price_micro(spec, DEMO_MODEL, lines)


def test_bad_rates_and_models_are_refused() -> None:
    spec = lora()

    with pytest.raises(ValueError, match="at least 1"):
        price_micro(spec, DEMO_MODEL, None, micro_per_million_token_parameters=0)
    with pytest.raises(TypeError, match="integer"):
        price_micro(spec, DEMO_MODEL, None, micro_per_million_token_parameters=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="parameters"):
        price_micro(spec, dataclasses.replace(DEMO_MODEL, parameters=0), None)
    with pytest.raises(TypeError, match="integer"):
        planned_steps(spec, 10.0)  # type: ignore[arg-type]


def test_split_payment_sums_to_the_price_and_rounds_the_fee_down() -> None:
    generator = random.Random(11)
    prices = [0, 1, 2, 3, 7, 99, 10_000, 165_293, *(generator.randint(0, 10**15) for _ in range(300))]
    for price in prices:
        for basis_points in [0, 1, 250, 999, 1000, 3333, 5000, 9999, 10_000]:
            node_share, platform_fee = split_payment(price, basis_points)

            assert type(node_share) is int and type(platform_fee) is int
            assert node_share + platform_fee == price
            assert 0 <= platform_fee <= price
            assert platform_fee == price * basis_points // 10_000
            assert (
                Fraction(price * basis_points, 10_000) - 1
                < platform_fee
                <= Fraction(price * basis_points, 10_000)
            )

    assert split_payment(165_293, 1000) == (148_764, 16_529)
    assert split_payment(9, 1000) == (9, 0)  # 0.9 rounds down: the node is not shorted
    assert split_payment(100, 10_000) == (0, 100)


@pytest.mark.parametrize(
    ("price", "basis_points", "error"),
    [
        (-1, 1000, ValueError),
        (100, -1, ValueError),
        (100, 10_001, ValueError),
        (100.0, 1000, TypeError),
        (100, 10.5, TypeError),
    ],
)
def test_split_payment_refuses_bad_input(price: object, basis_points: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        split_payment(price, basis_points)  # type: ignore[arg-type]
