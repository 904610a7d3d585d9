"""Fixtures for the node agent's tests: the token store keeps to a file under the test's directory, and
the model cache is an empty one there (tests that serve the demo model point it at `demo_gguf`'s)."""

from __future__ import annotations

from pathlib import Path

import pytest

from compute_swarm.desktop import token_store


@pytest.fixture(autouse=True)
def file_token_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(token_store.STORE_ENVIRONMENT_VARIABLE, "file")
    monkeypatch.setenv("SWARM_MODELS_DIR", str(tmp_path / "models"))


@pytest.fixture(scope="session")
def demo_gguf() -> Path:
    """The demo model's GGUF in the shared model cache (fetched before any test empties SWARM_MODELS_DIR:
    session fixtures come first)."""
    from compute_swarm.engine.models import DEFAULT_MODEL, fetch_catalogue_model

    return fetch_catalogue_model(DEFAULT_MODEL)
