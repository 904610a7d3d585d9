"""Catalogue models on this node: fetched file by file from the coordinator's artifacts (or its peers,
through swarm transfer) and checked against the catalogue's sha256 before use. A node downloads models
from nowhere else.

A model lives in one directory of the engine's model cache, named after its GGUF's hash:
<models>/<gguf sha256[:16]>/ holds the GGUF under its catalogue name (the built-in model's layout since
the first release, so its cached file is found), the Hugging Face files the engine trains from when the
model has them, and model.json: the catalogue's record of the files, written once they are all there
and verified. The engine is given the directory (training from its safetensors, exporting llama.cpp
adapters for the GGUF beside them) or the GGUF alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from compute_swarm import protocol
from compute_swarm.engine.catalogue import models_directory, verified_sha256
from compute_swarm.engine.jobs import CATALOGUE
from compute_swarm.sdk.client import SwarmError

logger = logging.getLogger(__name__)

RECORD_FILE = "model.json"
# Fetch(sha256, destination, size) → the verified file at destination.
Fetch = Callable[[str, Path, int], Path]


class ModelFilesError(SwarmError):
    """A model file that did not arrive whole, or arrived with other content than the catalogue's."""


@dataclass(frozen=True)
class LocalModel:
    name: str
    gguf: Path
    directory: Path | None  # the Hugging Face directory beside the GGUF, when the model has one

    @property
    def engine_reference(self) -> str:
        """What the engine trains from: the directory with its safetensors, else the GGUF."""
        return str(self.directory if self.directory is not None else self.gguf)


def model_directory(files: protocol.ModelFiles, models: Path | None = None) -> Path:
    return (models or models_directory()) / files.gguf.sha256[:16]


def fetch_model(
    files: protocol.ModelFiles, fetch: Fetch, *, with_weights: bool, models: Path | None = None
) -> LocalModel:
    """The model on this machine, fetching what is missing: the GGUF, and its Hugging Face files when
    `with_weights` (a fine-tune needs them; serving needs the GGUF only). Files already here are
    hashed once per process (engine.catalogue.verified_sha256); a damaged one is fetched again."""
    directory = model_directory(files, models)
    directory.mkdir(parents=True, exist_ok=True)
    wanted = [files.gguf, *(files.weights if with_weights else ())]
    for file in wanted:
        path = directory / file.name
        if path.is_file():
            if path.stat().st_size == file.size and verified_sha256(path) == file.sha256:
                continue
            logger.warning("the cached %s of model %s is damaged; fetching it again", file.name, files.name)
            path.unlink()
        logger.info("fetching %s of model %s (%d bytes)", file.name, files.name, file.size)
        fetched = fetch(file.sha256, path, file.size)
        if fetched != path:
            os.replace(fetched, path)
        if verified_sha256(path) != file.sha256:
            path.unlink(missing_ok=True)
            raise ModelFilesError(f"{file.name} of model {files.name} does not match the catalogue's sha256")
    _write_record(directory, files, with_weights)
    return LocalModel(
        files.name, directory / files.gguf.name, directory if with_weights and files.weights else None
    )


def _write_record(directory: Path, files: protocol.ModelFiles, with_weights: bool) -> None:
    known = _read_record(directory)
    weights = files.weights if with_weights else (known.weights if known is not None else ())
    record = files.model_copy(update={"weights": weights})
    temporary = directory / f".{RECORD_FILE}.{os.getpid()}"
    temporary.write_text(record.model_dump_json())
    os.replace(temporary, directory / RECORD_FILE)


def _read_record(directory: Path) -> protocol.ModelFiles | None:
    try:
        return protocol.ModelFiles.model_validate_json((directory / RECORD_FILE).read_text())
    except (OSError, ValueError, ValidationError):
        return None


def _records(root: Path) -> dict[str, protocol.ModelFiles]:
    """The record of every model in the cache, by name: those fetched here, and the built-in model
    where the engine's own command fetched it from its package (no record: its files are the pinned ones)."""
    records: dict[str, protocol.ModelFiles] = {}
    with contextlib.suppress(OSError):
        for record_path in sorted(root.glob(f"*/{RECORD_FILE}")):
            record = _read_record(record_path.parent)
            if record is not None:
                records.setdefault(record.name, record)
    for name, model in CATALOGUE.items():
        records.setdefault(name, protocol.ModelFiles.of(model, with_weights=False))
    return records


def cached_models(models: Path | None = None) -> dict[str, LocalModel]:
    """The models this machine holds whole, by name (looked up by size, never hashed: a job hashes
    what it uses). A model fetched without its Hugging Face files counts, for serving."""
    root = models or models_directory()
    found: dict[str, LocalModel] = {}
    for name, record in _records(root).items():
        directory = model_directory(record, root)
        if all(_has_size(directory / file.name, file.size) for file in (record.gguf, *record.weights)):
            found[name] = LocalModel(
                name, directory / record.gguf.name, directory if record.weights else None
            )
    return found


def cached_gguf(name: str, models: Path | None = None) -> Path | None:
    model = cached_models(models).get(name)
    return model.gguf if model is not None else None


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def record_of(name: str, models: Path | None = None) -> protocol.ModelFiles | None:
    """The catalogue's record of a cached model's files (for serving them to peers)."""
    root = models or models_directory()
    return _records(root).get(name) if name in cached_models(root) else None
