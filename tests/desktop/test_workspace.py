"""The node's data directory: finished jobs leave only their logs, and the artifact cache stays bounded."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from compute_swarm.desktop import workspace
from compute_swarm.desktop.workspace import Workspace
from compute_swarm.engine import artifacts


def test_a_tidied_job_keeps_only_its_logs_and_only_the_newest_jobs_keep_theirs(tmp_path: Path) -> None:
    space = Workspace(tmp_path)
    for number in range(workspace.KEEP_JOB_LOGS + 2):
        directory = space.job_directory(f"job_{number}")
        space.clear_job_directory(directory)
        output = workspace.output_directory(directory)
        artifacts.checkpoint_directory(output).mkdir(parents=True)
        (output / artifacts.WORKER_LOG).write_text(f"attempt of job {number}\n")
        (directory / artifacts.RESULT_ARCHIVE).write_bytes(b"tar")
        os.utime(directory, (number, number))
    running = frozenset({"job_0"})  # the oldest, but a lease still runs in it

    space.tidy_job("job_1", running)

    job_1 = space.job_directory("job_1")
    assert [path.name for path in job_1.iterdir()] == [artifacts.WORKER_LOG]
    assert (job_1 / artifacts.WORKER_LOG).read_text() == "attempt of job 1\n"
    assert (space.job_directory("job_0") / "output").is_dir()
    # job_1 was just tidied, so it is the newest; of the other finished jobs, the oldest goes.
    kept = sorted(path.name for path in space.jobs_directory.iterdir())
    assert kept == ["job_0", "job_1", "job_3", "job_4"]


def test_the_artifact_cache_evicts_the_least_recently_used_but_spares_a_running_jobs(tmp_path: Path) -> None:
    space = Workspace(tmp_path, cache_bytes=10)
    contents = {name: name.encode() * 4 for name in ("a", "b", "c")}  # 4 bytes each
    sha256 = {name: hashlib.sha256(content).hexdigest() for name, content in contents.items()}
    downloads = []

    def download(digest: str, destination: Path) -> None:
        downloads.append(digest)
        name = next(name for name, value in sha256.items() if value == digest)
        destination.write_bytes(contents[name])

    for age, name in enumerate(("a", "b")):
        space.fetch_artifact(sha256[name], download, keep=())
        os.utime(space.artifact_path(sha256[name]), (age, age))
    # "a" is older, but the job needs it: "b" goes to make room for "c".
    space.fetch_artifact(sha256["c"], download, keep=(sha256["a"], sha256["c"], None))
    assert sorted(path.name for path in space.artifacts_directory.iterdir()) == sorted(
        [sha256["a"], sha256["c"]]
    )

    # A cached artifact is not downloaded again; a damaged one is.
    space.fetch_artifact(sha256["a"], download, keep=())
    space.artifact_path(sha256["c"]).write_bytes(b"damaged")
    space.fetch_artifact(sha256["c"], download, keep=())
    assert downloads == [sha256["a"], sha256["b"], sha256["c"], sha256["c"]]
    assert space.artifact_path(sha256["c"]).read_bytes() == contents["c"]
