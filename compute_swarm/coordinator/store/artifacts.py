"""The content-addressed blob store: verified blobs by sha256, and uploads in progress.

A blob only enters the store after its bytes hash to the name it was announced under, so a reader
never sees partial or corrupted content. Names chosen by uploaders are never used as paths.

Alone, a coordinator keeps everything on its disk. Replicas behind one load balancer share a bucket
(store.bucket): every blob is put there before the transaction that names it commits, each replica
keeps the blobs it served on its disk (fetched from the bucket, and checked again, the first time),
and an upload's chunks go to the bucket, so each may arrive through a different replica.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
from pathlib import Path

from compute_swarm.coordinator.store.bucket import Bucket
from compute_swarm.engine.catalogue import sha256_of_file

SHA256 = re.compile(r"^[0-9a-f]{64}$")
_UPLOAD_ID = re.compile(r"^upload_[0-9a-f]{16}$")


class ArtifactError(ValueError):
    pass


class ArtifactStore:
    def __init__(self, root: Path, bucket: Bucket | None = None):
        self.root = root
        self.bucket = bucket
        self.blobs = root / "blobs"
        self.scratch = root / "uploads"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.scratch.mkdir(parents=True, exist_ok=True)

    @classmethod
    def configured(cls, root: Path, bucket: str = "", endpoint: str = "") -> ArtifactStore:
        """The store as the settings name it: on this disk, and in the bucket `s3://...` if one."""
        return cls(root, Bucket(bucket, endpoint) if bucket else None)

    def blob_path(self, sha256: str) -> Path:
        """Where the blob is on this replica's disk, fetched from the shared bucket first when it is
        there and not here yet. (Without a bucket, or without the blob: where it would be.)"""
        local = self._local(sha256)
        if self.bucket is not None and not local.is_file():
            self._fetch(sha256, local)
        return local

    def has(self, sha256: str) -> bool:
        if self._local(sha256).is_file():
            return True
        return self.bucket is not None and self.bucket.size(self.bucket.key("blobs", sha256)) is not None

    def delete(self, sha256: str) -> None:
        """Forget a blob no file or job names any more (the caller checked)."""
        self._local(sha256).unlink(missing_ok=True)
        if self.bucket is not None:
            self.bucket.delete([self.bucket.key("blobs", sha256)])

    def adopt(self, source: Path, sha256: str) -> None:
        """Add a file already verified to hash to `sha256` (a catalogue model): hard-linked where the
        file system allows, else copied."""
        target = self._local(sha256)
        if not target.is_file():
            target.parent.mkdir(exist_ok=True)
            scratch = self.scratch / f"adopt_{sha256[:16]}_{secrets.token_hex(8)}"
            try:
                os.link(source, scratch)
            except OSError:
                shutil.copyfile(source, scratch)
            os.replace(scratch, target)
            _fsync_directory(target.parent)
        self._share(sha256, target)

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
            target = self._local(sha256)
            target.parent.mkdir(exist_ok=True)
            os.replace(scratch, target)
            _fsync_directory(target.parent)
        finally:
            scratch.unlink(missing_ok=True)
        self._share(sha256, target)
        return sha256, size

    def scratch_path(self, upload_id: str) -> Path:
        if not _UPLOAD_ID.match(upload_id):
            raise ArtifactError("not an upload id")
        return self.scratch / upload_id

    def received(self, upload_id: str) -> int:
        if self.bucket is not None:
            return sum(size for _, size in self._chunks(upload_id))
        path = self.scratch_path(upload_id)
        return path.stat().st_size if path.exists() else 0

    def append(self, upload_id: str, offset: int, data: bytes) -> int:
        """Write data at offset (the bytes received so far); returns the new size."""
        if self.bucket is not None:
            received = self.received(upload_id)
            if received != offset:
                raise ArtifactError(f"the upload has {received} bytes, not {offset}")
            # Named by offset: the listing gives the chunks in order, and a chunk sent twice (a
            # retry whose answer was lost) overwrites itself.
            self.bucket.put(self.bucket.key("uploads", upload_id, f"{offset:016d}"), data)
            return offset + len(data)
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
        chunks = self._chunks(upload_id) if self.bucket is not None else []
        if self.bucket is not None:
            self._assemble(chunks, path)
        actual = sha256_of_file(path)
        if actual != sha256:
            self.discard(upload_id)
            raise ArtifactError(f"the uploaded bytes hash to {actual}, not {sha256}")
        target = self._local(sha256)
        target.parent.mkdir(exist_ok=True)
        size = path.stat().st_size
        os.replace(path, target)
        _fsync_directory(target.parent)
        self._share(sha256, target)
        if self.bucket is not None:
            self.bucket.delete([key for key, _ in chunks])
        return size

    def discard(self, upload_id: str) -> None:
        self.scratch_path(upload_id).unlink(missing_ok=True)
        if self.bucket is not None:
            self.bucket.delete([key for key, _ in self._chunks(upload_id)])

    # ---- the disk, and the shared bucket

    def _local(self, sha256: str) -> Path:
        if not SHA256.match(sha256):
            raise ArtifactError("not a sha256 in lowercase hex")
        return self.blobs / sha256[:2] / sha256

    def _share(self, sha256: str, local: Path) -> None:
        """Put a blob in the bucket (before the transaction naming it commits), unless it is there."""
        if self.bucket is None:
            return
        key = self.bucket.key("blobs", sha256)
        if self.bucket.size(key) != local.stat().st_size:
            self.bucket.upload(local, key)

    def _fetch(self, sha256: str, local: Path) -> None:
        """Bring a blob from the bucket to this replica's disk, if the bucket has it, checking its
        bytes again: a bucket's copy is trusted no more than an upload."""
        assert self.bucket is not None
        key = self.bucket.key("blobs", sha256)
        if self.bucket.size(key) is None:
            return
        scratch = self.scratch / f"fetch_{sha256[:16]}_{secrets.token_hex(8)}"
        try:
            self.bucket.download(key, scratch)
            actual = sha256_of_file(scratch)
            if actual != sha256:
                raise ArtifactError(f"the bucket's copy of {sha256} hashes to {actual}: not served")
            local.parent.mkdir(exist_ok=True)
            os.replace(scratch, local)
            _fsync_directory(local.parent)
        finally:
            scratch.unlink(missing_ok=True)

    def _chunks(self, upload_id: str) -> list[tuple[str, int]]:
        """An upload's chunks in the bucket, in order, as far as they follow one another."""
        assert self.bucket is not None
        self.scratch_path(upload_id)  # checks the id
        chunks, expected = [], 0
        for key, size in self.bucket.listing(self.bucket.key("uploads", upload_id) + "/"):
            if int(key.rsplit("/", 1)[-1]) != expected:
                break
            chunks.append((key, size))
            expected += size
        return chunks

    def _assemble(self, chunks: list[tuple[str, int]], path: Path) -> None:
        assert self.bucket is not None
        part = path.with_name(path.name + ".part")
        try:
            with open(path, "wb") as whole:
                for key, _ in chunks:
                    self.bucket.download(key, part)
                    with open(part, "rb") as chunk:
                        shutil.copyfileobj(chunk, whole, 1 << 20)
                whole.flush()
                os.fsync(whole.fileno())
        finally:
            part.unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    if os.name == "posix":
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
