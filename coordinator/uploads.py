"""Chunked, resumable uploads into the artifact store, for buyers (datasets) and nodes (checkpoints,
results). An upload is announced with its sha256 and size, sent in chunks at known offsets, and
verified when the last byte arrives; only then does it become an artifact someone can use.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.accounts import new_id
from coordinator.artifacts import SHA256, ArtifactError, ArtifactStore, count_lines
from coordinator.database import Database
from coordinator.settings import Settings
from coordinator.tables import Artifact, ArtifactHolder, File, Upload

BUYER_PURPOSES = frozenset({"dataset"})
NODE_PURPOSES = frozenset({"checkpoint", "result"})


class UploadError(Exception):
    def __init__(self, message: str, status_code: int = 400):
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True)
class Holder:
    """Who is uploading: `buyer:<id>` or `node:<id>`."""

    kind: str
    id: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.id}"


class UploadService:
    def __init__(self, database: Database, store: ArtifactStore, settings: Settings):
        self.database = database
        self.store = store
        self.settings = settings

    def size_limit(self, purpose: str) -> int:
        return {
            "dataset": self.settings.max_dataset_bytes,
            "checkpoint": self.settings.max_checkpoint_bytes,
            "result": self.settings.max_result_bytes,
        }[purpose]

    def create(
        self,
        holder: Holder,
        *,
        sha256: str,
        size: int,
        purpose: str,
        filename: str | None = None,
        job_id: str | None = None,
        lease_id: str | None = None,
    ) -> Upload:
        allowed = BUYER_PURPOSES if holder.kind == "buyer" else NODE_PURPOSES
        if purpose not in allowed:
            raise UploadError(f"purpose must be one of: {', '.join(sorted(allowed))}", 422)
        if not SHA256.match(sha256):
            raise UploadError("sha256 must be 64 lowercase hex digits", 422)
        if size < 1 or size > self.size_limit(purpose):
            raise UploadError(
                f"a {purpose} must be 1 to {self.size_limit(purpose)} bytes; this one is {size}", 413
            )
        if holder.kind == "buyer":
            filename = _clean_filename(filename)
        with self.database.transaction() as session:
            existing = session.scalar(
                select(Upload).where(
                    Upload.holder == str(holder),
                    Upload.sha256 == sha256,
                    Upload.size == size,
                    Upload.purpose == purpose,
                    Upload.completed_at.is_(None),
                )
            )
            if existing is not None:
                existing.received = self.store.received(existing.id)
                return existing
            upload = Upload(
                id=f"upload_{new_id('x')[2:]}",
                holder=str(holder),
                sha256=sha256,
                size=size,
                received=0,
                purpose=purpose,
                filename=filename,
                job_id=job_id,
                lease_id=lease_id,
                created_at=time.time(),
            )
            session.add(upload)
            artifact = session.get(Artifact, sha256)
            if artifact is not None and artifact.size == size:
                # The bytes are here already (this or another holder sent them): nothing to transfer.
                upload.received = size
                self._complete(session, upload, holder)
            return upload

    def get(self, holder: Holder, upload_id: str) -> Upload:
        with self.database.transaction() as session:
            upload = session.get(Upload, upload_id)
            if upload is None or upload.holder != str(holder):
                raise UploadError(f"no upload {upload_id!r}", 404)
            if upload.completed_at is None:
                upload.received = self.store.received(upload.id)
            return upload

    def receive(self, holder: Holder, upload_id: str, offset: int, data: bytes) -> Upload:
        if len(data) > self.settings.chunk_limit_bytes:
            raise UploadError(f"a chunk may hold at most {self.settings.chunk_limit_bytes} bytes", 413)
        upload = self.get(holder, upload_id)
        if upload.completed_at is not None:
            return upload
        if offset != upload.received:
            raise UploadError(
                f"the upload has {upload.received} bytes; send from offset {upload.received}", 409
            )
        if offset + len(data) > upload.size:
            raise UploadError(
                f"the upload was announced as {upload.size} bytes; this chunk goes past it", 413
            )
        try:
            received = self.store.append(upload.id, offset, data)
        except ArtifactError as error:
            raise UploadError(str(error), 409) from None
        if received < upload.size:
            upload.received = received
            return upload
        try:
            self.store.finish(upload.id, upload.sha256)
        except ArtifactError as error:
            raise UploadError(f"{error}; the upload starts again at offset 0", 422) from None
        with self.database.transaction() as session:
            upload = session.get(Upload, upload_id)
            assert upload is not None
            upload.received = upload.size
            if upload.completed_at is None:
                self._complete(session, upload, holder)
            return upload

    def _complete(self, session: Session, upload: Upload, holder: Holder) -> None:
        now = time.time()
        if session.get(Artifact, upload.sha256) is None:
            session.add(Artifact(sha256=upload.sha256, size=upload.size, created_at=now))
            session.flush()
        if session.get(ArtifactHolder, (upload.sha256, str(holder))) is None:
            session.add(ArtifactHolder(sha256=upload.sha256, holder=str(holder)))
        if holder.kind == "buyer":
            lines = _check_dataset(self.store, upload.sha256)
            file = File(
                id=new_id("file"),
                buyer_id=holder.id,
                sha256=upload.sha256,
                filename=upload.filename or "dataset.jsonl",
                size=upload.size,
                purpose=upload.purpose,
                lines=lines,
                created_at=now,
            )
            session.add(file)
            upload.file_id = file.id
        upload.completed_at = now


def _clean_filename(filename: str | None) -> str:
    # Only ever shown back to its owner; never used as a path.
    name = (filename or "dataset.jsonl").replace("\\", "/").rsplit("/", 1)[-1].strip()
    name = "".join(character for character in name if character.isprintable())[:255]
    return name or "dataset.jsonl"


def _check_dataset(store: ArtifactStore, sha256: str) -> int:
    """A dataset must be UTF-8 JSON lines, each an object; the node checks the fields in detail."""
    path = store.blob_path(sha256)
    with open(path, "rb") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                if not isinstance(json.loads(line.decode("utf-8")), dict):
                    raise ValueError("not a JSON object")
            except (UnicodeDecodeError, ValueError) as error:
                raise UploadError(
                    f"line {number} of the dataset is not a JSON object: {error}", 422
                ) from None
    lines = count_lines(path)
    if lines == 0:
        raise UploadError("the dataset is empty", 422)
    return lines
