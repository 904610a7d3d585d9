"""A node's copies of catalogue models (desktop.model_files): fetched file by file through the function
it is given (the coordinator, or peers), checked against the catalogue's sha256, fetched again when the
cached copy is damaged, and found again later by the record written once every file is there."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from compute_swarm import protocol
from compute_swarm.desktop import model_files
from compute_swarm.desktop.node_description import cached_catalogue_models
from compute_swarm.engine.catalogue import catalogue_model_path
from compute_swarm.engine.jobs import CATALOGUE, DEFAULT_MODEL

FILES = {
    "config.json": b'{"model_type": "llama"}',
    "model.safetensors": b"weights" * 100,
    "model.gguf": b"GGUF" * 50,
}


def files_of(contents: dict[str, bytes]) -> protocol.ModelFiles:
    def file(name: str) -> protocol.ModelFile:
        data = contents[name]
        return protocol.ModelFile(name=name, sha256=hashlib.sha256(data).hexdigest(), size=len(data))

    return protocol.ModelFiles(
        name="tiny-model", gguf=file("model.gguf"), weights=(file("config.json"), file("model.safetensors"))
    )


class Source:
    """The coordinator's artifacts, by sha256, counting what each fetch asked for."""

    def __init__(self, contents: dict[str, bytes]):
        self.by_sha256 = {hashlib.sha256(data).hexdigest(): data for data in contents.values()}
        self.fetched: list[str] = []

    def __call__(self, sha256: str, destination: Path, size: int) -> Path:
        self.fetched.append(sha256)
        destination.write_bytes(self.by_sha256[sha256])
        return destination


def test_a_model_is_fetched_once_checked_and_found_again(tmp_path: Path) -> None:
    files, source = files_of(FILES), Source(FILES)
    served = model_files.fetch_model(files, source, with_weights=False, models=tmp_path)
    assert source.fetched == [files.gguf.sha256] and served.directory is None
    assert served.gguf.read_bytes() == FILES["model.gguf"]
    assert model_files.cached_models(tmp_path)["tiny-model"].directory is None  # enough to serve it

    trained = model_files.fetch_model(files, source, with_weights=True, models=tmp_path)
    assert len(source.fetched) == 3  # the GGUF was not fetched again; the weights were
    assert trained.directory == served.gguf.parent and trained.engine_reference == str(trained.directory)
    assert (trained.directory / "config.json").read_bytes() == FILES["config.json"]
    assert model_files.cached_models(tmp_path)["tiny-model"].directory == trained.directory

    # A damaged copy (another size) is fetched again; a record is what finds the model later.
    (trained.directory / "model.safetensors").write_bytes(b"truncated")
    assert "tiny-model" not in model_files.cached_models(tmp_path)
    model_files.fetch_model(files, source, with_weights=True, models=tmp_path)
    assert source.fetched[-1] == files.weights[1].sha256
    assert model_files.record_of("tiny-model", tmp_path) == files


def test_a_file_that_arrives_with_other_content_is_refused_and_not_kept(tmp_path: Path) -> None:
    files = files_of(FILES)

    def lying_source(sha256: str, destination: Path, size: int) -> Path:
        destination.write_bytes(b"GGUF" * 49 + b"EVIL")  # the same size, other bytes
        return destination

    with pytest.raises(model_files.ModelFilesError, match="does not match the catalogue's sha256"):
        model_files.fetch_model(files, lying_source, with_weights=False, models=tmp_path)
    assert not (model_files.model_directory(files, tmp_path) / "model.gguf").exists()
    assert model_files.cached_models(tmp_path) == {}


def test_the_built_in_model_the_engine_fetched_is_found_without_a_record(
    tmp_path: Path, demo_gguf: Path
) -> None:
    """`compute-swarm-engine models` (and older nodes) keep the demo GGUF where its package put it."""
    target = catalogue_model_path(DEFAULT_MODEL, tmp_path)
    target.parent.mkdir(parents=True)
    os.link(demo_gguf, target)
    assert cached_catalogue_models(tmp_path) == (DEFAULT_MODEL,)
    assert model_files.record_of(DEFAULT_MODEL, tmp_path) == protocol.ModelFiles.of(
        CATALOGUE[DEFAULT_MODEL], with_weights=False
    )
    # A lease for it finds the file in place: nothing is fetched.
    fetched = model_files.fetch_model(
        protocol.ModelFiles.of(CATALOGUE[DEFAULT_MODEL], with_weights=True),
        lambda *arguments: pytest.fail("the cached model was fetched again"),
        with_weights=True,
        models=tmp_path,
    )
    assert fetched.gguf == target and fetched.engine_reference == str(target)
