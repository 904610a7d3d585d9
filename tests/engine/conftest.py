"""Engine fixtures: each tiny model in turn (tests/conftest.py builds them once per session)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.tiny_models import ARCHITECTURES, TinyModel


@pytest.fixture(params=ARCHITECTURES)
def tiny_model(request: pytest.FixtureRequest, tiny_models: Callable[[str], TinyModel]) -> TinyModel:
    """Each tiny model in turn, as safetensors and as its f32 GGUF."""
    return tiny_models(request.param)


@pytest.fixture
def tiny_llama(tiny_models: Callable[[str], TinyModel]) -> TinyModel:
    return tiny_models("llama")
