"""Hyperparameter sweeps, as pure decisions: the sweep spec a buyer gives, its expansion into trials
(a grid, or seeded random draws), and median stopping (a trial whose held-out loss is worse than the
median of the other trials at the same step is stopped early, as in Google Vizier's median rule).

Each trial is an ordinary LoRA job: the coordinator queues them together, so the scheduler spreads them
over the swarm's free nodes at once.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# The LoRA settings a sweep may vary, with whether each is a whole number.
SWEEPABLE = {
    "learning_rate": False,
    "rank": True,
    "alpha": False,
    "dropout": False,
    "max_steps": True,
    "batch_size": True,
    "gradient_accumulation_steps": True,
    "warmup_steps": True,
    "weight_decay": False,
    "seed": True,
}
MAX_TRIALS = 64


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Values(_Model):
    """These values, in this order (a grid takes every one)."""

    values: tuple[float, ...] = Field(min_length=1, max_length=MAX_TRIALS)


class Range(_Model):
    """Drawn uniformly between low and high (on a log scale with log=true), for random search."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError("low must be below high")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs a positive low")
        return self


class MedianStopping(_Model):
    """Stop a trial whose held-out loss at a step is above the median of the other trials' at that step,
    once `min_trials` others have reached it and from `min_steps` on."""

    enabled: bool = True
    min_trials: int = Field(default=2, ge=1, le=MAX_TRIALS)
    min_steps: int = Field(default=1, ge=1)


class SweepSpec(_Model):
    """A sweep: the LoRA job every trial starts from (`base`, a LoraJobSpec's fields with dataset as a
    file id), the settings to vary, and the money it may take."""

    base: dict[str, Any]
    parameters: dict[str, Annotated[Values | Range, Field(union_mode="left_to_right")]] = Field(min_length=1)
    strategy: Literal["grid", "random"] = "grid"
    trials: int | None = Field(default=None, ge=1, le=MAX_TRIALS)  # random: how many; grid: at most
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    max_price_per_trial_micro: int | None = Field(default=None, ge=1)
    max_total_price_micro: int | None = Field(default=None, ge=1)
    # Evaluate the held-out loss this many times in each trial (every max_steps / n steps), for stopping.
    evaluations_per_trial: int = Field(default=4, ge=1, le=100)
    median_stopping: MedianStopping = MedianStopping()

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        unknown = sorted(set(self.parameters) - set(SWEEPABLE))
        if unknown:
            raise ValueError(f"cannot sweep {', '.join(unknown)}; a sweep varies: {', '.join(SWEEPABLE)}")
        for name in ("checkpoint_interval", "evaluate_adapter", "type"):
            if name in self.base:
                raise ValueError(f"base may not set {name}: the sweep sets it for each trial")
        ranges = [name for name, choice in self.parameters.items() if isinstance(choice, Range)]
        if self.strategy == "grid" and ranges:
            raise ValueError(f"a grid takes listed values; give {', '.join(ranges)} as values or use random")
        if self.strategy == "random" and self.trials is None:
            raise ValueError("a random sweep needs trials: how many to draw")
        return self


def parse(data: Any) -> SweepSpec:
    """A sweep spec from JSON-like data; ValueError naming each bad field."""
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as error:
        raise ValueError(
            "; ".join(
                f"{'.'.join(str(part) for part in problem['loc']) or 'sweep'}: "
                f"{problem['msg'].removeprefix('Value error, ')}"
                for problem in error.errors()
            )
        ) from None


def expand(spec: SweepSpec) -> list[dict[str, float | int]]:
    """Each trial's settings, in a stable order: the grid's product (at most `trials` of it), or
    `trials` seeded draws."""
    names = sorted(spec.parameters)
    if spec.strategy == "grid":
        grid = itertools.product(*(spec.parameters[name].values for name in names))  # type: ignore[union-attr]
        combinations = list(itertools.islice(grid, spec.trials or MAX_TRIALS + 1))
        if len(combinations) > MAX_TRIALS:
            raise ValueError(f"the grid has more than {MAX_TRIALS} trials: give fewer values or set trials")
        return [_typed(dict(zip(names, values, strict=True))) for values in combinations]
    generator = random.Random(spec.seed)
    trials = []
    for _ in range(spec.trials or 1):
        settings: dict[str, float] = {}
        for name in names:
            choice = spec.parameters[name]
            if isinstance(choice, Values):
                settings[name] = generator.choice(choice.values)
            elif choice.log:
                settings[name] = math.exp(generator.uniform(math.log(choice.low), math.log(choice.high)))
            else:
                settings[name] = generator.uniform(choice.low, choice.high)
            if SWEEPABLE[name] and isinstance(choice, Range):
                # A whole-number setting drawn from a range: the nearest whole number within it.
                settings[name] = min(
                    max(round(settings[name]), math.ceil(choice.low)), math.floor(choice.high)
                )
        trials.append(_typed(settings))
    return trials


def _typed(settings: dict[str, float]) -> dict[str, float | int]:
    typed: dict[str, float | int] = {}
    for name, value in settings.items():
        if SWEEPABLE[name]:
            if value != round(value):
                raise ValueError(f"{name} takes whole numbers, not {value}")
            typed[name] = round(value)
        else:
            typed[name] = float(value)
    return typed


def evaluation_interval(max_steps: int, evaluations: int) -> int:
    """Steps between held-out evaluations (the engine evaluates at each checkpoint and at the end)."""
    return max(1, max_steps // evaluations)


def should_stop(
    eval_loss: float, step: int, others_at_step: list[float], rule: MedianStopping
) -> tuple[bool, float | None]:
    """Median stopping: (stop?, the median compared with). others_at_step: the other trials' held-out
    losses at this step (losses_at)."""
    if not rule.enabled or step < rule.min_steps or len(others_at_step) < rule.min_trials:
        return False, None
    median = statistics.median(others_at_step)
    return eval_loss > median, median


def loss_at(points: list[tuple[int, float]], step: int) -> float | None:
    """A trial's held-out loss at `step`: the latest it reported at or before it (points by step)."""
    earlier = [loss for at, loss in points if at <= step]
    return earlier[-1] if earlier else None


def losses_at(trials: Iterable[list[tuple[int, float]]], step: int) -> list[float]:
    """The other trials' held-out losses to compare with at `step`, each trial's points by step.

    A trial counts once it got as far (a point at or after `step`: a loss from an earlier step alone
    would flatter the trial being judged), with its latest loss at or before `step`. Trials evaluate at
    their own intervals (a swept max_steps spreads them differently): one whose first evaluation comes
    after `step` has nothing to compare there and is left out."""
    losses = []
    for points in trials:
        if points and points[-1][0] >= step:
            loss = loss_at(points, step)
            if loss is not None:
                losses.append(loss)
    return losses
