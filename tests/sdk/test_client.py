"""The SDK's transfers and archives against an in-memory coordinator that follows coordinator/API.md:
chunked uploads with offsets (409 on a wrong one), Range downloads, dropped connections mid-way,
corrupted bytes, refused keys; and the buyer commands on top of it."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import httpx
import pytest

from compute_swarm.sdk import buyer_cli, commands
from compute_swarm.sdk.client import (
    NodeClient,
    SwarmClient,
    SwarmError,
    UnsafeArchiveError,
    pack_directory,
    sha256_of_file,
    unpack_archive,
)

URL = "http://coordinator.test"
BUYER_KEY = "swarm-buyer-good"
NODE_TOKEN = "swarm-node-good"
NO_WAITING = (0.0, 0.0, 0.0)


class FakeCoordinator:
    """The upload, file, job, result and artifact routes of API.md, with faults to inject."""

    def __init__(self, chunk_limit: int = 1000):
        self.chunk_limit = chunk_limit
        self.blobs: dict[str, bytes] = {}
        self.uploads: dict[str, dict] = {}
        self.files: dict[str, dict] = {}
        self.jobs: dict[str, dict] = {}
        self.requests: list[httpx.Request] = []
        # Faults: PATCH numbers (1-based) whose chunk is stored but whose answer is lost, or which are
        # lost before anything is stored; GETs of a blob cut after this many bytes; bytes flipped.
        self.lose_answer_of_patch: set[int] = set()
        self.lose_patch: set[int] = set()
        self.stale_answer_of_patch: set[int] = set()
        self.cut_downloads_after: list[int] = []
        self.corrupt_downloads = False
        self.patches = 0
        self.job_states: list[dict] = []  # successive answers to GET /api/jobs/{id}
        self.balance_micro = 12_500_001

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if path == "/api/nodes/register":
            return httpx.Response(201, json={"node_id": "node_1", "token": NODE_TOKEN})
        key = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if key not in (BUYER_KEY, NODE_TOKEN):
            return httpx.Response(401, json={"detail": "this API key is not valid"})
        if path == "/api/models":
            return httpx.Response(
                200, json=[{"name": "smollm2-135m-instruct", "parameters": 1, "licence": "x"}]
            )
        if path == "/api/uploads" and request.method == "POST":
            return self.create_upload(json.loads(request.content))
        if match := re.fullmatch(r"/api/uploads/([\w-]+)", path):
            upload = self.uploads.get(match[1])
            if upload is None:
                return httpx.Response(404, json={"detail": "no upload"})
            if request.method == "GET":
                return httpx.Response(200, json=self.upload_answer(upload))
            return self.receive(upload, request)
        if path == "/api/jobs" and request.method == "POST":
            return self.submit(json.loads(request.content))
        if match := re.fullmatch(r"/api/jobs/([\w-]+)", path):
            if match[1] not in self.jobs:
                return httpx.Response(404, json={"detail": f"no job {match[1]!r}"})
            if self.job_states:
                self.jobs[match[1]].update(self.job_states.pop(0))
            return httpx.Response(200, json=self.jobs[match[1]])
        if match := re.fullmatch(r"/api/jobs/([\w-]+)/result", path):
            job = self.jobs.get(match[1])
            if job is None or job["result_sha256"] is None:
                return httpx.Response(404, json={"detail": "no result yet"})
            return self.serve(self.blobs[job["result_sha256"]], request)
        if match := re.fullmatch(r"/api/artifacts/([0-9a-f]{64})", path):
            if match[1] not in self.blobs:
                return httpx.Response(404, json={"detail": "no such artifact"})
            return self.serve(self.blobs[match[1]], request)
        if path == "/api/balance":
            return httpx.Response(
                200, json={"available_micro": self.balance_micro, "escrow_micro": 1_000_000}
            )
        return httpx.Response(404, json={"detail": "Not Found"})

    # -- uploads

    def create_upload(self, body: dict) -> httpx.Response:
        upload = {**body, "upload_id": f"upload_{len(self.uploads) + 1}", "data": b"", "file": None}
        self.uploads[upload["upload_id"]] = upload
        if body["sha256"] in self.blobs:
            upload["data"] = self.blobs[body["sha256"]]
            self.complete(upload)
        return httpx.Response(201, json=self.upload_answer(upload))

    def receive(self, upload: dict, request: httpx.Request) -> httpx.Response:
        self.patches += 1
        if self.patches in self.lose_patch:
            raise httpx.WriteError("connection reset by peer")
        offset = int(request.headers["Upload-Offset"])
        chunk = request.content
        if offset != len(upload["data"]):
            return httpx.Response(
                409, json={"detail": f"send from offset {len(upload['data'])}", "offset": len(upload["data"])}
            )
        if len(chunk) > self.chunk_limit:
            return httpx.Response(413, json={"detail": "chunk too large"})
        upload["data"] += chunk
        if len(upload["data"]) == upload["size"]:
            if hashlib.sha256(upload["data"]).hexdigest() != upload["sha256"]:
                upload["data"] = b""
                return httpx.Response(
                    422, json={"detail": "the bytes hash to something else; start again at 0"}
                )
            self.complete(upload)
        if self.patches in self.lose_answer_of_patch:
            raise httpx.ReadError("connection dropped before the answer")
        answer = self.upload_answer(upload)
        if self.patches in self.stale_answer_of_patch:
            answer["offset"] = offset  # as if the chunk had not been stored
        return httpx.Response(200, json=answer)

    def complete(self, upload: dict) -> None:
        self.blobs[upload["sha256"]] = upload["data"]
        upload["complete"] = True
        if "filename" in upload:
            file = {
                "id": f"file_{len(self.files) + 1}",
                "filename": upload["filename"],
                "sha256": upload["sha256"],
                "size": upload["size"],
                "purpose": upload["purpose"],
                "lines": upload["data"].count(b"\n"),
                "created_at": 1_700_000_000.0,
            }
            self.files[file["id"]] = file
            upload["file"] = file

    def upload_answer(self, upload: dict) -> dict:
        return {
            "upload_id": upload["upload_id"],
            "sha256": upload["sha256"],
            "size": upload["size"],
            "offset": len(upload["data"]),
            "complete": upload.get("complete", False),
            "chunk_limit": self.chunk_limit,
            "file": upload["file"],
        }

    # -- jobs and downloads

    def submit(self, body: dict) -> httpx.Response:
        if body["spec"]["dataset"] not in self.files:
            return httpx.Response(422, json={"detail": "no file: upload the dataset first"})
        if self.balance_micro < 1_234_567:
            return httpx.Response(402, json={"detail": "the balance cannot cover 1.234567 credits"})
        job = {
            "id": f"job_{len(self.jobs) + 1}",
            "state": "queued",
            "spec": body["spec"],
            "price_micro": 1_234_567,
            "attempt": 0,
            "max_attempts": body.get("max_attempts") or 3,
            "progress": None,
            "metrics": None,
            "error": None,
            "result_sha256": None,
            "created_at": 1_700_000_000.0,
            "updated_at": 1_700_000_000.0,
            "finished_at": None,
        }
        self.jobs[job["id"]] = job
        return httpx.Response(201, json=job)

    def add_completed_job(self, result: bytes) -> str:
        sha256 = hashlib.sha256(result).hexdigest()
        self.blobs[sha256] = result
        self.files.setdefault("file_0", {"id": "file_0"})
        job = json.loads(self.submit({"spec": {"dataset": "file_0"}}).content)
        job.update(state="completed", result_sha256=sha256, metrics={"steps": 10, "final_loss": 1.5})
        self.jobs[job["id"]] = job
        return job["id"]

    def serve(self, content: bytes, request: httpx.Request) -> httpx.Response:
        start = 0
        if match := re.fullmatch(r"bytes=(\d+)-", request.headers.get("Range", "")):
            start = int(match[1])
            if start >= len(content):
                return httpx.Response(416, headers={"Content-Range": f"bytes */{len(content)}"})
        body = content[start:]
        if self.corrupt_downloads:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        headers = {"Content-Length": str(len(body))}
        status = 200
        if start:
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
        if self.cut_downloads_after:
            return httpx.Response(
                status, headers=headers, stream=_CutStream(body, self.cut_downloads_after.pop(0))
            )
        return httpx.Response(status, headers=headers, content=body)


class _CutStream(httpx.SyncByteStream):
    """Sends `cut` bytes of `body`, then the connection drops."""

    def __init__(self, body: bytes, cut: int):
        self.body = body
        self.cut = cut

    def __iter__(self):
        yield self.body[: self.cut]
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


@pytest.fixture
def server() -> FakeCoordinator:
    return FakeCoordinator()


@pytest.fixture
def swarm(server: FakeCoordinator) -> SwarmClient:
    client = SwarmClient(URL, BUYER_KEY, transport=server.transport())
    client.retry_delays = NO_WAITING
    yield client
    client.close()


@pytest.fixture
def node(server: FakeCoordinator) -> NodeClient:
    client = NodeClient(URL, NODE_TOKEN, transport=server.transport())
    client.retry_delays = NO_WAITING
    yield client
    client.close()


def _dataset(path: Path, lines: int = 100) -> Path:
    path.write_text(
        "".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(lines))
    )
    return path


def _adapter_tar(tmp_path: Path) -> bytes:
    source = tmp_path / "adapter-source"
    (source / "sub").mkdir(parents=True)
    (source / "adapter_config.json").write_text('{"r": 8}')
    (source / "adapter_model.safetensors").write_bytes(os.urandom(5000))
    (source / "sub" / "notes.txt").write_text("hello")
    archive = tmp_path / "adapter.tar"
    pack_directory(source, archive)
    return archive.read_bytes()


def _patches(server: FakeCoordinator) -> list[httpx.Request]:
    return [request for request in server.requests if request.method == "PATCH"]


# ---- archives


def test_pack_directory_gives_the_same_bytes_for_the_same_files(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    for directory, order in ((first, ["x.bin", "sub/y.txt"]), (second, ["sub/y.txt", "x.bin"])):
        for name in order:
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            (directory / name).write_bytes(name.encode() * 100)
    os.utime(first / "x.bin", (1, 1))
    (second / "x.bin").chmod(0o600)
    (second / "link").symlink_to(second / "x.bin")

    first_sha = pack_directory(first, tmp_path / "a.tar")
    second_sha = pack_directory(second, tmp_path / "b.tar")

    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert first_sha == second_sha == sha256_of_file(tmp_path / "a.tar")
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = tar.getmembers()
    assert [member.name for member in members] == ["sub/y.txt", "x.bin"]  # sorted, relative, no link
    assert {(member.mtime, member.uid, member.gid, member.mode) for member in members} == {(0, 0, 0, 0o644)}


def test_unpack_archive_restores_the_files(tmp_path: Path) -> None:
    archive = tmp_path / "adapter.tar"
    archive.write_bytes(_adapter_tar(tmp_path))
    unpack_archive(archive, tmp_path / "out")
    assert (tmp_path / "out" / "adapter_config.json").read_text() == '{"r": 8}'
    assert (tmp_path / "out" / "sub" / "notes.txt").read_text() == "hello"
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".out.")] == []


def _tar_with(tmp_path: Path, *members: tarfile.TarInfo) -> Path:
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        good = tarfile.TarInfo("good.txt")
        good.size = 2
        tar.addfile(good, io.BytesIO(b"ok"))
        for member in members:
            tar.addfile(member, io.BytesIO(b"x" * member.size) if member.isfile() else None)
    return archive


def _member(name: str, kind: bytes = tarfile.REGTYPE, target: str = "") -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type = kind
    member.linkname = target
    member.size = 1 if kind == tarfile.REGTYPE else 0
    return member


@pytest.mark.parametrize(
    "member",
    [
        _member("../x"),
        _member("sub/../../x"),
        _member("/etc/x"),
        _member("link", tarfile.SYMTYPE, "/etc/passwd"),
        _member("hard", tarfile.LNKTYPE, "good.txt"),
        _member("device", tarfile.CHRTYPE),
    ],
    ids=["parent", "nested-parent", "absolute", "symlink", "hardlink", "device"],
)
def test_unpack_archive_refuses_members_that_could_escape(tmp_path: Path, member: tarfile.TarInfo) -> None:
    archive = _tar_with(tmp_path, member)
    target = tmp_path / "deep" / "out"
    with pytest.raises(UnsafeArchiveError, match="refusing to unpack"):
        unpack_archive(archive, target)
    assert not target.exists() and not (tmp_path / "x").exists()
    assert not (tmp_path / "deep").exists() or list((tmp_path / "deep").iterdir()) == []


def test_unpack_archive_will_not_mix_into_a_full_directory(tmp_path: Path) -> None:
    archive = tmp_path / "adapter.tar"
    archive.write_bytes(_adapter_tar(tmp_path))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        unpack_archive(archive, tmp_path / "out")
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["mine.txt"]


# ---- uploads


def test_upload_sends_chunks_of_the_servers_size_and_returns_the_file(
    swarm: SwarmClient, server: FakeCoordinator, tmp_path: Path
) -> None:
    dataset = _dataset(tmp_path / "data.jsonl")
    seen: list[tuple[int, int]] = []

    file = swarm.upload_file(dataset, progress=lambda done, total: seen.append((done, total)))

    size = dataset.stat().st_size
    assert file["filename"] == "data.jsonl" and file["size"] == size and file["lines"] == 100
    assert server.blobs[file["sha256"]] == dataset.read_bytes()
    offsets = [int(request.headers["Upload-Offset"]) for request in _patches(server)]
    assert offsets == list(range(0, size, 1000))
    assert seen[0] == (0, size) and seen[-1] == (size, size)
    assert all(request.headers["Authorization"] == f"Bearer {BUYER_KEY}" for request in server.requests)


def test_upload_of_content_the_coordinator_holds_sends_nothing(
    swarm: SwarmClient, server: FakeCoordinator, tmp_path: Path
) -> None:
    dataset = _dataset(tmp_path / "data.jsonl")
    swarm.upload_file(dataset)
    patches = len(_patches(server))
    again = swarm.upload_file(dataset)
    assert len(_patches(server)) == patches and again["sha256"] == sha256_of_file(dataset)


@pytest.mark.parametrize("fault", ["lose_answer_of_patch", "lose_patch", "stale_answer_of_patch"])
def test_upload_resumes_from_the_servers_offset_after_a_dropped_connection(
    swarm: SwarmClient, server: FakeCoordinator, tmp_path: Path, fault: str
) -> None:
    dataset = _dataset(tmp_path / "data.jsonl")
    getattr(server, fault).update({2, 3})

    file = swarm.upload_file(dataset)

    assert server.blobs[file["sha256"]] == dataset.read_bytes()
    # Recovery asks the coordinator where it stands instead of guessing.
    assert any(request.method == "GET" and "/api/uploads/" in request.url.path for request in server.requests)
    size = dataset.stat().st_size
    stored = sum(len(request.content) for request in _patches(server))
    assert stored <= size + 2 * 1000  # at most the lost chunks travel twice


def test_upload_gives_up_when_the_connection_stays_down(
    swarm: SwarmClient, server: FakeCoordinator, tmp_path: Path
) -> None:
    server.lose_patch.update(range(1, 100))
    with pytest.raises(SwarmError, match=f"cannot reach the coordinator at {URL}") as caught:
        swarm.upload_file(_dataset(tmp_path / "data.jsonl"))
    assert caught.value.status_code is None
    assert len(_patches(server)) == len(NO_WAITING) + 1


def test_upload_that_the_coordinator_finds_corrupted_is_refused(
    swarm: SwarmClient, server: FakeCoordinator, tmp_path: Path
) -> None:
    dataset = _dataset(tmp_path / "data.jsonl")
    original = server.receive

    def receive_corrupted(upload: dict, request: httpx.Request) -> httpx.Response:
        request._content = request.content.replace(b"q", b"Q")
        return original(upload, request)

    server.receive = receive_corrupted
    with pytest.raises(SwarmError, match=r"refused data\.jsonl: the bytes hash to something else") as caught:
        swarm.upload_file(dataset)
    assert caught.value.status_code == 422


def test_node_uploads_an_artifact_for_its_lease(
    node: NodeClient, server: FakeCoordinator, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "checkpoint.tar"
    checkpoint.write_bytes(os.urandom(2500))
    server.lose_answer_of_patch.add(1)

    sha256 = node.upload_artifact(checkpoint, purpose="checkpoint", job_id="job_1", lease_id="lease_1")

    assert sha256 == sha256_of_file(checkpoint) and server.blobs[sha256] == checkpoint.read_bytes()
    announced = json.loads(next(r for r in server.requests if r.method == "POST").content)
    assert announced == {
        "sha256": sha256,
        "size": 2500,
        "purpose": "checkpoint",
        "job_id": "job_1",
        "lease_id": "lease_1",
    }


# ---- downloads


def test_download_result_verifies_and_unpacks_the_adapter(
    swarm: SwarmClient, server: FakeCoordinator, tmp_path: Path
) -> None:
    job_id = server.add_completed_job(_adapter_tar(tmp_path))
    directory = swarm.download_result(job_id, tmp_path / "adapters" / job_id)
    assert directory == tmp_path / "adapters" / job_id
    assert (directory / "adapter_config.json").read_text() == '{"r": 8}'
    assert sorted(path.name for path in (tmp_path / "adapters").iterdir()) == [job_id]  # no tar, no .partial


def test_download_interrupted_mid_way_resumes_with_range(
    swarm: SwarmClient, server: FakeCoordinator, tmp_path: Path
) -> None:
    result = _adapter_tar(tmp_path)
    job_id = server.add_completed_job(result)
    server.cut_downloads_after = [3000, 2000]

    directory = swarm.download_result(job_id, tmp_path / "out")

    assert (directory / "sub" / "notes.txt").read_text() == "hello"
    ranges = [r.headers.get("Range") for r in server.requests if r.url.path.endswith("/result")]
    assert ranges == [None, "bytes=3000-", "bytes=5000-"]


def test_download_artifact_continues_a_partial_file_left_by_an_earlier_run(
    node: NodeClient, server: FakeCoordinator, tmp_path: Path
) -> None:
    content = os.urandom(10_000)
    sha256 = hashlib.sha256(content).hexdigest()
    server.blobs[sha256] = content
    destination = tmp_path / "artifacts" / f"{sha256}.tar"
    destination.parent.mkdir()
    destination.with_suffix(".partial").write_bytes(content[:4096])

    assert node.download_artifact(sha256, destination) == destination

    assert destination.read_bytes() == content and not destination.with_suffix(".partial").exists()
    assert [r.headers.get("Range") for r in server.requests] == ["bytes=4096-"]


def test_download_of_a_complete_partial_file_asks_for_nothing_more(
    node: NodeClient, server: FakeCoordinator, tmp_path: Path
) -> None:
    content = os.urandom(3000)
    sha256 = hashlib.sha256(content).hexdigest()
    server.blobs[sha256] = content
    destination = tmp_path / "blob"
    destination.with_suffix(".partial").write_bytes(content)
    node.download_artifact(sha256, destination)
    assert destination.read_bytes() == content


def test_corrupted_download_is_rejected_and_discarded(
    node: NodeClient, server: FakeCoordinator, tmp_path: Path
) -> None:
    content = os.urandom(3000)
    sha256 = hashlib.sha256(content).hexdigest()
    server.blobs[sha256] = content
    server.corrupt_downloads = True
    destination = tmp_path / "blob.tar"

    with pytest.raises(SwarmError, match=f"corrupted.*expected {sha256}"):
        node.download_artifact(sha256, destination)

    assert list(tmp_path.iterdir()) == []


def test_a_stale_corrupt_partial_file_is_replaced_by_a_clean_download(
    node: NodeClient, server: FakeCoordinator, tmp_path: Path
) -> None:
    content = os.urandom(3000)
    sha256 = hashlib.sha256(content).hexdigest()
    server.blobs[sha256] = content
    destination = tmp_path / "blob.tar"
    destination.with_suffix(".partial").write_bytes(b"garbage!")
    node.download_artifact(sha256, destination)
    assert destination.read_bytes() == content


def test_download_of_an_unfinished_job_says_so(
    swarm: SwarmClient, server: FakeCoordinator, tmp_path: Path
) -> None:
    server.files["file_1"] = {"id": "file_1"}
    job = swarm.submit_lora({"base_model": "smollm2-135m-instruct", "dataset": "file_1", "max_steps": 5})
    with pytest.raises(SwarmError, match=f"job {job['id']} is queued"):
        swarm.download_result(job["id"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- errors and the rest of the API


def test_a_refused_key_is_named_in_the_error(server: FakeCoordinator) -> None:
    with (
        SwarmClient(URL, "swarm-buyer-wrong", transport=server.transport()) as swarm,
        pytest.raises(SwarmError) as caught,
    ):
        swarm.balance()
    assert str(caught.value) == f"the coordinator at {URL} refused the API key (this API key is not valid)"
    assert caught.value.status_code == 401 and caught.value.detail == "this API key is not valid"


def test_an_unknown_job_is_not_found(swarm: SwarmClient) -> None:
    with pytest.raises(SwarmError, match=r"^job job_404 not found$") as caught:
        swarm.job("job_404")
    assert caught.value.status_code == 404


def test_an_unreachable_coordinator_is_named(tmp_path: Path) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused")

    with (
        SwarmClient(URL, BUYER_KEY, transport=httpx.MockTransport(refuse)) as swarm,
        pytest.raises(
            SwarmError, match=rf"^cannot reach the coordinator at {URL}: \[Errno 111\] Connection refused$"
        ),
    ):
        swarm.jobs()


def test_a_coordinator_address_needs_a_scheme() -> None:
    with pytest.raises(SwarmError, match="must start with http:// or https://"):
        SwarmClient("coordinator.test:8000", BUYER_KEY)


def test_follow_yields_each_change_until_the_job_ends(swarm: SwarmClient, server: FakeCoordinator) -> None:
    server.files["file_1"] = {"id": "file_1"}
    job = swarm.submit_lora({"dataset": "file_1", "base_model": "smollm2-135m-instruct", "max_steps": 2})
    progress = {"step": 1, "total_steps": 2, "loss": 2.0}
    server.job_states = [
        {"state": "queued"},
        {"state": "leased", "attempt": 1},
        {"state": "leased"},
        {"state": "running", "progress": progress},
        {"state": "completed", "result_sha256": "0" * 64},
    ]
    states = [update["state"] for update in swarm.follow(job["id"], interval=0)]
    assert states == ["queued", "leased", "running", "completed"]


def test_node_registers_and_reads_its_earnings_with_its_token(server: FakeCoordinator) -> None:
    node_id, token = NodeClient.register(URL, "gamer-pc", transport=server.transport())
    assert (node_id, token) == ("node_1", NODE_TOKEN)
    assert "Authorization" not in server.requests[0].headers
    assert json.loads(server.requests[0].content) == {"name": "gamer-pc"}


# ---- the buyer commands


def _run(server: FakeCoordinator, monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    def client(coordinator: str, api_key: str) -> SwarmClient:
        swarm = SwarmClient(coordinator, api_key, transport=server.transport())
        swarm.retry_delays = NO_WAITING
        return swarm

    monkeypatch.setattr(commands, "SwarmClient", client)
    monkeypatch.setattr(buyer_cli, "FOLLOW_INTERVAL_SECONDS", 0.0)
    parser = argparse.ArgumentParser(prog="compute-swarm")
    buyer_cli.register_commands(parser.add_subparsers(dest="command", required=True))
    arguments = parser.parse_args(argv)
    return arguments.handler(arguments)


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWARM_COORDINATOR", URL)
    monkeypatch.setenv("SWARM_API_KEY", BUYER_KEY)


def test_submit_uploads_the_file_and_prints_the_price_and_job_id(
    server: FakeCoordinator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys, environment
) -> None:
    dataset = _dataset(tmp_path / "data.jsonl")
    code = _run(server, monkeypatch, "submit", "lora", "--data", str(dataset), "--steps", "20", "--rank", "4")
    out, err = capsys.readouterr()
    assert code == 0, err
    job = server.jobs["job_1"]
    assert out.splitlines()[-1] == "job_1" and "price 1.234567 credits" in err
    assert job["spec"] == {
        "type": "lora",
        "base_model": "smollm2-135m-instruct",
        "dataset": "file_1",
        "rank": 4,
        "max_steps": 20,
    }


def test_submit_refused_for_money_keeps_the_upload_for_a_retry(
    server: FakeCoordinator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys, environment
) -> None:
    server.balance_micro = 0
    dataset = _dataset(tmp_path / "data.jsonl")
    assert _run(server, monkeypatch, "submit", "lora", "--data", str(dataset)) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == (
        "compute-swarm submit lora: not enough credits: the balance cannot cover 1.234567 credits; "
        "the dataset file stays uploaded: retry with --data file_1"
    )


def test_submit_checks_the_settings_before_uploading(
    server: FakeCoordinator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys, environment
) -> None:
    dataset = _dataset(tmp_path / "data.jsonl")
    code = _run(
        server, monkeypatch, "submit", "lora", "--data", str(dataset), "--rank", "0", "--max-length", "2"
    )
    err = capsys.readouterr().err
    assert code == 2 and server.requests == []
    assert err.count("\n") == 1 and "--rank: Input should be greater than or equal to 1" in err
    assert "--max-length: Input should be greater than or equal to 8" in err


def test_submit_of_a_missing_file_is_a_usage_error(
    server: FakeCoordinator, monkeypatch: pytest.MonkeyPatch, capsys, environment
) -> None:
    assert _run(server, monkeypatch, "submit", "lora", "--data", "nope/data.jsonl") == 2
    assert (
        capsys.readouterr().err
        == "compute-swarm submit lora: nope/data.jsonl: no such file (and not a file id)\n"
    )


def test_commands_need_a_coordinator_and_a_key(
    server: FakeCoordinator, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.delenv("SWARM_COORDINATOR", raising=False)
    monkeypatch.delenv("SWARM_API_KEY", raising=False)
    assert _run(server, monkeypatch, "balance") == 2
    assert "pass --coordinator URL or set $SWARM_COORDINATOR" in capsys.readouterr().err
    assert _run(server, monkeypatch, "balance", "--coordinator", URL) == 2
    assert "pass --api-key KEY or set $SWARM_API_KEY" in capsys.readouterr().err


def test_a_refused_key_exits_1_with_one_line(
    server: FakeCoordinator, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    code = _run(server, monkeypatch, "jobs", "--coordinator", URL, "--api-key", "swarm-buyer-wrong")
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "refused the API key" in err and "--api-key" in err


def test_job_follow_ends_with_the_jobs_outcome(
    server: FakeCoordinator, monkeypatch: pytest.MonkeyPatch, capsys, environment
) -> None:
    server.files["file_1"] = {"id": "file_1"}
    server.submit({"spec": {"dataset": "file_1"}})
    running = {"state": "running", "progress": {"step": 3, "total_steps": 10, "loss": 2.5}}
    server.job_states = [
        {"state": "leased", "attempt": 1},
        running,
        {"state": "queued", "progress": None},
        {"state": "leased", "attempt": 2},
        {"state": "failed", "error": {"kind": "out_of_memory", "message": "CUDA out of memory"}},
    ]
    assert _run(server, monkeypatch, "job", "job_1", "--follow") == 1
    err = capsys.readouterr().err
    assert "job job_1: leased → running" in err
    assert "running → queued again: attempt 1/3 ended without a result" in err
    assert "queued → leased (attempt 2/3)" in err
    assert err.rstrip().endswith("job job_1 failed: out of memory: CUDA out of memory")


def test_download_prints_the_directory_last(
    server: FakeCoordinator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys, environment
) -> None:
    job_id = server.add_completed_job(_adapter_tar(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert _run(server, monkeypatch, "download", job_id) == 0
    assert capsys.readouterr().out.splitlines()[-1] == str(Path("adapters") / job_id)
    assert (tmp_path / "adapters" / job_id / "adapter_config.json").is_file()


def test_balance_shows_exact_credits(
    server: FakeCoordinator, monkeypatch: pytest.MonkeyPatch, capsys, environment
) -> None:
    assert _run(server, monkeypatch, "balance") == 0
    out = capsys.readouterr().out
    assert "available: 12.500001 credits" in out and "in escrow: 1 credits" in out


def test_the_buyer_modules_import_nothing_heavy() -> None:
    code = (
        "import sys, compute_swarm.sdk.buyer_cli, compute_swarm.sdk.client; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'fastapi', 'sqlalchemy', 'torch', 'starlette'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("micro", "text"),
    [(0, "0"), (1, "0.000001"), (1_500_000, "1.5"), (-2_000_000, "-2"), (123_456_789_012, "123456.789012")],
)
def test_format_credits_is_exact(micro: int, text: str) -> None:
    assert buyer_cli.format_credits(micro) == text
