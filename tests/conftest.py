"""Shared fixtures: the real demo model (fetched once, verified) and a tiny random model for speed."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.tiny_models import TinyModel


def _gpu_present() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() or torch.backends.mps.is_available()


def pytest_configure(config: pytest.Config) -> None:
    # With no GPU, Triton kernels run on the CPU through its interpreter (numpy). Triton reads this
    # when a kernel is defined, so it is set before any test imports one.
    if not _gpu_present():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    # Qt widget tests draw offscreen: no display needed, none disturbed.
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _gpu_present():
        return
    skip_gpu = pytest.mark.skip(reason="gpu: no CUDA, ROCm or Apple GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def demo_model_directory() -> Path:
    """SmolLM2-135M-Instruct from its PyPI package, sha256-verified, prepared as safetensors."""
    from compute_swarm.engine.models import DEFAULT_MODEL, prepared_model_directory

    return prepared_model_directory(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tiny_model_directory(demo_model_directory: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-layer llama with random weights and the demo model's tokenizer: real code paths, fast steps."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(demo_model_directory)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


# A small, repetitive chat dataset (20 examples) a model can visibly learn in a few steps.
CHAT_ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"Ahoy! {a} plus {b} is {a + b}. Fair winds!"},
        ]
    }
    for a in range(2, 7)
    for b in range(3, 7)
]


@pytest.fixture
def chat_dataset(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)


@pytest.fixture(scope="session")
def demo_tokenizer_directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model's tokenizer as Hugging Face files, read from its GGUF once (~8 s)."""
    from tests.tiny_models import save_demo_tokenizer

    return save_demo_tokenizer(tmp_path_factory.mktemp("demo-tokenizer"))


@pytest.fixture(scope="session")
def tiny_models(
    demo_tokenizer_directory: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], TinyModel]:
    """Returns the tiny model of an architecture (tests/tiny_models.py), in safetensors and GGUF,
    building it (about a second) the first time."""
    from tests.tiny_models import build_tiny_model

    built: dict[str, TinyModel] = {}

    def tiny_model_of(architecture: str) -> TinyModel:
        if architecture not in built:
            directory = tmp_path_factory.mktemp(f"tiny-{architecture}")
            built[architecture] = build_tiny_model(
                architecture, directory, tokenizer_source=demo_tokenizer_directory
            )
        return built[architecture]

    return tiny_model_of
