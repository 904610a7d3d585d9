"""How nodes join, against a real coordinator process (issue 16, M2): a coordinator is not open to
anyone by default, invite codes and approval are ops' choices, and one address cannot register a
flood of nodes."""

from __future__ import annotations

import json
import secrets
import time

import httpx
import pytest

from compute_swarm.coordinator.service.admission import AdmissionRefused, RegistrationLimiter
from compute_swarm.coordinator.store.database import Database
from compute_swarm.coordinator.store.tables import Node
from compute_swarm.sdk.client import NodeClient, SwarmError
from tests.coordinator.test_node_socket import ScriptedNode, check_ledger, new_buyer, submit
from tests.swarm_processes import Coordinator, run_cli, wait_for

pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager")
ADMIN_TOKEN = secrets.token_urlsafe(32)


def coordinator_with(tmp_path, **environment: str) -> Coordinator:
    return Coordinator(tmp_path, environment={"SWARM_ADMIN_TOKEN": ADMIN_TOKEN, **environment}).start()


def ops(coordinator: Coordinator, path: str, body: dict | None = None) -> httpx.Response:
    return httpx.post(
        coordinator.url + path, json=body, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
    )


def register(coordinator: Coordinator, name: str, invite_code: str | None = None) -> httpx.Response:
    body = {"name": name} if invite_code is None else {"name": name, "invite_code": invite_code}
    return httpx.post(f"{coordinator.url}/api/nodes/register", json=body, timeout=10)


@pytest.fixture
def approval(tmp_path):
    """A coordinator as it starts with no admission setting: ops approve each node."""
    server = coordinator_with(tmp_path, SWARM_NODE_ADMISSION="approval")
    yield server
    server.stop()
    check_ledger(server.data_dir)


def test_by_default_a_new_node_waits_for_ops_approval_before_any_work(approval, tmp_path):
    buyer = new_buyer(approval, "waiting buyer")
    node = ScriptedNode(approval, "newcomer")
    assert node.http.me()["node_id"] == node.node_id  # registered, and its token works
    node.connect()
    job = submit(buyer)
    # Connected and free, yet offered nothing: it waits for ops, and the ops page says so.
    with pytest.raises(TimeoutError):
        node.receive_type("lease", timeout=2.5)
    overview = httpx.get(
        approval.url + "/api/ops/overview", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
    ).json()
    assert next(row for row in overview["nodes"] if row["id"] == node.node_id)["state"] == "awaiting approval"
    listed = run_cli("admin", "nodes", "--data-dir", str(approval.data_dir))
    assert "awaiting approval" in listed.stdout

    approved = ops(approval, f"/api/ops/nodes/{node.node_id}/approve")
    assert approved.status_code == 200 and approved.json()["approved"] is True
    # At once, not at the next sweep.
    assert node.receive_type("lease", timeout=5)["job_id"] == job["id"]
    buyer.cancel(job["id"])
    node.disconnect()
    assert ops(approval, "/api/ops/nodes/node_0000000000000000/approve").status_code == 404


def test_a_waiting_node_is_told_so_in_its_welcome_and_told_at_once_when_ops_approve_it(tmp_path):
    # Sweeps a minute apart: what the node hears within seconds was pushed by the approval itself.
    coordinator = coordinator_with(
        tmp_path, SWARM_NODE_ADMISSION="approval", SWARM_SWEEP_INTERVAL_SECONDS="60"
    )
    try:
        node = ScriptedNode(coordinator, "patient")
        waiting = node.connect()["standing"]
        assert waiting["type"] == "standing" and waiting["state"] == "awaiting_approval"
        assert "approves each new computer" in waiting["reason"]

        assert ops(coordinator, f"/api/ops/nodes/{node.node_id}/approve").status_code == 200
        assert node.receive_type("standing", timeout=5) == {
            "type": "standing",
            "state": "active",
            "reason": "",
        }
        node.disconnect()
        assert node.connect()["standing"]["state"] == "active"
        node.disconnect()
    finally:
        coordinator.stop()
    check_ledger(coordinator.data_dir)


def quarantine(coordinator: Coordinator, node_id: str, mismatches: int = 2) -> None:
    """What verification writes after a node's second mismatch (tests/test_verification.py gets there
    with a cheating node, in minutes)."""
    database = Database(f"sqlite:///{coordinator.data_dir / 'coordinator.sqlite3'}")
    try:
        with database.transaction() as session:
            node = session.get(Node, node_id)
            assert node is not None
            node.mismatches, node.quarantined_at = mismatches, time.time()
    finally:
        database.close()


def test_a_quarantined_node_is_told_why_and_told_again_when_ops_lift_it(tmp_path):
    coordinator = coordinator_with(tmp_path, SWARM_NODE_ADMISSION="open")
    try:
        node = ScriptedNode(coordinator, "suspect")
        assert node.connect()["standing"] == {"type": "standing", "state": "active", "reason": ""}

        quarantine(coordinator, node.node_id)  # written from another process: the next sweep finds it
        quarantined = node.receive_type("standing", timeout=10)
        assert quarantined["state"] == "quarantined"
        assert "did not match trusted re-runs of the same jobs (2 times)" in quarantined["reason"]
        node.disconnect()
        assert node.connect()["standing"] == quarantined  # and so says its welcome from now on

        assert ops(coordinator, f"/api/ops/nodes/{node.node_id}/lift-quarantine").status_code == 200
        assert node.receive_type("standing", timeout=5) == {
            "type": "standing",
            "state": "active",
            "reason": "",
        }
        node.disconnect()
    finally:
        coordinator.stop()
    check_ledger(coordinator.data_dir)


def test_a_registration_answer_says_whether_the_node_is_in(approval):
    answer = register(approval, "asks")
    assert answer.status_code == 201 and answer.json()["approved"] is False


def test_where_ops_invite_nodes_a_code_is_needed_and_used_up(tmp_path):
    coordinator = coordinator_with(tmp_path, SWARM_NODE_ADMISSION="invite")
    try:
        refused = register(coordinator, "uninvited")
        assert refused.status_code == 403 and "invite code" in refused.json()["detail"]
        assert register(coordinator, "guessing", "swarm-invite-guess").status_code == 403

        created = ops(coordinator, "/api/ops/invites", {"uses": 2, "hours": 1, "note": "for Ana's two PCs"})
        assert created.status_code == 201, created.text
        code = created.json()["code"]
        first, second = register(coordinator, "ana-1", code), register(coordinator, "ana-2", code)
        assert (first.status_code, second.status_code) == (201, 201)
        assert first.json()["approved"] and second.json()["approved"]
        spent = register(coordinator, "ana-3", code)
        assert spent.status_code == 403 and "used up" in spent.json()["detail"]

        # Ops' CLI prints a code, and the node's client registers with it.
        printed = run_cli("admin", "create-invite", "--data-dir", str(coordinator.data_dir), "--hours", "2")
        assert printed.returncode == 0, printed.stderr
        cli_code = printed.stdout.strip().splitlines()[-1]
        node_id, token = NodeClient.register(coordinator.url, "cli-invited", invite_code=cli_code)
        assert NodeClient(coordinator.url, token).me()["node_id"] == node_id
        with pytest.raises(SwarmError) as uninvited:
            NodeClient.register(coordinator.url, "no code")
        assert uninvited.value.status_code == 403
        assert ops(coordinator, "/api/ops/invites", {"uses": 0}).status_code == 422
    finally:
        coordinator.stop()


def test_one_address_cannot_register_a_flood_of_nodes(tmp_path):
    # What the review measured: 300 unauthenticated registrations in 0.7 s, all accepted.
    coordinator = coordinator_with(
        tmp_path, SWARM_NODE_ADMISSION="open", SWARM_REGISTRATIONS_PER_HOUR_PER_ADDRESS="20"
    )
    try:
        started = time.monotonic()
        codes = [register(coordinator, f"flood-{number}").status_code for number in range(100)]
        print(f"100 registrations in {time.monotonic() - started:.1f} s: {codes.count(201)} accepted")
        assert codes.count(201) == 20 and codes.count(429) == 80
        answer = register(coordinator, "one more")
        assert answer.status_code == 429 and "try again in" in answer.json()["detail"]
    finally:
        coordinator.stop()


def test_the_limiter_forgets_an_address_after_an_hour():
    now = [0.0]
    limiter = RegistrationLimiter(2, clock=lambda: now[0])
    limiter.admit("198.51.100.7")
    limiter.admit("198.51.100.7")
    limiter.admit("203.0.113.9")  # another address has its own allowance
    with pytest.raises(AdmissionRefused) as refused:
        limiter.admit("198.51.100.7")
    assert refused.value.status_code == 429
    now[0] += 3601
    limiter.admit("198.51.100.7")
    RegistrationLimiter(0).admit("anyone")  # 0: no limit


def test_the_coordinator_times_each_nodes_round_trip_itself(approval):
    node = ScriptedNode(approval, "timed")
    node.connect()
    assert node.socket is not None
    # A ping comes right after the welcome; the node's answer is timed by the coordinator's clock.
    ping = json.loads(node.socket.recv(timeout=15))
    assert ping["type"] == "ping" and len(ping["nonce"]) >= 8
    node.send({"type": "pong", "nonce": "not-the-nonce-sent"})  # stale or made up: ignored
    node.send({"type": "pong", "nonce": ping["nonce"]})

    def round_trip() -> float | None:
        rows = httpx.get(
            approval.url + "/api/ops/overview", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
        ).json()["nodes"]
        return next(row["round_trip_ms"] for row in rows if row["id"] == node.node_id)

    measured = wait_for(round_trip, 10, "the round trip")
    assert 0 < measured < 5_000
    node.disconnect()
