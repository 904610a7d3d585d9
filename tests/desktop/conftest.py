"""Fixtures for the node agent's tests: the token store keeps to a file under the test's directory, and
the model cache is an empty one there."""

from __future__ import annotations

from pathlib import Path

import pytest

from desktop import token_store


@pytest.fixture(autouse=True)
def file_token_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(token_store.STORE_ENVIRONMENT_VARIABLE, "file")
    monkeypatch.setenv("SWARM_MODELS_DIR", str(tmp_path / "models"))
