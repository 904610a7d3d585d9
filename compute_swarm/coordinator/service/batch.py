"""Batch inference jobs (a JSONL of prompts in, a JSONL of completions out) as the coordinator prices
them: the most a job can cost, held at submission, and what its completions cost, charged at the end.

A batch is charged as live requests are, for tokens the coordinator counts with the model's own
tokenizer: its prompts (from the buyer's dataset, each in the model's chat template) and the answers the
node delivered (each capped by max_tokens). Without the tokenizer (it could not be read), the node's
counts are taken within bounds: an answer at most one token per byte of its text, the prompts at most
what their size allows. The rest of the hold goes back to the buyer.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from compute_swarm.coordinator.domain import pricing
from compute_swarm.coordinator.service.tokens import ChatMessage, TokenCounter
from compute_swarm.engine.artifacts import COMPLETIONS_FILE
from compute_swarm.engine.jobs import CatalogueModel, InferenceJobSpec, parse_prompt_line

# A completions file holds at most max_tokens tokens an answer, each at most a few bytes, plus its JSON.
MAX_COMPLETION_LINE_BYTES = 1 << 20
# A result is a node's upload, read before anyone trusts it, so its reading is bounded. A batch's tar
# holds completions.jsonl and at most a few other files (the node packs engine.artifacts.RESULT_FILES);
# the scan stops past this many members, whatever the archive holds after them.
MAX_RESULT_MEMBERS = 16
# What the members' headers may take together (PAX and GNU long-name records included, which tarfile
# reads whole however long they say they are): a real result's take a few KiB.
MAX_HEADER_BYTES = 1 << 20


class BatchResultError(ValueError):
    """A delivered result that is not the completions of the job's prompts."""


@dataclass(frozen=True)
class BatchUsage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def prompt_token_bound(dataset_bytes: int, lines: int) -> int:
    """The most tokens a batch's prompts can take: a token covers at least one byte of a line's text
    (and a line's JSON around the text is longer than the chat markers a template adds per message),
    plus each prompt's own template and default system prompt, as pricing.prompt_token_bound counts."""
    return dataset_bytes + pricing.PROMPT_TEMPLATE_TOKENS * lines


def hold_micro(model: CatalogueModel, spec: InferenceJobSpec, dataset_bytes: int, lines: int) -> int:
    """What a batch may cost at most: every prompt at its bound and every answer at max_tokens."""
    tokens = prompt_token_bound(dataset_bytes, lines) + lines * spec.sampling.max_tokens
    return pricing.inference_price_micro(model, tokens)


def price_micro(model: CatalogueModel, usage: BatchUsage, held_micro: int) -> int:
    return min(held_micro, pricing.inference_price_micro(model, usage.total_tokens))


def read_answers(result_archive: Path, *, lines: int) -> Iterator[tuple[int, int, str]]:
    """Each answer of a delivered result, in order: (prompt tokens, completion tokens, text) as the
    node reported them, read as they are used; raises BatchResultError when the archive does not hold
    one answer per prompt."""
    count = 0
    most_bytes = lines * MAX_COMPLETION_LINE_BYTES
    try:
        # "r:": a node's result is an uncompressed tar (sdk.client.pack_directory); a compressed one
        # could unpack to any size.
        with (
            open(result_archive, "rb") as file,
            tarfile.open(fileobj=_ReadBudget(file, MAX_HEADER_BYTES + most_bytes), mode="r:") as archive,
        ):
            member = _completions_member(archive)
            if member.size > most_bytes:
                raise BatchResultError(
                    f"{COMPLETIONS_FILE} is {member.size} bytes, more than {lines} answers can take "
                    f"({MAX_COMPLETION_LINE_BYTES} bytes each at most)"
                )
            stream = archive.extractfile(member) if member.isfile() else None
            if stream is None:
                raise BatchResultError(f"{COMPLETIONS_FILE} in the result is not a file")
            for count, raw in enumerate(iter(lambda: stream.readline(MAX_COMPLETION_LINE_BYTES + 1), b""), 1):
                if count > lines:
                    raise BatchResultError(f"the result has more answers than the {lines} prompts")
                yield _answer(raw, count)
    except (OSError, tarfile.TarError) as error:
        raise BatchResultError(f"the result is not a readable archive: {error}") from None
    except RecursionError:  # tarfile reads a chain of extended headers (PAX, GNU long names) recursively
        raise BatchResultError(
            "the result's archive has a chain of extended headers too long to read"
        ) from None
    if count != lines:
        raise BatchResultError(f"the result answers {count} of the {lines} prompts")


def _completions_member(archive: tarfile.TarFile) -> tarfile.TarInfo:
    """The archive's completions file, its members read one by one (tarfile's getmember reads every
    header in the archive first), at most MAX_RESULT_MEMBERS of them."""
    found = None
    for number, member in enumerate(iter(archive.next, None), 1):
        if number > MAX_RESULT_MEMBERS:
            raise BatchResultError(
                f"the result holds more than {MAX_RESULT_MEMBERS} files; a batch's result holds "
                f"{COMPLETIONS_FILE} and a few others"
            )
        if member.name == COMPLETIONS_FILE:
            if found is not None:
                raise BatchResultError(f"the result holds {COMPLETIONS_FILE} twice")
            found = member
    if found is None:
        raise BatchResultError(f"the result holds no {COMPLETIONS_FILE}")
    return found


class _ReadBudget:
    """A binary file that refuses to read more than `budget` bytes in all, for tarfile: bounding the
    members is not enough where one header can say it is a gigabyte long."""

    def __init__(self, file: BinaryIO, budget: int):
        self._file = file
        self._left = budget
        self._budget = budget

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0 or size > self._left:
            raise BatchResultError(
                f"the result needs more than {self._budget} bytes read to find and read its answers"
            )
        data = self._file.read(size)
        self._left -= len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()


def count_usage(
    result_archive: Path,
    *,
    lines: int,
    max_tokens: int,
    dataset_bytes: int,
    count_tokens: Callable[[str], int] | None = None,
    prompt_tokens: int | None = None,
) -> BatchUsage:
    """The tokens a delivered result is charged for: each answer's counted with the model's tokenizer
    (`count_tokens`), else the node's count within one token a byte; never more than max_tokens. The
    prompts: `prompt_tokens` as the coordinator counted them (count_prompt_tokens), else the node's
    count within the prompts' size bound. Raises BatchResultError as read_answers does."""
    reported_prompts = completion_tokens = 0
    for reported_prompt, reported_completion, text in read_answers(result_archive, lines=lines):
        reported_prompts += reported_prompt
        counted = count_tokens(text) if count_tokens else min(reported_completion, len(text.encode()) + 1)
        completion_tokens += min(counted, max_tokens)
    if prompt_tokens is None:
        prompt_tokens = min(reported_prompts, prompt_token_bound(dataset_bytes, lines))
    return BatchUsage(prompt_tokens, completion_tokens)


def count_prompt_tokens(prompts: Path, counter: TokenCounter) -> int:
    """The prompt tokens of a batch's prompts file (checked line by line at upload, so every line
    parses): each chat in the model's template up to the answer, each text prompt as it is."""
    total = 0
    with prompts.open("rb") as file:
        for raw in file:
            if not raw.strip():
                continue  # blank lines are not prompts (as at upload)
            line = parse_prompt_line(raw.decode("utf-8"))
            if line.messages is not None:
                total += counter.count_chat(
                    [ChatMessage(message.role, message.content) for message in line.messages]
                )
            else:
                total += counter.count(line.prompt or "")
    return total


def _answer(raw: bytes, number: int) -> tuple[int, int, str]:
    """(prompt tokens, completion tokens, text) of one line of completions.jsonl."""
    if len(raw) > MAX_COMPLETION_LINE_BYTES:
        raise BatchResultError(f"answer {number} is longer than {MAX_COMPLETION_LINE_BYTES} bytes")
    try:
        answer = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BatchResultError(f"answer {number} is not JSON") from None
    if not isinstance(answer, dict) or answer.get("line") != number:
        raise BatchResultError(f"answer {number} does not say it answers line {number}")
    message = answer.get("message")
    text = message.get("content") if isinstance(message, dict) else answer.get("text")
    counts = (answer.get("prompt_tokens"), answer.get("completion_tokens"))
    if not isinstance(text, str) or not all(
        isinstance(count, int) and not isinstance(count, bool) and 0 <= count < 2**31 for count in counts
    ):
        raise BatchResultError(f"answer {number} lacks its text or its token counts")
    return counts[0], counts[1], text
