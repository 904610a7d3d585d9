"""Request bodies are bounded, and read only for callers with valid credentials (issue 16, H2).

Each attack is sent as an attacker sends it, to a real coordinator process on loopback: hundreds of
MiB streamed from a generator (chunked, so no Content-Length warns the server), with no key, a wrong
one, or a right one and a body past its route's limit. The coordinator's peak resident memory (VmHWM,
reset before each request) and the largest temporary file it holds while answering are watched from
/proc; before the fix a 300 MiB body cost it about 1 GB of memory, or a 300 MiB temporary file.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from compute_swarm.engine.jobs import DEMO_CHAT_DATASET
from tests.swarm_processes import Coordinator

MIB = 1024 * 1024
ATTACK_BYTES = 300 * MIB
# Small, so that files past it are quick to send; the JSON limit is the default (1 MiB).
DATASET_LIMIT = 8 * MIB
JSON_LIMIT = MIB
ADMIN_TOKEN = secrets.token_urlsafe(32)
# What answering may cost the coordinator at most, whatever the body's size.
MEMORY_BUDGET = 50 * MIB
BOUNDARY = "limits-test-boundary"

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="watches the coordinator through Linux's /proc"
)


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    temporary = tmp_path_factory.mktemp("coordinator-tmp")
    server = Coordinator(
        tmp_path_factory.mktemp("limits"),
        environment={
            "SWARM_MAX_DATASET_BYTES": str(DATASET_LIMIT),
            "SWARM_ADMIN_TOKEN": ADMIN_TOKEN,
            # Its temporary files (multipart uploads spill there) are watched in this folder.
            "TMPDIR": str(temporary),
        },
    ).start()
    server.temporary = temporary
    # It loads its token counters in the background at start: measure nothing until that is done.
    wait_until_resident_memory_settles(server.process.pid)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api_key(coordinator) -> str:
    return coordinator.create_buyer("limits")


# ---- sending and watching


def padded(
    total: int, sent: list[int], head: bytes = b'{"padding": "', tail: bytes = b'"}'
) -> Iterator[bytes]:
    """A well-formed body (JSON by default) with `total` bytes of padding, made in 1 MiB blocks as
    they are sent; `sent` counts the padding taken."""
    yield head
    block = b"x" * MIB
    while sent[0] < total:
        piece = block[: total - sent[0]]
        sent[0] += len(piece)
        yield piece
    yield tail


def multipart(file_bytes: int, sent: list[int]) -> Iterator[bytes]:
    """An OpenAI /v1/files upload of a fine-tuning file `file_bytes` long."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
        "Content-Type: application/jsonl\r\n\r\n"
    )
    return padded(file_bytes, sent, head.encode(), f"\r\n--{BOUNDARY}--\r\n".encode())


def length(body: Iterator[bytes]) -> str:
    return str(sum(len(piece) for piece in body))


MULTIPART = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
JSON = {"Content-Type": "application/json"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Cost:
    memory_bytes: int  # the growth of the coordinator's peak resident memory
    largest_temporary_file: int
    seconds: float
    body_bytes_taken: int  # how much of the body the client got to send


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _largest_temporary_file(pid: int, folder: Path) -> int:
    largest = 0
    for descriptor in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(descriptor).startswith(str(folder)):
                largest = max(largest, descriptor.stat().st_size)
        except OSError:
            continue  # closed meanwhile
    return largest


def send(coordinator: Coordinator, path: str, body: Iterator[bytes], sent: list[int], headers: dict):
    """POST `body` and return the answer and what it cost the coordinator."""
    pid = coordinator.process.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the resident memory now
    resident_before = _status(pid, "VmRSS")
    largest_file, done = [0], threading.Event()

    def watch_temporary_files():
        while not done.wait(0.01):
            largest_file[0] = max(largest_file[0], _largest_temporary_file(pid, coordinator.temporary))

    watcher = threading.Thread(target=watch_temporary_files, daemon=True)
    watcher.start()
    started = time.monotonic()
    try:
        answer = httpx.post(coordinator.url + path, content=body, headers=headers, timeout=120)
    finally:
        seconds = time.monotonic() - started
        done.set()
        watcher.join()
    cost = Cost(_status(pid, "VmHWM") - resident_before, largest_file[0], seconds, sent[0])
    print(f"{path}: {answer.status_code} {cost}")
    return answer, cost


def wait_until_resident_memory_settles(pid: int, timeout: float = 60) -> None:
    deadline, previous = time.monotonic() + timeout, -MIB
    while time.monotonic() < deadline:
        time.sleep(1)
        resident = _status(pid, "VmRSS")
        if abs(resident - previous) < MIB:
            return
        previous = resident
    raise AssertionError(f"the coordinator's memory did not settle in {timeout} s")


def assert_cheap(cost: Cost, temporary_file_bound: int = 0) -> None:
    assert cost.memory_bytes < MEMORY_BUDGET, cost
    assert cost.largest_temporary_file <= temporary_file_bound, cost
    assert cost.seconds < 10, cost


def error_message(answer: httpx.Response) -> str:
    body = answer.json()
    return body["error"]["message"] if "error" in body else body["detail"]


# ---- no valid credentials: refused before the body is read


@pytest.mark.parametrize(
    ("path", "headers", "expected_status"),
    [
        ("/api/jobs", JSON, 401),
        ("/api/jobs", {**JSON, **bearer("sk-not-a-key")}, 401),
        ("/v1/chat/completions", {**JSON, **bearer("sk-not-a-key")}, 401),
        ("/api/ops/invites", {**JSON, **bearer(secrets.token_urlsafe(32))}, 401),
        # A page's form with a cookie that names no session: the page answers 401 as the sign-in page.
        (
            "/jobs/new",
            {"Content-Type": "application/x-www-form-urlencoded", "Cookie": "swarm_session=stale"},
            303,
        ),
    ],
    ids=["no-key", "wrong-key", "openai-wrong-key", "wrong-admin-token", "stale-browser-session"],
)
def test_a_300_mib_body_without_valid_credentials_is_refused_before_it_is_read(
    coordinator, path, headers, expected_status
):
    sent = [0]
    if headers["Content-Type"].startswith("application/json"):
        body = padded(ATTACK_BYTES, sent)
    else:
        body = padded(ATTACK_BYTES, sent, b"csrf_token=stale&padding=", b"")
    answer, cost = send(coordinator, path, body, sent, headers)
    assert answer.status_code == expected_status, answer.text[:300]
    if expected_status == 303:
        assert answer.headers["location"] == "/sign-in"
    elif path.startswith("/v1"):
        assert answer.json()["error"]["code"] == "invalid_api_key"
    assert_cheap(cost)
    # The coordinator closed the connection rather than take the rest.
    assert cost.body_bytes_taken < ATTACK_BYTES


def test_a_300_mib_file_upload_without_a_key_leaves_no_temporary_file(coordinator):
    sent = [0]
    answer, cost = send(coordinator, "/v1/files", multipart(ATTACK_BYTES, sent), sent, MULTIPART)
    assert answer.status_code == 401, answer.text[:300]
    assert answer.json()["error"]["code"] == "invalid_api_key"
    assert_cheap(cost)
    assert cost.body_bytes_taken < ATTACK_BYTES


# ---- a valid key, a body past its route's limit: refused at the limit


@pytest.mark.parametrize("declared", [False, True], ids=["chunked", "content-length"])
@pytest.mark.parametrize("path", ["/api/jobs", "/v1/chat/completions"])
def test_a_json_body_over_the_limit_is_refused_with_413(coordinator, api_key, path, declared):
    sent = [0]
    headers = {**JSON, **bearer(api_key)}
    if declared:
        headers["Content-Length"] = length(padded(ATTACK_BYTES, [0]))
    answer, cost = send(coordinator, path, padded(ATTACK_BYTES, sent), sent, headers)
    assert answer.status_code == 413, answer.text[:300]
    assert f"at most {JSON_LIMIT} bytes (1 MiB)" in error_message(answer)
    if path.startswith("/v1"):
        assert answer.json()["error"]["code"] == "request_too_large"
    assert_cheap(cost)
    if declared:  # refused on its Content-Length, before a byte was read
        assert cost.body_bytes_taken < ATTACK_BYTES


@pytest.mark.parametrize("declared", [False, True], ids=["chunked", "content-length"])
def test_a_file_over_its_purpose_limit_is_refused_without_being_stored_whole(coordinator, api_key, declared):
    file_bytes = 64 * MIB
    sent = [0]
    headers = {**MULTIPART, **bearer(api_key)}
    if declared:
        headers["Content-Length"] = length(multipart(file_bytes, [0]))
    answer, cost = send(coordinator, "/v1/files", multipart(file_bytes, sent), sent, headers)
    assert answer.status_code == 413, answer.text[:300]
    # At most the purpose's limit (and the multipart framing around it) ever reached the disk.
    assert_cheap(cost, temporary_file_bound=DATASET_LIMIT + 64 * 1024)
    assert answer.json()["error"]["code"] == "request_too_large"
    assert f"at most {DATASET_LIMIT} bytes (8 MiB)" in error_message(answer)
    with httpx.Client(base_url=coordinator.url, headers=bearer(api_key)) as client:
        assert client.get("/v1/files").json()["data"] == []


# ---- within the limits, everything works as before


def dataset(at_least: int) -> bytes:
    lines = DEMO_CHAT_DATASET.read_bytes().splitlines(keepends=True)
    data = b""
    while len(data) < at_least:
        data += b"".join(lines)
    return data


def test_uploads_over_the_json_limit_and_within_their_own_still_work(coordinator, api_key):
    # 2 MiB: more than any JSON request may hold, within a chunk and a dataset.
    data = dataset(2 * MIB)
    assert JSON_LIMIT < len(data) < DATASET_LIMIT
    with httpx.Client(base_url=coordinator.url, headers=bearer(api_key), timeout=60) as client:
        whole = client.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("chat.jsonl", data)})
        assert whole.status_code == 200, whole.text
        assert whole.json()["bytes"] == len(data)

        resumable = data + b"\n"  # other bytes: a new upload, not the same file again
        created = client.post(
            "/api/uploads",
            json={
                "sha256": hashlib.sha256(resumable).hexdigest(),
                "size": len(resumable),
                "filename": "chat.jsonl",
                "purpose": "dataset",
            },
        )
        assert created.status_code == 201, created.text
        chunk = client.patch(
            f"/api/uploads/{created.json()['upload_id']}",
            content=resumable,
            headers={"Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"},
        )
        assert chunk.status_code == 200, chunk.text
        assert chunk.json()["complete"]

        job = client.post(
            "/api/jobs",
            content=json.dumps(
                {
                    "spec": {
                        "dataset": whole.json()["id"],
                        "base_model": "smollm2-135m-instruct",
                        "max_steps": 3,
                    }
                }
            ),
            headers=JSON,
        )
        assert job.status_code == 201, job.text
