"""Fine-tuning datasets: JSONL validated line by line, and tokenized with loss only on the answers.

Two line shapes are accepted: a chat (`{"messages": [{"role": ..., "content": ...}, ...]}`, loss on
the assistant turns) and a pair (`{"prompt": ..., "completion": ...}`, loss on the completion).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from compute_swarm.engine.jobs import (  # noqa: F401 (the line formats are re-exported for the engine's callers)
    MAXIMUM_LINE_BYTES,
    ChatExample,
    ChatMessage,
    Example,
    InvalidJobError,
    LineError,
    PromptCompletionExample,
    parse_line,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Line = TypeVar("Line")

# Labels with this value are ignored by the loss (the convention of torch's cross_entropy).
IGNORED_LABEL = -100
MAXIMUM_REPORTED_ERRORS = 20

# Used only for tokenizers that ship without a chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class DatasetError(InvalidJobError):
    """A dataset that cannot be used; `errors` names each bad line."""

    def __init__(self, summary: str, errors: tuple[LineError, ...] = ()):
        self.errors = errors
        details = "".join(f"\n  {error}" for error in errors)
        super().__init__(summary + details)


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORED_LABEL where no loss is taken

    @property
    def label_count(self) -> int:
        return sum(label != IGNORED_LABEL for label in self.labels)


def read_jsonl(path: str | Path, parse: Callable[[str], Line] = parse_line) -> list[Line]:
    """Read and validate every line with `parse` (a fine-tuning example by default); all bad lines are
    reported together (up to a limit)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset {path} does not exist or is not a file")
    examples: list[Line] = []
    errors: list[LineError] = []
    with open(path, "rb") as file:
        for line_number, raw in enumerate(iter(lambda: file.readline(MAXIMUM_LINE_BYTES + 1), b""), start=1):
            if len(raw) > MAXIMUM_LINE_BYTES:
                errors.append(LineError(line_number, f"longer than {MAXIMUM_LINE_BYTES} bytes"))
                while raw and not raw.endswith(b"\n"):  # skip the rest of it without holding it
                    raw = file.readline(MAXIMUM_LINE_BYTES + 1)
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                errors.append(LineError(line_number, f"not UTF-8 (byte {error.start})"))
                continue
            if not text.strip():
                continue
            try:
                examples.append(parse(text))
            except ValueError as error:
                errors.append(LineError(line_number, str(error)))
    if errors:
        shown = tuple(errors[:MAXIMUM_REPORTED_ERRORS])
        more = f" (showing the first {len(shown)})" if len(errors) > len(shown) else ""
        raise DatasetError(f"{path}: {len(errors)} bad line(s){more}:", shown)
    if not examples:
        raise DatasetError(f"{path} holds no examples")
    return examples


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE


def tokenize_example(
    example: Example, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> TokenizedExample:
    """Token ids and labels, truncated on the right to max_length."""
    if isinstance(example, PromptCompletionExample):
        prompt = tokenizer(example.prompt, add_special_tokens=True)["input_ids"]
        completion = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
        completion = [*completion, tokenizer.eos_token_id]
        input_ids = [*prompt, *completion]
        labels = [IGNORED_LABEL] * len(prompt) + completion
    else:
        input_ids, labels = _tokenize_chat(example, tokenizer)
    return TokenizedExample(tuple(input_ids[:max_length]), tuple(labels[:max_length]))


def _tokenize_chat(example: ChatExample, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    # The loss covers each assistant turn's characters (its content and the template's end-of-turn
    # marker). Those character spans come from rendering the conversation up to and including each
    # turn; the token offsets of the full rendering then say which tokens fall inside a span.
    messages = [message.model_dump() for message in example.messages]
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans: list[tuple[int, int]] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (full_text.startswith(through) and through.startswith(before)):
            raise DatasetError(
                "this model's chat template renders a conversation differently from its prefixes, "
                "so assistant turns cannot be located; use prompt/completion lines instead"
            )
        spans.append((len(before), len(through)))
    encoded = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        token if any(start <= begin < end for start, end in spans) else IGNORED_LABEL
        for token, (begin, _) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
    ]
    return list(encoded["input_ids"]), labels


def tokenize_dataset(
    examples: list[Example], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[TokenizedExample]:
    """Tokenize all examples, dropping those whose answer is truncated away entirely."""
    ensure_chat_template(tokenizer)
    tokenized = [tokenize_example(example, tokenizer, max_length) for example in examples]
    usable = [example for example in tokenized if example.label_count > 0]
    if not usable:
        raise DatasetError(
            f"no example has any answer token within max_sequence_length={max_length}; raise it"
        )
    return usable
