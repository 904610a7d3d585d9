"""The coordinator's token counts, rebuilt from the model's GGUF file, against llama.cpp's own."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from compute_swarm.coordinator.service.tokens import ChatMessage, TokenCounters, counter_from_gguf
from compute_swarm.engine.jobs import DEFAULT_MODEL
from compute_swarm.engine.models import fetch_catalogue_model

llama_cpp = pytest.importorskip("llama_cpp")

TEXTS = [
    "Hello, world!",
    "The year 2026 has 365 days; π≈3.14159, 12,345.67 and 0x1F.",
    "def f(x):\n        return x**2  # squared\n\n\n",
    "日本語のテキスト, émigré, naïve, and emoji 🎉🎉 — all in UTF-8.",
    "  leading   spaces\tand\ttabs\r\nand Windows lines",
    "<|im_start|>user\nHi<|im_end|>\n",
    "x" * 1000,
    "\n" + " " * 80 + "indented",
    "",
]
CHATS = [
    [ChatMessage("user", "What is the capital of Peru?")],
    [
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "2+2?"),
        ChatMessage("assistant", "4"),
        ChatMessage("user", "and 3+3?"),
    ],
]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """The demo model's file, copied where this test may write the tokenizer saved beside it."""
    copy = tmp_path_factory.mktemp("model") / "model.gguf"
    shutil.copyfile(fetch_catalogue_model(DEFAULT_MODEL), copy)
    return copy


@pytest.fixture(scope="module")
def llama(model_file):
    return llama_cpp.Llama(str(model_file), vocab_only=True, verbose=False)


def test_text_is_counted_as_llama_cpp_counts_it(model_file, llama):
    counter = counter_from_gguf(model_file)
    for text in TEXTS:
        assert counter.count(text) == len(llama.tokenize(text.encode(), add_bos=False, special=True)), text


def test_a_chat_is_counted_as_its_template_renders_it_for_llama_cpp(model_file, llama):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    counter = counter_from_gguf(model_file)
    render = Jinja2ChatFormatter(
        template=llama.metadata["tokenizer.chat_template"], eos_token="", bos_token=""
    )
    for chat in CHATS:
        prompt = render(messages=[{"role": m.role, "content": m.content} for m in chat]).prompt
        assert counter.count_chat(chat) == len(llama.tokenize(prompt.encode(), add_bos=False, special=True))


def test_the_tokenizer_is_saved_beside_the_model_and_read_back_fast(model_file):
    saved = model_file.with_name(model_file.name + ".tokenizer.json")
    saved.unlink(missing_ok=True)
    counter_from_gguf(model_file)
    assert saved.is_file()
    started = time.monotonic()
    again = counter_from_gguf(model_file)
    assert time.monotonic() - started < 1.0
    assert again.count(TEXTS[1]) == counter_from_gguf(model_file).count(TEXTS[1])
    # A damaged copy is rebuilt, not trusted.
    saved.write_text("{not json")
    assert counter_from_gguf(model_file).count("Hello, world!") == 4


def test_a_model_that_cannot_be_counted_is_bounded_and_not_fetched_again(tmp_path, caplog):
    fetched = []

    def model_file(name: str) -> Path:
        fetched.append(name)
        broken = tmp_path / "broken.gguf"
        broken.write_bytes(b"GGUF but not really")
        return broken

    counters = TokenCounters(model_file)
    assert counters.get("broken") is None
    assert counters.get("broken") is None
    assert fetched == ["broken"]
    assert "tokens of broken are bounded, not counted" in caplog.text
