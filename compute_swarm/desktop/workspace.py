"""The node's data directory: one directory per job (what the engine writes, the checkpoint it resumes
from, the worker.log kept afterwards) and a content-addressed cache of downloaded artifacts, bounded in
size.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from compute_swarm.desktop import transfer
from compute_swarm.engine import artifacts
from compute_swarm.sdk.client import pack_directory, sha256_of_file

logger = logging.getLogger(__name__)

KEEP_JOB_LOGS = 3
ARTIFACT_CACHE_BYTES = 5 * 2**30


def output_directory(job_directory: Path) -> Path:
    """Where the engine writes the adapter, its checkpoints and worker.log."""
    return job_directory / "output"


def resume_directory(job_directory: Path) -> Path:
    """Where the checkpoint a lease resumes from is unpacked."""
    return job_directory / "resume"


def under_verification_directory(job_directory: Path) -> Path:
    """Where a verification re-run unpacks the result another node delivered, to evaluate it."""
    return job_directory / "under-verification"


def result_staging_directory(job_directory: Path) -> Path:
    """Where the result files are gathered to be packed."""
    return job_directory / "result"


def pack_result(job_directory: Path, archive: Path, dataset_sha256: str) -> str:
    """The job's result (engine.artifacts.stage_result) in a staging directory, then a tar; its sha256."""
    staging = result_staging_directory(job_directory)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    artifacts.stage_result(output_directory(job_directory), staging, dataset_sha256)
    try:
        return pack_directory(staging, archive)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class Workspace:
    """One node's data directory. Every method blocks on the file system: call it from a thread.

    `transfer`, set while the agent runs with peer transfer, fetches artifacts from their swarms and
    serves the cached ones back to peers; the cache's bound is `cache_bytes`."""

    def __init__(self, data_dir: Path, *, cache_bytes: int = ARTIFACT_CACHE_BYTES):
        self.data_dir = data_dir
        self.cache_bytes = cache_bytes
        self.transfer: transfer.PeerTransfer | None = None

    def download(self, client: Any, sha256: str, destination: Path, size: int | None) -> Path:
        """An artifact from its swarm where there is one, else over HTTP (transfer.fetch_artifact)."""
        return transfer.fetch_artifact(client, self.transfer, sha256, destination, size=size)

    def forget_artifact(self, sha256: str) -> None:
        """An artifact whose file is gone (a checkpoint unpacked, a file evicted): no longer served."""
        if self.transfer is not None:
            self.transfer.forget(sha256)

    @property
    def jobs_directory(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def artifacts_directory(self) -> Path:
        return self.data_dir / "artifacts"

    def job_directory(self, job_id: str) -> Path:
        return self.jobs_directory / job_id  # an Identifier: letters, digits, - and _

    def artifact_path(self, sha256: str) -> Path:
        return self.artifacts_directory / sha256

    def clear_job_directory(self, job_directory: Path) -> None:
        """A fresh start for an attempt: what an earlier attempt on this node left is no use now."""
        for leftover in (output_directory, resume_directory, result_staging_directory):
            shutil.rmtree(leftover(job_directory), ignore_errors=True)
        job_directory.mkdir(parents=True, exist_ok=True)

    def fetch_artifact(
        self, sha256: str, download: Callable[[str, Path], object], keep: Iterable[str | None]
    ) -> Path:
        """The artifact from the cache, downloading it when it is not there; then the cache is trimmed,
        sparing the artifacts named in `keep`."""
        path = self.artifact_path(sha256)
        if path.is_file():
            if sha256_of_file(path) == sha256:
                os.utime(path)  # recently used: evicted last
                return path
            logger.warning("cached artifact %s is damaged; downloading it again", sha256[:12])
            path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        download(sha256, path)
        self.evict_artifacts({name for name in keep if name})
        return path

    def tidy_job(self, job_id: str, running: frozenset[str] = frozenset()) -> None:
        """Remove a finished job's files, keeping its worker.log; keep the newest KEEP_JOB_LOGS logs."""
        directory = self.job_directory(job_id)
        if directory.is_dir() and job_id not in running:  # else a newer attempt runs in it now
            log = output_directory(directory) / artifacts.WORKER_LOG
            if log.is_file():  # appended to the log of an earlier attempt on this node, if any
                with open(directory / artifacts.WORKER_LOG, "ab") as kept, open(log, "rb") as latest:
                    shutil.copyfileobj(latest, kept)
                log.unlink()
            for child in directory.iterdir():
                if child.name == artifacts.WORKER_LOG:
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
            os.utime(directory)
        self.prune_job_logs(running)

    def tidy_all_jobs(self) -> None:
        """At start: jobs left by an earlier run have lost their leases; only their logs are worth keeping."""
        if self.jobs_directory.is_dir():
            for directory in self.jobs_directory.iterdir():
                if directory.is_dir():
                    self.tidy_job(directory.name)
        self.evict_artifacts(set())

    def prune_job_logs(self, running: frozenset[str]) -> None:
        if not self.jobs_directory.is_dir():
            return
        finished = [
            directory
            for directory in self.jobs_directory.iterdir()
            if directory.is_dir() and directory.name not in running
        ]
        finished.sort(key=lambda directory: directory.stat().st_mtime, reverse=True)
        for old in finished[KEEP_JOB_LOGS:]:
            shutil.rmtree(old, ignore_errors=True)

    def evict_artifacts(self, keep: set[str]) -> None:
        """Bound the artifact cache to `cache_bytes`, dropping the least recently used first."""
        if not self.artifacts_directory.is_dir():
            return
        entries = []
        for path in self.artifacts_directory.iterdir():
            with contextlib.suppress(OSError):
                status = path.stat()
                entries.append((status.st_mtime, status.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.cache_bytes:
                break
            sha256 = path.name.split(".")[0]
            if sha256 in keep:
                continue
            self.forget_artifact(sha256)
            with contextlib.suppress(OSError):
                path.unlink()
                total -= size
                logger.debug("evicted cached artifact %s", path.name)
