"""Real coordinator and node processes on loopback, for tests that need the swarm as users run it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from compute_swarm.coordinator.local_swarm import wait_until_healthy
from compute_swarm.desktop.transfer import fetch_artifact

REPOSITORY = Path(__file__).resolve().parent.parent
# The console script installed beside this interpreter (the venv's `compute-swarm`).
COMMAND = str(Path(sys.executable).parent / "compute-swarm")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_cli(
    *arguments: str, environment: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [COMMAND, *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPOSITORY,
        env={**os.environ, **(environment or {})},
    )


class SwarmProcess:
    """A `compute-swarm ...` child process with its output in a log file."""

    def __init__(self, arguments: list[str], log: Path, environment: dict[str, str] | None = None):
        self.arguments = arguments
        self.log_path = log
        self.environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(environment or {})}
        self.process: subprocess.Popen | None = None

    def start(self) -> SwarmProcess:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [COMMAND, *self.arguments],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPOSITORY,
                env=self.environment,
                start_new_session=True,
            )
        return self

    def kill(self) -> None:
        """SIGKILL the process and everything it started (a node's training child too)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self, timeout: float = 30) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Coordinator(SwarmProcess):
    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        environment: dict[str, str] | None = None,
        log_name: str = "coordinator.log",
    ):
        self.data_dir = data_dir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        data_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(
            ["coordinator", "--port", str(self.port), "--data-dir", str(data_dir)],
            data_dir / log_name,  # replicas sharing a data directory (its artifacts) log apart
            {
                "SWARM_LEASE_SECONDS": "6",
                "SWARM_SWEEP_INTERVAL_SECONDS": "0.5",
                # Most tests are about what nodes do once in; tests/coordinator/test_admission.py
                # covers how they get in.
                "SWARM_NODE_ADMISSION": "open",
                "SWARM_REGISTRATIONS_PER_HOUR_PER_ADDRESS": "0",
                **(environment or {}),
            },
        )

    def start(self, timeout: float = 60) -> Coordinator:
        super().start()
        assert self.process is not None
        wait_until_healthy(self.url, self.process, self.log_path, timeout)
        return self

    def create_buyer(self, name: str, credits: str = "100") -> str:
        result = run_cli(
            "admin", "create-buyer", "--data-dir", str(self.data_dir), "--name", name, "--credits", credits,
            environment=self.database_environment(),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().splitlines()[-1]

    def database_environment(self) -> dict[str, str]:
        """What an admin command needs to reach this coordinator's database (a PostgreSQL one's URL)."""
        url = self.environment.get("SWARM_DATABASE_URL")
        return {"SWARM_DATABASE_URL": url} if url else {}

    def health(self) -> dict:
        return httpx.get(f"{self.url}/healthz", timeout=5).json()


class Node(SwarmProcess):
    def __init__(
        self,
        coordinator: Coordinator,
        data_dir: Path,
        *,
        name: str = "test-node",
        environment: dict[str, str] | None = None,
    ):
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(
            ["-v", "node", "--coordinator", coordinator.url, "--data-dir", str(data_dir), "--name", name],
            data_dir / "node.log",
            {"SWARM_TOKEN_STORE": "file", **(environment or {})},
        )


def wait_for(condition, timeout: float, message: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {message}")


class CheatingNode(Node):
    """A node agent with one dishonest step (tests/cheating_node.py), started as a seller starts one."""

    def __init__(self, coordinator: Coordinator, data_dir: Path, cheat: str, *, name: str):
        super().__init__(coordinator, data_dir, name=name)
        self.cheat = cheat

    def start(self) -> CheatingNode:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.cheating_node", self.cheat, *self.arguments],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPOSITORY,
                env=self.environment,
                start_new_session=True,
            )
        return self


# ---- swarm transfer: what the tests and bench/transfer.py measure


def artifact_egress(coordinator: Coordinator) -> dict[str, float]:
    """The coordinator's artifact bytes sent so far, by route (its own /metrics)."""
    text = httpx.get(f"{coordinator.url}/metrics", timeout=10).text
    counted = re.findall(r'swarm_artifact_bytes_served_total\{route="(\w+)"\} (\S+)', text)
    return {"http": 0.0, "web_seed": 0.0} | {route: float(value) for route, value in counted}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def chat_dataset(path: Path, megabytes: int = 6) -> Path:
    """A chat dataset of several pieces, every row different."""
    with open(path, "w") as file:
        row = 0
        while file.tell() < megabytes * 10**6:
            question = f"Question {row}: what is {row} plus {row}? " + "Explain the steps. " * 20
            file.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": question},
                            {"role": "assistant", "content": f"{row} plus {row} is {2 * row}."},
                        ]
                    }
                )
                + "\n"
            )
            row += 1
    return path


def fetch_everywhere(nodes: list[tuple[Any, Any]], sha256: str, directory: Path, size: int) -> list[float]:
    """Every node (a NodeClient, and a PeerTransfer or None for HTTP alone) fetches the artifact at
    once, through desktop.transfer.fetch_artifact as the agent does; the seconds each took, verified."""
    started = time.monotonic()
    seconds: list[float] = []
    failures: list[BaseException] = []

    def fetch(index: int) -> None:
        client, transfer = nodes[index]
        try:
            path = fetch_artifact(client, transfer, sha256, directory / f"node{index}" / sha256, size=size)
            if sha256_of(path) != sha256:
                raise AssertionError(f"node {index} fetched a file that does not hash to {sha256}")
            seconds.append(time.monotonic() - started)
        except BaseException as error:  # raised below, in the caller's thread
            failures.append(error)

    threads = [threading.Thread(target=fetch, args=(index,)) for index in range(len(nodes))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    if failures or len(seconds) != len(nodes):
        raise AssertionError(f"{len(nodes) - len(seconds)} of {len(nodes)} nodes failed: {failures[:3]}")
    return sorted(seconds)
