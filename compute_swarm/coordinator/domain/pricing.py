"""What a job costs and how its payment is shared: pure integer arithmetic on the job spec.

Prices come from the spec and the dataset's size, which the coordinator knows before the job runs, never
from what a node reports. Money is integer micro-credits, computed with integer arithmetic only.
"""

from __future__ import annotations

from compute_swarm.engine.jobs import CatalogueModel, LoraJobSpec

BASIS_POINTS = 10_000

# Rates are quoted per million tokens trained per million model parameters (10^12 token·parameters):
# training costs about 6 FLOPs per token·parameter, so one unit is about 6·10^12 FLOPs, a fraction of a
# second of a gaming GPU at full use. 20,000 micro-credits (0.02 credits) a unit makes the demo job
# (SmolLM2-135M, 30 steps × 4 examples × 512 tokens: 8.26 units) cost 165,293 micro-credits (0.165).
TOKEN_PARAMETERS_PER_UNIT = 10**12
DEFAULT_MICRO_PER_MILLION_TOKEN_PARAMETERS = 20_000
# Generating costs about 2 FLOPs per token·parameter, a third of training; a quarter of the training
# rate leaves room for the memory-bound decoding that keeps a GPU below its peak. SmolLM2-135M: a
# million tokens cost 672,576 micro-credits (0.67 credits).
INFERENCE_MICRO_PER_MILLION_TOKEN_PARAMETERS = 5_000


def _require_integer(name: str, value: object) -> int:
    # bool is an int in Python, and a float here would put rounding into money.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, not {type(value).__name__} {value!r}")
    return value


def _ceiling_division(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def held_out_examples(examples: int, eval_fraction: float) -> int:
    """How many of `examples` the engine holds out for evaluation (engine.lora.split_for_evaluation,
    computed the same way, float rounding included, so the counts agree exactly)."""
    if eval_fraction == 0 or examples < 2:
        return 0
    return min(examples - 1, max(1, round(examples * eval_fraction)))


def planned_steps(spec: LoraJobSpec, dataset_lines: int | None) -> int:
    """The optimizer steps the job will take: spec.max_steps when set, else what the engine derives from
    the epochs (engine.lora.total_optimizer_steps): max(1, ceil(epochs × ceil(train / batch_size) /
    gradient_accumulation_steps)), where train is dataset_lines less the held-out evaluation examples.

    dataset_lines counts the dataset's non-blank lines (its examples). The engine may drop examples
    whose answer does not fit max_sequence_length, which can only lower the steps: this is an upper
    bound. Raises ValueError when an epochs-based spec comes without a usable line count.
    """
    if dataset_lines is not None:
        _require_integer("dataset_lines", dataset_lines)
        if dataset_lines < 0:
            raise ValueError(f"dataset_lines must not be negative, not {dataset_lines}")
    if spec.max_steps is not None:
        return spec.max_steps
    if spec.epochs is None:  # LoraJobSpec's validator forbids it; a clear message if that ever changes
        raise ValueError("the spec gives neither max_steps nor epochs")
    if dataset_lines is None:
        raise ValueError(
            f"a spec that trains for {spec.epochs} epoch(s) needs the dataset's line count to be priced"
        )
    if dataset_lines == 0:
        raise ValueError("the dataset holds no examples, so a job trained for epochs has nothing to train on")
    train_examples = dataset_lines - held_out_examples(dataset_lines, spec.eval_fraction)
    micro_batches_per_epoch = _ceiling_division(train_examples, spec.batch_size)
    return max(1, _ceiling_division(spec.epochs * micro_batches_per_epoch, spec.gradient_accumulation_steps))


def token_budget(spec: LoraJobSpec, dataset_lines: int | None) -> int:
    """An upper bound of the tokens the job trains on: planned steps × examples per step × the longest
    sequence an example may have (shorter examples are not charged less, which keeps the price knowable
    before the job runs)."""
    return planned_steps(spec, dataset_lines) * spec.examples_per_step * spec.max_sequence_length


def price_micro(
    spec: LoraJobSpec,
    model: CatalogueModel,
    dataset_lines: int | None,
    *,
    micro_per_million_token_parameters: int = DEFAULT_MICRO_PER_MILLION_TOKEN_PARAMETERS,
) -> int:
    """The job's price in micro-credits:

        max(1, ceil(token_budget × model.parameters × micro_per_million_token_parameters / 10^12))

    that is, the rate is per million tokens trained per million model parameters, since training work
    grows with both. Integer arithmetic throughout, rounded up so that the platform never undercharges
    by a fraction of a micro-credit; every job costs at least 1. With the default rate (20,000) the demo
    job (SmolLM2-135M, 134,515,008 parameters, 30 steps × 4 × 512 tokens) costs 165,293 micro-credits.
    Raises ValueError as planned_steps does, or for a non-positive parameter count or rate.
    """
    _require_integer("micro_per_million_token_parameters", micro_per_million_token_parameters)
    if micro_per_million_token_parameters < 1:
        raise ValueError(
            f"micro_per_million_token_parameters must be at least 1, not {micro_per_million_token_parameters}"
        )
    _require_integer("model.parameters", model.parameters)
    if model.parameters < 1:
        raise ValueError(f"model {model.name!r} has {model.parameters} parameters; it must have at least 1")
    work = token_budget(spec, dataset_lines) * model.parameters * micro_per_million_token_parameters
    return max(1, _ceiling_division(work, TOKEN_PARAMETERS_PER_UNIT))


def split_payment(price_micro: int, platform_fee_basis_points: int) -> tuple[int, int]:
    """(node_share, platform_fee) of a price: the fee is platform_fee_basis_points / 10,000 of it,
    rounded down, and the node gets the rest, so the two always sum to the price exactly."""
    _require_integer("price_micro", price_micro)
    _require_integer("platform_fee_basis_points", platform_fee_basis_points)
    if price_micro < 0:
        raise ValueError(f"price_micro must not be negative, not {price_micro}")
    if not 0 <= platform_fee_basis_points <= BASIS_POINTS:
        raise ValueError(
            f"platform_fee_basis_points must be between 0 and {BASIS_POINTS} (100%), "
            f"not {platform_fee_basis_points}"
        )
    platform_fee = price_micro * platform_fee_basis_points // BASIS_POINTS
    return price_micro - platform_fee, platform_fee


def inference_price_micro(
    model: CatalogueModel,
    tokens: int,
    *,
    micro_per_million_token_parameters: int = INFERENCE_MICRO_PER_MILLION_TOKEN_PARAMETERS,
) -> int:
    """What generating with `tokens` tokens (prompt and completion) costs:

    max(1, ceil(tokens × model.parameters × micro_per_million_token_parameters / 10^12))
    """
    _require_integer("tokens", tokens)
    _require_integer("micro_per_million_token_parameters", micro_per_million_token_parameters)
    if tokens < 0:
        raise ValueError(f"tokens must not be negative, not {tokens}")
    work = tokens * model.parameters * micro_per_million_token_parameters
    return max(1, _ceiling_division(work, TOKEN_PARAMETERS_PER_UNIT))


# What a chat template adds around a prompt at most, its default system prompt included.
PROMPT_TEMPLATE_TOKENS = 64


def prompt_token_bound(text_bytes: int, messages: int) -> int:
    """The most tokens a prompt can take: a BPE token covers at least one byte of text, and a chat
    template adds its markers and a default system prompt (SmolLM2's is 20 tokens) around the messages.
    A node's own count is charged only up to this, since the coordinator has no tokenizer to check it."""
    return text_bytes + PROMPT_TEMPLATE_TOKENS + 16 * messages


def model_rates_micro(model: CatalogueModel) -> dict[str, int]:
    """A model's list prices, per million tokens: trained (a fine-tune's token budget) and generated or
    read (a request's prompt and completion). What the catalogue shows buyers; jobs are priced by
    price_micro and inference_price_micro from the same rates."""
    million = 1_000_000
    return {
        "fine_tune_per_million_tokens_micro": max(
            1,
            _ceiling_division(
                million * model.parameters * DEFAULT_MICRO_PER_MILLION_TOKEN_PARAMETERS,
                TOKEN_PARAMETERS_PER_UNIT,
            ),
        ),
        "inference_per_million_tokens_micro": inference_price_micro(model, million),
    }
