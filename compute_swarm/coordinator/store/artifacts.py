"""The content-addressed blob store on disk: verified blobs by sha256, and upload scratch files.

A blob only enters the store after its bytes hash to the name it was announced under, so a reader
never sees partial or corrupted content. Names chosen by uploaders are never used as paths.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
from pathlib import Path

SHA256 = re.compile(r"^[0-9a-f]{64}$")
_UPLOAD_ID = re.compile(r"^upload_[0-9a-f]{16}$")


class ArtifactError(ValueError):
    pass


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = root
        self.blobs = root / "blobs"
        self.scratch = root / "uploads"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.scratch.mkdir(parents=True, exist_ok=True)

    def blob_path(self, sha256: str) -> Path:
        if not SHA256.match(sha256):
            raise ArtifactError("not a sha256 in lowercase hex")
        return self.blobs / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.blob_path(sha256).is_file()

    def adopt(self, source: Path, sha256: str) -> None:
        """Add a file already verified to hash to `sha256` (a catalogue model): hard-linked where the
        file system allows, else copied."""
        target = self.blob_path(sha256)
        if target.is_file():
            return
        target.parent.mkdir(exist_ok=True)
        scratch = self.scratch / f"adopt_{sha256[:16]}_{secrets.token_hex(8)}"
        try:
            os.link(source, scratch)
        except OSError:
            shutil.copyfile(source, scratch)
        os.replace(scratch, target)
        _fsync_directory(target.parent)

    def copy_in(self, source: Path) -> tuple[str, int]:
        """Add a local file (ops' model files), hashing it as it is copied: the blob holds exactly the
        bytes hashed, whatever happens to the original later. Returns its sha256 and size."""
        scratch = self.scratch / f"copy_{secrets.token_hex(8)}"
        digest = hashlib.sha256()
        try:
            with open(source, "rb") as reader, open(scratch, "wb") as writer:
                for block in iter(lambda: reader.read(1 << 20), b""):
                    digest.update(block)
                    writer.write(block)
                writer.flush()
                os.fsync(writer.fileno())
            sha256, size = digest.hexdigest(), scratch.stat().st_size
            target = self.blob_path(sha256)
            target.parent.mkdir(exist_ok=True)
            os.replace(scratch, target)
            _fsync_directory(target.parent)
        finally:
            scratch.unlink(missing_ok=True)
        return sha256, size

    def scratch_path(self, upload_id: str) -> Path:
        if not _UPLOAD_ID.match(upload_id):
            raise ArtifactError("not an upload id")
        return self.scratch / upload_id

    def received(self, upload_id: str) -> int:
        path = self.scratch_path(upload_id)
        return path.stat().st_size if path.exists() else 0

    def append(self, upload_id: str, offset: int, data: bytes) -> int:
        """Write data at offset (the bytes received so far); returns the new size."""
        path = self.scratch_path(upload_id)
        with open(path, "ab") as scratch:
            if scratch.tell() != offset:
                raise ArtifactError(f"the upload has {scratch.tell()} bytes, not {offset}")
            scratch.write(data)
            scratch.flush()
            os.fsync(scratch.fileno())
            return scratch.tell()

    def finish(self, upload_id: str, sha256: str) -> int:
        """Verify a complete upload and move it into the store; returns its size. A mismatch discards
        the bytes (the uploader starts again) and raises ArtifactError."""
        path = self.scratch_path(upload_id)
        digest = hashlib.sha256()
        with open(path, "rb") as scratch:
            for block in iter(lambda: scratch.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != sha256:
            path.unlink(missing_ok=True)
            raise ArtifactError(f"the uploaded bytes hash to {digest.hexdigest()}, not {sha256}")
        target = self.blob_path(sha256)
        target.parent.mkdir(exist_ok=True)
        size = path.stat().st_size
        os.replace(path, target)
        _fsync_directory(target.parent)
        return size

    def discard(self, upload_id: str) -> None:
        self.scratch_path(upload_id).unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    if os.name == "posix":
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
