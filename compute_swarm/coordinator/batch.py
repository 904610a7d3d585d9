"""Batch inference jobs (a JSONL of prompts in, a JSONL of completions out) as the coordinator prices
them: the most a job can cost, held at submission, and what its completions cost, charged at the end.

A batch is charged as live requests are: for the tokens it generated, counted from the completions the
node delivered (each answer's count capped by its max_tokens and by one token per byte of its text),
and the prompt tokens the node reports, capped by what the prompts' size allows. The rest of the hold
goes back to the buyer.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from compute_swarm.coordinator import pricing
from compute_swarm.engine.jobs import CatalogueModel, InferenceJobSpec

COMPLETIONS_FILE = "completions.jsonl"  # engine.inference.COMPLETIONS_FILE, inside the result's tar
# A completions file holds at most max_tokens tokens an answer, each at most a few bytes, plus its JSON.
MAX_COMPLETION_LINE_BYTES = 1 << 20


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
    try:
        with tarfile.open(result_archive) as archive:
            try:
                member = archive.getmember(COMPLETIONS_FILE)
            except KeyError:
                raise BatchResultError(f"the result holds no {COMPLETIONS_FILE}") from None
            stream = archive.extractfile(member) if member.isfile() else None
            if stream is None:
                raise BatchResultError(f"{COMPLETIONS_FILE} in the result is not a file")
            for count, raw in enumerate(iter(lambda: stream.readline(MAX_COMPLETION_LINE_BYTES + 1), b""), 1):
                if count > lines:
                    raise BatchResultError(f"the result has more answers than the {lines} prompts")
                yield _answer(raw, count)
    except (OSError, tarfile.TarError) as error:
        raise BatchResultError(f"the result is not a readable archive: {error}") from None
    if count != lines:
        raise BatchResultError(f"the result answers {count} of the {lines} prompts")


def count_usage(result_archive: Path, *, lines: int, max_tokens: int, dataset_bytes: int) -> BatchUsage:
    """The tokens a delivered result is charged for; raises BatchResultError as read_answers does."""
    prompt_tokens = completion_tokens = 0
    for reported_prompt, reported_completion, text in read_answers(result_archive, lines=lines):
        prompt_tokens += reported_prompt
        completion_tokens += min(reported_completion, max_tokens, len(text.encode()) + 1)
    return BatchUsage(min(prompt_tokens, prompt_token_bound(dataset_bytes, lines)), completion_tokens)


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
