"""Tokens counted on the coordinator, with each model's own tokenizer: what a buyer pays for and a
node is paid for is measured here, never taken from what a node says (DESIGN.md, Job lifecycle).

The tokenizer comes from the model's GGUF file, the same verified file the nodes run: its vocabulary,
merges and chat template are read (no weights), and rebuilt with Hugging Face's `tokenizers` (no torch).
A model whose tokenizer cannot be rebuilt here (a pre-tokenizer this file does not know) has no
counter, and is charged by the bounds the relay already enforces instead; the log says so.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) → how Hugging Face's tokenizers splits text
# before byte-level BPE. SmolLM's: every digit on its own, then GPT-2's regex.
BYTE_LEVEL_PRE_TOKENIZERS = {"smollm", "gpt-2", "default"}
CONTROL_TOKEN = 3  # tokenizer.ggml.token_type of special tokens such as <|im_start|>
# The layout of the tokenizer saved beside a model file; another number rebuilds it.
SAVED_FORMAT = 1


class TokenizerUnavailable(Exception):
    """This model's tokenizer cannot be rebuilt on the coordinator."""


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


class TokenCounter:
    """Counts the tokens of generated text, of a prompt, and of a chat as its template renders it."""

    def __init__(self, tokenizer, chat_template: str | None, bos_token: str, eos_token: str):
        self._tokenizer = tokenizer
        self._template = None
        if chat_template:
            # The template is the model file's, not ours: rendered in jinja's sandbox, as llama.cpp does.
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            self._template = environment.from_string(chat_template)
        self._bos_token, self._eos_token = bos_token, eos_token

    def count(self, text: str) -> int:
        """Tokens of text as the model reads it (special tokens written out count as one each)."""
        if not text:
            return 0
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def count_chat(self, messages: Sequence[ChatMessage]) -> int:
        """Tokens of the prompt a chat becomes: the messages in the model's template, up to where the
        assistant's answer starts."""
        if self._template is None:
            return sum(self.count(message.content) for message in messages)
        rendered = self._template.render(
            messages=[{"role": message.role, "content": message.content} for message in messages],
            add_generation_prompt=True,
            bos_token=self._bos_token,
            eos_token=self._eos_token,
        )
        return self.count(rendered)


def counter_from_gguf(path: Path) -> TokenCounter:
    """The counter of a GGUF model: rebuilt from the file's metadata once (about 2 s: a few MB read,
    no weights), then read back from the copy saved beside the file (a tenth of that)."""
    from tokenizers import Tokenizer

    saved = path.with_name(path.name + ".tokenizer.json")
    try:
        data = json.loads(saved.read_text())
        if data.get("format") == SAVED_FORMAT:
            return TokenCounter(
                Tokenizer.from_str(data["tokenizer"]), data["chat_template"], data["bos"], data["eos"]
            )
    except (OSError, ValueError, KeyError):
        pass  # not saved yet, or unreadable: rebuilt below
    data = _tokenizer_from_gguf(path)
    try:
        scratch = saved.with_name(f".{saved.name}.{os.getpid()}")
        scratch.write_text(json.dumps(data))
        os.replace(scratch, saved)
    except OSError as error:  # a read-only model cache costs the rebuild next time, nothing more
        logger.info("could not save the tokenizer of %s: %s", path.name, error)
    return TokenCounter(
        Tokenizer.from_str(data["tokenizer"]), data["chat_template"], data["bos"], data["eos"]
    )


def _tokenizer_from_gguf(path: Path) -> dict:
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    fields = GGUFReader(path).fields

    def value(key: str, default=None):
        field = fields.get(key)
        return default if field is None else field.contents()

    kind, pre = value("tokenizer.ggml.model"), value("tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in BYTE_LEVEL_PRE_TOKENIZERS:
        raise TokenizerUnavailable(
            f"{path.name}: no counter for a {kind!r} tokenizer with pre-tokenizer {pre!r}"
        )
    tokens: list[str] = value("tokenizer.ggml.tokens")
    types: list[int] = value("tokenizer.ggml.token_type")
    merges = [tuple(merge.split(" ", 1)) for merge in value("tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE({token: index for index, token in enumerate(tokens)}, merges))
    splits = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if pre == "smollm":
        splits.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(splits)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [
            AddedToken(token, special=True, normalized=False)
            for token, kind in zip(tokens, types, strict=True)
            if kind == CONTROL_TOKEN
        ]
    )
    bos, eos = value("tokenizer.ggml.bos_token_id"), value("tokenizer.ggml.eos_token_id")
    return {
        "format": SAVED_FORMAT,
        "tokenizer": tokenizer.to_str(),
        "chat_template": value("tokenizer.chat_template"),
        "bos": tokens[bos] if bos is not None else "",
        "eos": tokens[eos] if eos is not None else "",
    }


class TokenCounters:
    """One counter per catalogue model, loaded on first use from the model's verified file (fetched
    into the shared model cache if missing). Thread-safe; a model that cannot be counted is remembered
    as such, so it is not fetched again for every request."""

    def __init__(self, model_file: Callable[[str], Path]):
        self._model_file = model_file
        self._counters: dict[str, TokenCounter | None] = {}
        self._lock = threading.Lock()

    def get(self, model_name: str) -> TokenCounter | None:
        with self._lock:
            if model_name in self._counters:
                return self._counters[model_name]
            try:
                counter: TokenCounter | None = counter_from_gguf(self._model_file(model_name))
            except Exception as error:  # a download that failed, a tokenizer we cannot rebuild
                logger.warning("tokens of %s are bounded, not counted: %s", model_name, error)
                counter = None
            self._counters[model_name] = counter
            return counter

    def preload(self, model_names: Sequence[str]) -> None:
        """Load every model's counter now (a worker thread at start-up), so that no buyer waits for a
        model file to be fetched or a tokenizer rebuilt."""
        for name in model_names:
            self.get(name)
