"""The `/node` websocket and the job lifecycle through it, against a real coordinator process.

The node side here is scripted message by message (a real websocket client speaking the protocol), so
each test can play a misbehaving, slow, vanishing or duplicating node on purpose.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from compute_swarm import protocol
from compute_swarm.coordinator.store import ledger
from compute_swarm.coordinator.store.database import Database
from compute_swarm.coordinator.store.tables import AccountBalance, LedgerEntry
from compute_swarm.engine.jobs import DEMO_CHAT_DATASET
from compute_swarm.sdk.client import NodeClient, SwarmClient
from tests.swarm_processes import Coordinator, run_cli, wait_for

# The test keeps sockets open across calls, so it does not use connect() as a context manager.
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager")

TELEMETRY = {
    "cpu": {
        "name": "test cpu",
        "logical_cores": 2,
        "memory_total_bytes": 16 << 30,
        "memory_available_bytes": 12 << 30,
    },
    "backends": ["cpu"],
}


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    server = Coordinator(tmp_path_factory.mktemp("coordinator")).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def ledger_balances(coordinator):
    yield
    check_ledger(coordinator.data_dir)


def check_ledger(data_dir: Path, file_name: str = "coordinator.sqlite3") -> None:
    """Every transaction's entries sum to zero, so all of them do (a coordinator's own SQLite file)."""
    check_ledger_at(f"sqlite:///{data_dir / file_name}")


def check_ledger_at(database_url: str) -> None:
    """Every transaction's entries sum to zero, so all of them do, and the kept balances agree."""
    from sqlalchemy import func, select

    database = Database(database_url)
    try:
        with database.transaction() as session:
            assert ledger.total(session) == 0
            unbalanced = session.execute(
                select(LedgerEntry.transaction_id)
                .group_by(LedgerEntry.transaction_id)
                .having(func.sum(LedgerEntry.amount_micro) != 0)
            ).all()
            assert unbalanced == []
            # The balances kept for fast reads agree with the entries, account by account.
            sums = dict(
                session.execute(
                    select(LedgerEntry.account, func.sum(LedgerEntry.amount_micro)).group_by(
                        LedgerEntry.account
                    )
                ).all()
            )
            kept = dict(session.execute(select(AccountBalance.account, AccountBalance.balance_micro)).all())
            assert kept == sums
    finally:
        database.close()


class ScriptedNode:
    """A node whose every message the test writes."""

    def __init__(self, coordinator: Coordinator, name: str = "scripted"):
        self.coordinator = coordinator
        self.node_id, self.token = NodeClient.register(coordinator.url, name)
        self.http = NodeClient(coordinator.url, self.token)
        self.socket: ClientConnection | None = None

    def connect(self, running: list[dict] | None = None, **hello: object) -> dict:
        self.socket = open_socket(self.coordinator, self.token)
        self.send(
            {
                "type": "hello",
                "protocol_version": protocol.PROTOCOL_VERSION,
                "agent_version": "test",
                "telemetry": TELEMETRY,
                "running": running or [],
                **hello,
            }
        )
        welcome = self.receive()
        assert welcome["type"] == "welcome" and welcome["node_id"] == self.node_id
        return welcome

    def move_to(self, coordinator: Coordinator) -> None:
        """Talk to another replica from now on (as behind a load balancer, when the first one died)."""
        self.disconnect()
        self.coordinator = coordinator
        self.http = NodeClient(coordinator.url, self.token)

    def send(self, message: dict) -> None:
        assert self.socket is not None
        self.socket.send(json.dumps(message))

    def receive(self, timeout: float = 15) -> dict:
        """The next message other than a ping, which is answered at once, as a real node does."""
        assert self.socket is not None
        while True:
            message = json.loads(self.socket.recv(timeout=timeout))
            if message["type"] != "ping":
                return message
            self.send({"type": "pong", "nonce": message["nonce"]})

    def receive_type(self, kind: str, timeout: float = 15) -> dict:
        while True:
            message = self.receive(timeout)
            if message["type"] == kind:
                return message

    def disconnect(self) -> None:
        if self.socket is not None:
            self.socket.close()
            self.socket = None

    def upload_result(self, lease: dict, content: bytes = b"adapter bytes") -> str:
        with tempfile.NamedTemporaryFile(suffix=".tar") as file:
            file.write(content + lease["lease_id"].encode())
            file.flush()
            return self.http.upload_artifact(
                file.name, purpose="result", job_id=lease["job_id"], lease_id=lease["lease_id"]
            )

    def report_result(self, lease: dict, sha256: str) -> dict:
        self.send(
            {
                "type": "result",
                "job_id": lease["job_id"],
                "lease_id": lease["lease_id"],
                "sha256": sha256,
                "steps": 3,
                "final_loss": 1.5,
                "eval_loss": 1.6,
                "train_tokens": 1000,
                "seconds": 2.0,
            }
        )
        return self.receive_type("ack")


def open_socket(coordinator: Coordinator, token: str) -> ClientConnection:
    return connect(
        coordinator.url.replace("http", "ws", 1) + "/node",
        additional_headers={"Authorization": f"Bearer {token}"},
        open_timeout=10,
    )


def new_buyer(coordinator: Coordinator, name: str, credits: str = "10") -> SwarmClient:
    return SwarmClient(coordinator.url, coordinator.create_buyer(name, credits))


def submit(buyer: SwarmClient, max_attempts: int | None = None) -> dict:
    dataset = buyer.upload_file(DEMO_CHAT_DATASET)
    return buyer.submit_lora(
        {"base_model": "smollm2-135m-instruct", "dataset": dataset["id"], "max_steps": 3},
        max_attempts=max_attempts,
    )


def closed_with(socket: ClientConnection) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            socket.recv(timeout=10)
    return closed.value.rcvd.code, closed.value.rcvd.reason


def test_a_bad_token_is_refused_in_the_handshake(coordinator):
    with pytest.raises(InvalidStatus) as refused:
        open_socket(coordinator, "swarm-node-not-a-real-token")
    assert refused.value.response.status_code == 403


def test_a_revoked_node_is_disconnected_and_cannot_connect_again(coordinator):
    node = ScriptedNode(coordinator, "to-revoke")
    node.connect()
    result = run_cli("admin", "revoke-node", "--data-dir", str(coordinator.data_dir), node.node_id)
    assert result.returncode == 0, result.stderr
    assert node.socket is not None
    code, reason = closed_with(node.socket)
    assert code == protocol.CloseCode.UNAUTHORIZED and "revoked" in reason
    with pytest.raises(InvalidStatus):
        open_socket(coordinator, node.token)
    listing = run_cli("admin", "nodes", "--data-dir", str(coordinator.data_dir))
    assert node.node_id in listing.stdout and "revoked" in listing.stdout


@pytest.mark.parametrize(
    ("frame", "code", "reason_part"),
    [
        ("this is not json", protocol.CloseCode.MALFORMED, "bad message"),
        (json.dumps({"type": "teleport"}), protocol.CloseCode.MALFORMED, "bad message"),
        (
            json.dumps({"type": "heartbeat", "telemetry": TELEMETRY}),
            protocol.CloseCode.MALFORMED,
            "hello first",
        ),
        (
            json.dumps(
                {"type": "hello", "protocol_version": 999, "agent_version": "x", "telemetry": TELEMETRY}
            ),
            protocol.CloseCode.UNSUPPORTED_VERSION,
            "protocol version 999 is not supported",
        ),
    ],
)
def test_bad_messages_close_the_connection_with_a_code_and_reason(coordinator, frame, code, reason_part):
    node = ScriptedNode(coordinator)
    socket = open_socket(coordinator, node.token)
    socket.send(frame)
    received_code, reason = closed_with(socket)
    assert received_code == code
    assert reason_part in reason


def test_an_oversized_frame_closes_the_connection(coordinator):
    node = ScriptedNode(coordinator)
    node.connect()
    assert node.socket is not None
    node.socket.send("x" * (protocol.MAX_FRAME_BYTES + 10))
    code, _ = closed_with(node.socket)
    assert code == protocol.CloseCode.MESSAGE_TOO_BIG


def test_a_job_runs_and_is_paid_once_even_when_the_result_is_sent_twice(coordinator):
    buyer = new_buyer(coordinator, "pays-once")
    node = ScriptedNode(coordinator, "worker")
    node.connect()
    job = submit(buyer)
    assert buyer.balance()["escrow_micro"] == job["price_micro"]

    lease = node.receive_type("lease")
    assert lease["job_id"] == job["id"] and lease["attempt"] == 1
    # What completing it pays this node (the price less the 10 % fee), and the work it was priced by.
    assert lease["pay_micro"] == job["price_micro"] - job["price_micro"] // 10
    spec = job["spec"]
    steps = spec["max_steps"]
    examples = spec["batch_size"] * spec.get("gradient_accumulation_steps", 1)
    assert lease["work_tokens"] == steps * examples * spec["max_sequence_length"]
    # The node gets the dataset as an artifact, never the buyer's file id.
    assert lease["spec"]["dataset"] == lease["dataset_sha256"] != job["spec"]["dataset"]
    dataset = node.http.download_artifact(lease["dataset_sha256"], Path(tempfile.mkdtemp()) / "data.jsonl")
    assert dataset.read_bytes() == DEMO_CHAT_DATASET.read_bytes()

    node.send(
        {
            "type": "progress",
            "job_id": lease["job_id"],
            "lease_id": lease["lease_id"],
            "step": 1,
            "total_steps": 3,
            "loss": 2.0,
        }
    )
    wait_for(lambda: buyer.job(job["id"])["state"] == "running", 10, "the job to run")
    sha256 = node.upload_result(lease)
    first = node.report_result(lease, sha256)
    assert first["accepted"] and first["state"] == "completed"
    earnings = node.receive_type("earnings")
    second = node.report_result(lease, sha256)
    assert not second["accepted"] and second["state"] == "completed"

    finished = buyer.job(job["id"])
    assert finished["metrics"]["train_tokens"] == 1000
    balance = buyer.balance()
    assert balance == {"available_micro": 10_000_000 - job["price_micro"], "escrow_micro": 0}
    fee = job["price_micro"] // 10
    assert earnings["pending_micro"] == job["price_micro"] - fee
    assert node.http.me()["earnings"]["pending_micro"] == job["price_micro"] - fee
    node.disconnect()


def test_a_dropped_node_loses_its_lease_and_its_stale_result_changes_nothing(coordinator):
    buyer = new_buyer(coordinator, "stale")
    first, second = ScriptedNode(coordinator, "first"), ScriptedNode(coordinator, "second")
    first.connect()
    job = submit(buyer)
    old_lease = first.receive_type("lease")
    sha256 = first.upload_result(old_lease)
    first.disconnect()  # gone before reporting: the job is queued again at once

    second.connect()
    new_lease = second.receive_type("lease")
    assert new_lease["job_id"] == job["id"] and new_lease["attempt"] == 2
    assert new_lease["lease_id"] != old_lease["lease_id"]

    # The first node comes back claiming its old lease: told to stop, and its result is ignored.
    first.connect(running=[{"job_id": old_lease["job_id"], "lease_id": old_lease["lease_id"]}])
    cancel = first.receive_type("cancel")
    assert cancel["lease_id"] == old_lease["lease_id"]
    stale = first.report_result(old_lease, sha256)
    assert not stale["accepted"]
    assert buyer.job(job["id"])["state"] in ("leased", "running")

    accepted = second.report_result(new_lease, second.upload_result(new_lease))
    assert accepted["accepted"]
    assert second.http.me()["earnings"]["pending_micro"] > 0
    assert first.http.me()["earnings"]["pending_micro"] == 0
    first.disconnect()
    second.disconnect()


def test_a_job_failing_on_every_attempt_stops_and_is_refunded(coordinator):
    buyer = new_buyer(coordinator, "poison")
    node = ScriptedNode(coordinator, "unlucky")
    node.connect()
    job = submit(buyer, max_attempts=2)
    for attempt in (1, 2):
        lease = node.receive_type("lease")
        assert lease["attempt"] == attempt
        node.send(
            {
                "type": "failure",
                "job_id": lease["job_id"],
                "lease_id": lease["lease_id"],
                "kind": "crashed",
                "message": "the worker was killed by SIGSEGV",
            }
        )
        assert node.receive_type("ack")["accepted"]
    failed = wait_for(lambda: (j := buyer.job(job["id"]))["state"] == "failed" and j, 10, "the job to fail")
    assert "2 attempts" in failed["error"]["message"]
    assert buyer.balance() == {"available_micro": 10_000_000, "escrow_micro": 0}
    # The node is not blamed: it gets the next job.
    other = submit(buyer)
    assert node.receive_type("lease")["job_id"] == other["id"]
    buyer.cancel(other["id"])
    assert node.receive_type("cancel")["job_id"] == other["id"]
    node.disconnect()


def test_an_invalid_dataset_fails_once_a_second_node_confirms_it_without_using_attempts(coordinator):
    buyer = new_buyer(coordinator, "invalid")
    before = buyer.balance()
    first, second = ScriptedNode(coordinator, "judge"), ScriptedNode(coordinator, "second judge")
    first.connect()
    job = submit(buyer)

    def invalid(node: ScriptedNode) -> None:
        lease = node.receive_type("lease")
        assert lease["job_id"] == job["id"]
        node.send({"type": "failure", "job_id": lease["job_id"], "lease_id": lease["lease_id"],
                   "kind": "invalid_spec", "message": "line 3: no assistant turn"})  # fmt: skip
        assert node.receive_type("ack")["accepted"]

    # One node's word does not fail a buyer's job (a hostile node could fail every job it is given):
    # the job waits for another node, never going back to the first.
    invalid(first)
    waiting = buyer.job(job["id"])
    assert waiting["state"] == "queued" and waiting["attempt"] == 0
    with pytest.raises(TimeoutError):
        first.receive_type("lease", timeout=1.5)
    second.connect()
    invalid(second)
    finished = buyer.job(job["id"])
    assert finished["state"] == "failed" and finished["attempt"] == 1
    assert finished["error"] == {"kind": "invalid_spec", "message": "line 3: no assistant turn"}
    assert buyer.balance() == before
    first.disconnect()
    second.disconnect()


def test_submissions_are_checked_before_any_credit_moves(coordinator):
    buyer = new_buyer(coordinator, "checked", credits="0.000001")
    dataset = buyer.upload_file(DEMO_CHAT_DATASET)
    from compute_swarm.sdk.client import SwarmError

    with pytest.raises(SwarmError) as poor:
        buyer.submit_lora({"base_model": "smollm2-135m-instruct", "dataset": dataset["id"], "max_steps": 3})
    assert poor.value.status_code == 402
    with pytest.raises(SwarmError) as unknown:
        buyer.submit_lora({"base_model": "/etc/passwd", "dataset": dataset["id"], "max_steps": 3})
    assert unknown.value.status_code == 422
    other = new_buyer(coordinator, "other")
    with pytest.raises(SwarmError) as foreign:
        other.submit_lora({"base_model": "smollm2-135m-instruct", "dataset": dataset["id"], "max_steps": 3})
    assert foreign.value.status_code == 422
    assert buyer.balance() == {"available_micro": 1, "escrow_micro": 0}


def test_other_buyers_resources_do_not_exist_for_them(coordinator):
    owner = new_buyer(coordinator, "owner")
    job = submit(owner)
    headers = {"Authorization": f"Bearer {coordinator.create_buyer('stranger')}"}
    for method, path in [
        ("GET", f"/api/jobs/{job['id']}"),
        ("POST", f"/api/jobs/{job['id']}/cancel"),
        ("GET", f"/api/jobs/{job['id']}/result"),
        ("GET", f"/api/files/{job['spec']['dataset']}"),
    ]:
        assert httpx.request(method, coordinator.url + path, headers=headers).status_code == 404
    owner.cancel(job["id"])


def test_a_node_back_within_its_lease_keeps_its_job(coordinator):
    buyer = new_buyer(coordinator, "blip")
    node = ScriptedNode(coordinator, "flaky-wifi")
    node.connect()
    job = submit(buyer)
    lease = node.receive_type("lease")
    node.disconnect()
    node.connect(running=[{"job_id": lease["job_id"], "lease_id": lease["lease_id"]}])
    accepted = node.report_result(lease, node.upload_result(lease))
    assert accepted["accepted"], accepted
    assert buyer.job(job["id"])["attempt"] == 1
    node.disconnect()


def test_a_job_handed_back_by_a_pausing_seller_does_not_use_an_attempt(coordinator):
    buyer = new_buyer(coordinator, "released")
    node = ScriptedNode(coordinator, "gamer")
    node.connect()
    job = submit(buyer, max_attempts=1)
    for _ in range(3):
        lease = node.receive_type("lease")
        assert lease["attempt"] == 1 and lease["max_attempts"] == 1
        node.send({"type": "failure", "job_id": lease["job_id"], "lease_id": lease["lease_id"], "kind": "released",
                   "message": "a game started"})  # fmt: skip
        assert node.receive_type("ack")["accepted"]
        # Nothing new is offered until the node's next heartbeat says it accepts jobs again.
        with pytest.raises(TimeoutError):
            node.receive_type("lease", timeout=1.5)
        node.send({"type": "heartbeat", "telemetry": TELEMETRY})
    assert buyer.job(job["id"])["state"] in ("queued", "leased")
    buyer.cancel(job["id"])
    node.disconnect()


def test_a_node_is_paid_only_for_work_it_uploaded(coordinator):
    buyer = new_buyer(coordinator, "wary")
    node = ScriptedNode(coordinator, "cheat")
    node.connect()
    job = submit(buyer)
    lease = node.receive_type("lease")
    # Naming the dataset's hash does not count as uploading it, and handing the input back is no result.
    announced = httpx.post(
        coordinator.url + "/api/uploads",
        json={"sha256": lease["dataset_sha256"], "size": lease["dataset_size"], "purpose": "result",
              "job_id": lease["job_id"], "lease_id": lease["lease_id"]},
        headers={"Authorization": f"Bearer {node.token}"},
    ).json()  # fmt: skip
    assert not announced["complete"]
    assert not node.report_result(lease, lease["dataset_sha256"])["accepted"]
    sha256 = node.upload_result(lease)
    node.send({"type": "result", "job_id": lease["job_id"], "lease_id": lease["lease_id"], "sha256": sha256,
               "steps": 1})  # fmt: skip
    short = node.receive_type("ack")
    assert not short["accepted"] and "3 steps" in short["message"]
    assert node.report_result(lease, sha256)["accepted"]
    assert buyer.job(job["id"])["state"] == "completed"
    node.disconnect()


def test_a_binary_frame_closes_the_connection_as_malformed(coordinator):
    node = ScriptedNode(coordinator)
    node.connect()
    assert node.socket is not None
    node.socket.send(b"\x00\x01")
    code, reason = closed_with(node.socket)
    assert code == protocol.CloseCode.MALFORMED and "binary" in reason
