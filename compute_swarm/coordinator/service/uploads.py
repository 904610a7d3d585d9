"""Chunked, resumable uploads into the artifact store, for buyers (datasets) and nodes (checkpoints,
results). An upload is announced with its sha256 and size, sent in chunks at known offsets, and
verified when the last byte arrives; only then does it become an artifact someone can use.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from compute_swarm.coordinator.service.accounts import new_id
from compute_swarm.coordinator.settings import Settings
from compute_swarm.coordinator.store.artifacts import SHA256, ArtifactError, ArtifactStore
from compute_swarm.coordinator.store.database import Database
from compute_swarm.coordinator.store.tables import Artifact, ArtifactHolder, File, Upload
from compute_swarm.engine.jobs import parse_line, parse_prompt_line

# dataset: fine-tuning examples; prompts: a batch inference job's input.
BUYER_PURPOSES = frozenset({"dataset", "prompts"})
# adapter: a LoRA result as a llama.cpp adapter (GGUF), which serves its fine-tuned model.
NODE_PURPOSES = frozenset({"checkpoint", "result", "adapter"})
# Bad lines reported at once: enough to see a pattern, short enough to read.
MAX_REPORTED_LINES = 10
# One example a line; a longer line is a broken file, and reading it would take that much memory.
MAX_LINE_BYTES = 16 * 1024 * 1024


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
            "prompts": self.settings.max_dataset_bytes,
            "checkpoint": self.settings.max_checkpoint_bytes,
            "result": self.settings.max_result_bytes,
            "adapter": self.settings.max_result_bytes,
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
            if (
                artifact is not None
                and artifact.size == size
                and session.get(ArtifactHolder, (sha256, str(holder))) is not None
            ):
                # This holder sent these bytes before: nothing to transfer. Anyone else must send them,
                # so that naming a hash never stands in for having the content.
                upload.received = size
                earlier = session.scalar(select(File.lines).where(File.sha256 == sha256).limit(1))
                self._complete(session, upload, holder, lines=earlier or 0)
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
        lines = 0
        if holder.kind == "buyer":
            # Checked before the database transaction: reading a large file must not hold the write lock.
            try:
                lines = check_lines(self.store.blob_path(upload.sha256), upload.purpose)
            except UploadError:
                self._discard_unregistered(upload.sha256)
                raise
        with self.database.transaction() as session:
            upload = session.get(Upload, upload_id)
            assert upload is not None
            upload.received = upload.size
            if upload.completed_at is None:
                self._complete(session, upload, holder, lines=lines)
            return upload

    def upload_whole(self, holder: Holder, source: BinaryIO, *, purpose: str, filename: str | None) -> File:
        """Store a file sent in one request (OpenAI's /v1/files): hashed, then fed through the same
        chunked path, checks included. Returns the buyer's new file."""
        digest, size = hashlib.sha256(), 0
        source.seek(0)
        while block := source.read(1 << 20):
            digest.update(block)
            size += len(block)
        upload = self.create(holder, sha256=digest.hexdigest(), size=size, purpose=purpose, filename=filename)
        source.seek(upload.received)
        while upload.completed_at is None:
            upload = self.receive(
                holder, upload.id, upload.received, source.read(self.settings.chunk_limit_bytes)
            )
        with self.database.reading() as session:
            file = session.get(File, upload.file_id)
        assert file is not None
        return file

    def _discard_unregistered(self, sha256: str) -> None:
        with self.database.transaction() as session:
            if session.get(Artifact, sha256) is None:
                self.store.delete(sha256)

    def _complete(self, session: Session, upload: Upload, holder: Holder, *, lines: int) -> None:
        now = time.time()
        if session.get(Artifact, upload.sha256) is None:
            session.add(Artifact(sha256=upload.sha256, size=upload.size, created_at=now))
            session.flush()
        if session.get(ArtifactHolder, (upload.sha256, str(holder))) is None:
            session.add(ArtifactHolder(sha256=upload.sha256, holder=str(holder)))
        if holder.kind == "buyer":
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


def check_lines(path: Path, purpose: str) -> int:
    """Validate a buyer's JSONL line by line, as the node will read it (engine.jobs' line formats), and
    return its number of examples. The error names each bad line (up to MAX_REPORTED_LINES)."""
    parse = parse_line if purpose == "dataset" else parse_prompt_line
    what = "fine-tuning dataset" if purpose == "dataset" else "prompts file"
    examples = number = 0
    problems: list[str] = []
    with open(path, "rb") as file:
        while line := file.readline(MAX_LINE_BYTES + 1):
            number += 1
            if len(line) > MAX_LINE_BYTES:
                problems.append(f"line {number}: longer than {MAX_LINE_BYTES} bytes")
                break  # the rest of the file cannot be read line by line
            if not line.strip():
                continue
            try:
                parse(line.decode("utf-8"))
                examples += 1
            except UnicodeDecodeError as error:
                problems.append(f"line {number}: not UTF-8 (byte {error.start})")
            except (ValueError, RecursionError) as error:
                reason = "nested too deeply" if isinstance(error, RecursionError) else error
                problems.append(f"line {number}: {reason}")
            if len(problems) >= MAX_REPORTED_LINES:
                problems.append("(stopped after the first bad lines)")
                break
    if problems:
        raise UploadError(f"the {what} has bad lines: " + "; ".join(problems), 422)
    if examples == 0:
        raise UploadError(f"the {what} is empty", 422)
    return examples
