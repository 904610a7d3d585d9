"""A node downloads no more of an artifact than its lease states: a coordinator whose blob is longer
than its record (a damaged disk, a tampered bucket, a hostile server) cannot fill a seller's disk.

The first test is the swarm as sellers run it: a real coordinator process and a real node process, the
dataset's blob made 64 MiB longer on the coordinator's disk. The second drives the node's HTTP client
against a real server that streams without announcing a length.
"""

from __future__ import annotations

import contextlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from compute_swarm.coordinator.settings import Settings
from compute_swarm.coordinator.store.artifacts import ArtifactStore
from compute_swarm.engine.jobs import DEMO_CHAT_DATASET
from compute_swarm.sdk.client import NodeClient, SwarmClient, SwarmError
from tests.swarm_processes import Coordinator, Node, wait_for

MIB = 1 << 20
EXTRA_BYTES = 64 * MIB


class LargestFile:
    """Polls a path from a thread and keeps the largest size it saw: what a download wrote at most."""

    def __init__(self, *paths: Path):
        self.paths = paths
        self.largest = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            for path in self.paths:
                with contextlib.suppress(OSError):  # not there (yet, or any more)
                    self.largest = max(self.largest, path.stat().st_size)
            time.sleep(0.002)

    def __enter__(self) -> LargestFile:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_a_node_stops_a_download_longer_than_its_lease_and_fails_the_job(tmp_path):
    coordinator = Coordinator(tmp_path / "coordinator").start()
    node = None
    try:
        buyer = SwarmClient(coordinator.url, coordinator.create_buyer("buyer", "10"))
        dataset = buyer.upload_file(DEMO_CHAT_DATASET)
        blob = ArtifactStore(Settings(data_dir=coordinator.data_dir).artifacts_dir).blob_path(
            dataset["sha256"]
        )
        with blob.open("ab") as file:  # the coordinator's copy, now longer than its record says
            file.write(b"\0" * EXTRA_BYTES)
        job = buyer.submit_lora(
            {"base_model": "smollm2-135m-instruct", "dataset": dataset["id"], "max_steps": 2}, max_attempts=1
        )

        node_dir = tmp_path / "node"
        artifact = node_dir / "artifacts" / dataset["sha256"]
        with LargestFile(artifact, artifact.with_suffix(".partial")) as written:
            node = Node(coordinator, node_dir, name="seller").start()
            failed = wait_for(
                lambda: (state := buyer.job(job["id"]))["state"] == "failed" and state,
                90,
                "the job to fail",
                0.2,
            )
        print(
            f"bytes of the dataset written by the node: {written.largest} (the lease states {dataset['size']})"
        )

        message = failed["error"]["message"]
        assert "download the dataset" in message and f"{dataset['size']} bytes expected" in message, message
        assert written.largest <= dataset["size"]
        assert not artifact.exists() and not artifact.with_suffix(".partial").exists()
    finally:
        if node is not None:
            node.kill()
        coordinator.stop()


class EndlessArtifact(BaseHTTPRequestHandler):
    """Answers every GET with 64 MiB, chunked, announcing no length."""

    sent = 0

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        block = b"\0" * (64 * 1024)
        try:
            for _ in range(EXTRA_BYTES // len(block)):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
                type(self).sent += len(block)
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def endless_server():
    EndlessArtifact.sent = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), EndlessArtifact)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_stream_without_a_length_stops_at_the_size_the_lease_states(endless_server, tmp_path):
    size = 100_000
    destination = tmp_path / "artifact"
    with (
        NodeClient(endless_server, "swarm-node-test") as client,
        LargestFile(destination, destination.with_suffix(".partial")) as written,
        pytest.raises(SwarmError, match=f"larger than the {size} bytes expected") as refused,
    ):
        client.download_artifact("ab" * 32, destination, size=size)
    print(f"bytes written: {written.largest} of the {EndlessArtifact.sent} sent; {refused.value}")
    assert written.largest <= size
    assert not destination.exists() and not destination.with_suffix(".partial").exists()
    assert EndlessArtifact.sent < EXTRA_BYTES
