"""The deployment recipes in deploy/ work as written: systemd accepts the unit, nginx accepts the load
balancer's configuration, and through that nginx two coordinator replicas on one PostgreSQL database
answer health checks, hold a node's websocket, lease it a buyer's job, stream an answer as it is
generated and take uploads larger than nginx's default body limit.

The nginx tests need nginx (installers/debian-packages.sh installs it). The replicas run on a throwaway
PostgreSQL server from the pgserver wheel (which, started by root, runs PostgreSQL as a user of its own).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from compute_swarm.cli import build_parser
from compute_swarm.coordinator.settings import Settings
from compute_swarm.engine.jobs import DEFAULT_MODEL
from compute_swarm.sdk.client import SwarmClient
from tests.coordinator.test_node_socket import ScriptedNode, submit
from tests.swarm_processes import COMMAND, REPOSITORY, Coordinator, chat_dataset, free_port, wait_for

# The test keeps sockets open across calls, so it does not use connect() as a context manager.
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager")

DEPLOY = REPOSITORY / "deploy"
UNIT = DEPLOY / "compute-swarm-coordinator.service"
NGINX_CONFIGURATION = DEPLOY / "nginx.conf"
# The replicas deploy/nginx.conf lists, which the tests replace with their own.
EXAMPLE_REPLICAS = ("10.0.0.11:8000", "10.0.0.12:8000")
REPLICA_NAMES = ("replica-a", "replica-b")
MIB = 1 << 20


# ---- systemd


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """A unit file's (section, key, value) entries in order (keys may repeat, as systemd allows)."""
    entries, section = [], ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_values(text: str, key: str) -> list[str]:
    return [value for _, name, value in unit_entries(text) if name == key]


def test_the_units_command_line_is_one_the_coordinator_takes():
    text = UNIT.read_text()
    (exec_start,) = unit_values(text, "ExecStart")
    program, *arguments = shlex.split(exec_start)
    assert Path(program).name == "compute-swarm"
    parsed = build_parser().parse_args(arguments)  # exits (SystemExit 2) on a flag it does not know
    assert parsed.handler.__name__ == "_serve"
    assert (parsed.host, parsed.port) == ("0.0.0.0", 8000)
    # The sandbox leaves only ReadWritePaths writable: the data directory and the model cache must be
    # under it, or the coordinator fails at its first write.
    writable = [Path(path) for value in unit_values(text, "ReadWritePaths") for path in value.split()]
    models = [value.partition("=")[2] for value in unit_values(text, "Environment")
              if value.startswith("SWARM_MODELS_DIR=")]  # fmt: skip
    assert models, "the unit must say where the built-in model is cached (its home is not writable)"
    for path in (parsed.data_dir, Path(models[0])):
        assert any(path.is_relative_to(directory) for directory in writable), f"{path} is read-only"


def test_systemd_accepts_the_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (it comes with systemd)")
    # verify checks that ExecStart's program exists: this checkout's stands in for /opt/compute-swarm's.
    text = UNIT.read_text()
    (exec_start,) = unit_values(text, "ExecStart")
    program = shlex.split(exec_start)[0]
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(f"ExecStart={program} ", f"ExecStart={COMMAND} "))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    # verify only warns (exit status 0) of an unknown key or a value it cannot parse: any output fails.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


# ---- nginx


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        pytest.skip("nginx is not installed (installers/debian-packages.sh installs it)")
    return found


def replace(text: str, old: str, new: str) -> str:
    """`old` replaced everywhere; it must be there, so a changed deploy/nginx.conf fails here loudly
    instead of being tested with the example's values left in."""
    assert old in text, f"deploy/nginx.conf no longer has {old!r}"
    return text.replace(old, new)


def render_nginx(
    directory: Path, *, port: int, replicas: tuple[str, str], certificate: tuple[Path, Path] | None
) -> Path:
    """deploy/nginx.conf in a whole nginx configuration in `directory`: its replicas replaced, its
    servers on 127.0.0.1 only (the HTTPS one at `port`), its pid, logs and temporary files in
    `directory`. Without a certificate the HTTPS server speaks plain HTTP, as the test's clients would
    trust no certificate made up here."""
    text = NGINX_CONFIGURATION.read_text()
    for example, replica in zip(EXAMPLE_REPLICAS, replicas, strict=True):
        text = replace(text, f"server {example} ", f"server {replica} ")
    text = re.sub(r"\n *listen \[::\]:\d+[^;]*;", "", text)
    text = replace(text, "listen 80;", f"listen 127.0.0.1:{free_port()};")
    if certificate is None:
        text = replace(text, "listen 443 ssl;", f"listen 127.0.0.1:{port};")
        text = re.sub(r"\n *ssl_certificate(_key)? [^;]*;", "", text)
    else:
        text = replace(text, "listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;")
        text = re.sub(r"ssl_certificate [^;]*;", f"ssl_certificate {certificate[0]};", text)
        text = re.sub(r"ssl_certificate_key [^;]*;", f"ssl_certificate_key {certificate[1]};", text)
    (directory / "compute-swarm.conf").write_text(text)
    temporary = "\n".join(
        f"    {kind}_temp_path {directory / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main = directory / "nginx.conf"
    main.write_text(
        f"daemon off;\nworker_processes 1;\npid {directory / 'nginx.pid'};\n"
        f"error_log {directory / 'error.log'} info;\n"
        "events { worker_connections 256; }\n"
        f"http {{\n    access_log {directory / 'access.log'};\n{temporary}\n"
        # As a host's own nginx.conf may compress (Debian's has gzip on): a stream must still flow.
        "    gzip on;\n    gzip_types text/event-stream;\n"
        f"    include {directory / 'compute-swarm.conf'};\n}}\n"
    )
    return main


def nginx_command(directory: Path, main: Path) -> list[str]:
    return [nginx_binary(), "-p", str(directory), "-c", str(main), "-e", str(directory / "error.log")]


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "swarm.example.com")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    certificate_path, key_path = directory / "certificate.pem", directory / "key.pem"
    certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return certificate_path, key_path


def test_nginx_accepts_the_configuration(tmp_path):
    main = render_nginx(
        tmp_path, port=free_port(), replicas=("127.0.0.1:1", "127.0.0.1:2"),
        certificate=self_signed_certificate(tmp_path),
    )  # fmt: skip
    result = subprocess.run(
        [*nginx_command(tmp_path, main), "-t"], capture_output=True, text=True, timeout=60
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "test is successful" in output, output
    assert "[warn]" not in output, output


def test_nginx_body_limits_sit_above_the_coordinators():
    """nginx must let through what the coordinator accepts, so the coordinator refuses (in its API's
    shape) what it does not; the end-to-end test below sends a full default chunk and a whole file."""
    text = NGINX_CONFIGURATION.read_text()
    limits = dict(re.findall(r"location (?:= )?(\S+) \{[^}]*?client_max_body_size (\d+)m;", text))
    server_limit = int(re.search(r"\n    client_max_body_size (\d+)m;", text).group(1)) * MIB
    settings = Settings.model_fields
    assert server_limit > settings["max_request_body_bytes"].default
    # The chunk limit's own bound (SWARM_CHUNK_LIMIT_BYTES may be raised up to it), and a whole file.
    chunk_bound = next(meta.le for meta in settings["chunk_limit_bytes"].metadata if hasattr(meta, "le"))
    assert int(limits["/api/uploads/"]) * MIB >= chunk_bound
    from compute_swarm.coordinator.transport.limits import MULTIPART_ALLOWANCE

    assert int(limits["/v1/files"]) * MIB >= settings["max_dataset_bytes"].default + MULTIPART_ALLOWANCE


@dataclass
class Front:
    """nginx in front of the replicas: what ScriptedNode and the buyers are pointed at."""

    url: str
    port: int
    replicas: list[Coordinator]

    def buyer(self, name: str, credits: str = "10") -> tuple[SwarmClient, str]:
        api_key = self.replicas[0].create_buyer(name, credits)
        return SwarmClient(self.url, api_key), api_key


@pytest.fixture(scope="module")
def front(tmp_path_factory):
    pgserver = pytest.importorskip(
        "pgserver", reason="PostgreSQL tests need the pgserver wheel (the dev extra)"
    )
    pytest.importorskip("psycopg", reason="PostgreSQL tests need psycopg (the dev extra)")
    nginx_binary()  # skips where there is none, before a database is started
    server = pgserver.get_server(tmp_path_factory.mktemp("postgres"), cleanup_mode="stop")
    url = server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
    shared = tmp_path_factory.mktemp("shared")  # the artifacts both replicas serve, as NFS would share them
    started: list[Coordinator] = []
    balancer: subprocess.Popen | None = None
    try:
        for name in REPLICA_NAMES:
            environment = {"SWARM_DATABASE_URL": url, "SWARM_REPLICA_NAME": name, "SWARM_LEASE_SECONDS": "90"}
            started.append(Coordinator(shared, environment=environment, log_name=f"{name}.log").start())
        directory = tmp_path_factory.mktemp("nginx")
        port = free_port()
        main = render_nginx(
            directory, port=port, replicas=tuple(f"127.0.0.1:{replica.port}" for replica in started),
            certificate=None,
        )  # fmt: skip
        with open(directory / "nginx.out", "ab") as log:
            balancer = subprocess.Popen(nginx_command(directory, main), stdout=log, stderr=subprocess.STDOUT)
        front_url = f"http://127.0.0.1:{port}"

        def answering() -> bool:
            assert balancer.poll() is None, (directory / "error.log").read_text(errors="replace")
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{front_url}/healthz", timeout=2).status_code == 200
            return False

        wait_for(answering, 15, "nginx to answer for the replicas")
        wait_for(lambda: sum(replica.health()["leader"] for replica in started) == 1, 15, "a leader")
        yield Front(front_url, port, started)
    finally:
        if balancer is not None and balancer.poll() is None:
            balancer.send_signal(signal.SIGTERM)  # nginx's fast shutdown: open websockets are cut
            balancer.wait(10)
        for replica in started:
            replica.stop()
        server.cleanup()


def test_health_checks_through_nginx_reach_every_replica(front):
    answers = [httpx.get(f"{front.url}/healthz", timeout=5) for _ in range(6)]
    assert [answer.status_code for answer in answers] == [200] * 6
    bodies = [answer.json() for answer in answers]
    assert {body["replica"] for body in bodies} == set(REPLICA_NAMES)
    assert len({body["replica"] for body in bodies if body["leader"]}) == 1
    assert all(body["database"] == "ok" for body in bodies)


def test_a_node_behind_nginx_is_welcomed_pinged_and_leased_a_job(front):
    node = ScriptedNode(front, "behind-nginx")  # registered through nginx
    node.connect()  # asserts the welcome
    assert sorted(replica.health()["nodes_connected"] for replica in front.replicas) == [0, 1]
    # The coordinator times a new node's round trip at once: its ping comes through nginx, and the
    # node's pong goes back through it.
    assert node.socket is not None
    while (message := json.loads(node.socket.recv(timeout=10)))["type"] != "ping":
        pass
    node.send({"type": "pong", "nonce": message["nonce"]})
    # The socket still carries the coordinator's messages after it: a job a buyer submits through nginx
    # (to whichever replica) reaches the node as a lease, and its cancel follows.
    buyer, _ = front.buyer("buyer-behind-nginx")
    job = submit(buyer)
    lease = node.receive_type("lease", timeout=10)
    assert lease["job_id"] == job["id"]
    buyer.cancel(job["id"])
    cancel = node.receive_type("cancel", timeout=10)
    assert (cancel["job_id"], cancel["lease_id"]) == (job["id"], lease["lease_id"])
    node.disconnect()


def test_a_streamed_answer_comes_through_nginx_as_it_is_generated(front):
    node = ScriptedNode(front, "serving-behind-nginx")
    node.connect(models=[DEFAULT_MODEL], inference_slots=1)
    _, api_key = front.buyer("streaming-buyer", "5")
    lines: queue.Queue[str | None] = queue.Queue()
    received: list[str] = []

    def next_line(timeout: float) -> str | None:
        try:
            return lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"nothing more in {timeout} s; the buyer has {received}") from None

    def stream() -> None:
        with httpx.stream(
            "POST",
            f"{front.url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {api_key}"},
            json={"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hi"}],
                  "max_tokens": 8, "stream": True},
            timeout=60,
        ) as response:  # fmt: skip
            lines.put(f"status {response.status_code}")
            for line in response.iter_lines():
                if line:
                    lines.put(line)
        lines.put(None)

    streaming = threading.Thread(target=stream, daemon=True)
    streaming.start()
    request = node.receive_type("inference", timeout=30)
    node.send({"type": "inference_delta", "request_id": request["request_id"], "text": "Hel", "tokens": 1})
    # The piece reaches the buyer while the node is still generating: nginx buffering the answer would
    # hold it back until the answer ended.
    assert next_line(10) == "status 200"
    while not any('"Hel"' in line for line in received):
        line = next_line(10)
        assert line is not None, f"the stream ended before the first piece: {received}"
        received.append(line)
    node.send(
        {"type": "inference_done", "request_id": request["request_id"], "finish_reason": "stop",
         "prompt_tokens": 5, "completion_tokens": 1}
    )  # fmt: skip
    while (line := next_line(30)) is not None:
        received.append(line)
    assert received[-1] == "data: [DONE]"
    streaming.join(10)
    node.disconnect()


def test_uploads_larger_than_nginx_default_body_limit_get_through(front, tmp_path):
    # Larger than a whole chunk (8 MiB by default), so the first chunk sent is a full one.
    dataset = chat_dataset(tmp_path / "large.jsonl", megabytes=9)
    size = dataset.stat().st_size
    assert size > Settings.model_fields["chunk_limit_bytes"].default
    buyer, api_key = front.buyer("uploading-buyer")
    assert buyer.upload_file(dataset)["size"] == size
    with open(dataset, "rb") as file:
        response = httpx.post(
            f"{front.url}/v1/files",
            headers={"Authorization": f"Bearer {api_key}"},
            data={"purpose": "fine-tune"},
            files={"file": (dataset.name, file, "application/jsonl")},
            timeout=120,
        )
    assert response.status_code == 200, response.text
    assert response.json()["bytes"] == size


@pytest.mark.parametrize(
    ("request_line", "content_type"),
    [
        ("PATCH /api/uploads/upl_unknown", "application/offset+octet-stream"),
        ("POST /v1/files", "multipart/form-data; boundary=x"),
    ],
)
def test_an_upload_with_a_bad_key_is_refused_before_its_body_is_sent(front, request_line, content_type):
    """nginx passes an upload's body on as it comes, so the coordinator refuses a bad key after the first
    bytes; were nginx to buffer the body, no answer would come until all 32 MiB had."""
    head = (
        f"{request_line} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer swarm-buyer-not-a-key\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {32 * MIB}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", front.port), timeout=10) as connection:
        # A few KiB only: the coordinator closes the connection on a refused body, and bytes of it left
        # unread in its socket would make that close a reset, which nginx reports as a 502.
        connection.sendall(head.encode() + bytes(16 * 1024))
        answer = connection.recv(4096)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:300]


def test_refused_requests_do_not_take_replicas_out_of_nginx(front):
    """The coordinator refuses a bad key before reading the body and closes the connection, the unread
    body making it a reset: nginx must not count those as a replica's failures, or anyone could take
    every replica out of its list with a few such requests."""
    # Just under nginx's 2 MiB: about one in three such refusals is a reset here.
    size = 1900 * 1024
    head = (
        "POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer swarm-buyer-not-a-key\r\n"
        f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
    )
    for _ in range(30):
        with socket.create_connection(("127.0.0.1", front.port), timeout=10) as connection:
            connection.sendall(head.encode() + b" " * size)
            connection.recv(4096)
    answers = [httpx.get(f"{front.url}/healthz", timeout=5) for _ in range(4)]
    assert [answer.status_code for answer in answers] == [200] * 4
    assert {answer.json()["replica"] for answer in answers} == set(REPLICA_NAMES)


def test_when_a_replica_dies_its_node_reconnects_through_nginx_to_another(front):
    """Last in this module: it leaves one replica dead."""
    node = ScriptedNode(front, "outliving-its-replica")
    node.connect()
    holding = next(replica for replica in front.replicas if replica.health()["nodes_connected"] == 1)
    surviving = next(replica for replica in front.replicas if replica is not holding)
    holding.kill()  # SIGKILL: no goodbye to the node
    assert node.socket is not None
    with pytest.raises(ConnectionClosed):
        while True:
            node.socket.recv(timeout=10)
    node.connect()  # as the agent reconnects: nginx passes over the dead replica
    assert surviving.health()["nodes_connected"] == 1
    answers = [httpx.get(f"{front.url}/healthz", timeout=5).json() for _ in range(4)]
    assert {answer["replica"] for answer in answers} == {surviving.health()["replica"]}
    node.disconnect()
