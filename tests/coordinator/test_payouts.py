"""Payouts through a real coordinator process: a seller asks with its node token, ops export a batch,
pay it and mark it paid (or reject it), over the ops API and the admin CLI, and the ledger moves
available → payout pending → paid (or back), each step once, summing to zero throughout."""

from __future__ import annotations

import csv
import io
import secrets
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from compute_swarm.coordinator.service import accounts
from compute_swarm.coordinator.store import ledger
from compute_swarm.coordinator.store.database import Database
from compute_swarm.sdk.client import NodeClient, SwarmError
from tests.coordinator.test_node_socket import check_ledger
from tests.swarm_processes import Coordinator, run_cli

ADMIN_TOKEN = secrets.token_urlsafe(32)
CREDIT = 1_000_000


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    server = Coordinator(
        tmp_path_factory.mktemp("coordinator"),
        environment={
            "SWARM_ADMIN_TOKEN": ADMIN_TOKEN,
            "SWARM_PAYOUT_MINIMUM_MICRO": str(1_000 * CREDIT),
            "SWARM_CREDIT_CURRENCY": "USD",
            "SWARM_CREDIT_VALUE": "0.0005",
        },
    ).start()
    yield server
    server.stop()


@pytest.fixture
def database(coordinator):
    database = Database(f"sqlite:///{coordinator.data_dir / 'coordinator.sqlite3'}")
    yield database
    database.close()
    check_ledger(coordinator.data_dir)


def ops(coordinator: Coordinator, method: str, path: str, **arguments) -> httpx.Response:
    return httpx.request(
        method,
        f"{coordinator.url}/api/ops/payouts{path}",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=10,
        **arguments,
    )


def earning_node(coordinator: Coordinator, database: Database, credits: int) -> tuple[str, NodeClient]:
    """A registered node whose completed, verified work made `credits` credits available."""
    node_id, token = NodeClient.register(coordinator.url, f"seller-{secrets.token_hex(3)}")
    job_id = f"job_{secrets.token_hex(6)}"
    share = credits * CREDIT
    with database.transaction() as session:
        buyer, _ = accounts.create_buyer(session, f"buyer of {job_id}", share * 2)
        ledger.hold_in_escrow(session, buyer.id, job_id, share + share // 9)
        assert ledger.charge(session, job_id, node_id, share, share // 9)
        assert ledger.release(session, job_id, node_id, "verified") == share
    return node_id, NodeClient(coordinator.url, token)


def balances(database: Database, node_id: str) -> tuple[int, int, int]:
    with database.reading() as session:
        return (
            ledger.balance(session, ledger.node_available_account(node_id)),
            ledger.balance(session, ledger.node_payout_account(node_id)),
            ledger.balance(session, ledger.PAID_OUT),
        )


def test_a_payout_goes_from_request_to_paid_once_whatever_is_retried(coordinator, database):
    node_id, node = earning_node(coordinator, database, 50_000)
    _, _, paid_before = balances(database, node_id)

    with pytest.raises(SwarmError) as below_minimum:
        node.request_payout("seller@example.com", amount_micro=999 * CREDIT)
    assert below_minimum.value.status_code == 422
    assert "at least 1000 credits" in str(below_minimum.value)
    with pytest.raises(SwarmError) as too_much:
        node.request_payout("seller@example.com", amount_micro=50_001 * CREDIT)
    assert "50000 are available" in str(too_much.value)

    payout = node.request_payout(
        "seller@example.com", amount_micro=20_000 * CREDIT, request_key="key-0001-abc"
    )
    assert payout["state"] == "requested"
    # The answer was lost and the node asks again with the same key: the same payout, nothing more held.
    again = node.request_payout(
        "seller@example.com", amount_micro=20_000 * CREDIT, request_key="key-0001-abc"
    )
    assert again["id"] == payout["id"]
    with pytest.raises(SwarmError) as reused:
        node.request_payout("someone-else@example.com", request_key="key-0001-abc")
    assert reused.value.status_code == 409
    assert balances(database, node_id) == (30_000 * CREDIT, 20_000 * CREDIT, paid_before)
    listing = node.payouts()
    assert listing["earnings"]["payout_pending_micro"] == 20_000 * CREDIT
    assert (listing["currency"], listing["value_micro_per_credit"]) == ("USD", 500)

    queue = ops(coordinator, "GET", "").json()
    assert payout["id"] in [row["id"] for row in queue["payouts"]]
    # Only an exported payout is paid: its amount in the currency is on record first.
    assert ops(coordinator, "POST", f"/{payout['id']}/paid", json={"reference": "tx-1"}).status_code == 409

    exported = ops(coordinator, "POST", "/export", json={"currency": "EUR", "rate": "0.00046"})
    assert exported.status_code == 201, exported.text
    batch = ops(coordinator, "GET", f"/batches/{exported.json()['batch_id']}.csv")
    assert batch.headers["content-type"].startswith("text/csv")
    rows = {row["payout_id"]: row for row in csv.DictReader(io.StringIO(batch.text))}
    assert rows[payout["id"]]["payee"] == "seller@example.com"
    assert (rows[payout["id"]]["credits"], rows[payout["id"]]["amount"]) == ("20000", "9.20")
    assert rows[payout["id"]]["currency"] == "EUR"
    # Nothing new waits: a second export has nothing to take, and the batch reads the same again.
    assert ops(coordinator, "POST", "/export", json={}).status_code == 409
    assert ops(coordinator, "GET", f"/batches/{exported.json()['batch_id']}.csv").text == batch.text

    paid = ops(coordinator, "POST", f"/{payout['id']}/paid", json={"reference": "SEPA-2026-12-07-001"})
    assert paid.status_code == 200, paid.text
    assert paid.json()["state"] == "paid"
    assert (
        ops(coordinator, "POST", f"/{payout['id']}/paid", json={"reference": "SEPA-2026-12-07-001"}).json()
        == paid.json()
    )
    assert ops(coordinator, "POST", f"/{payout['id']}/paid", json={"reference": "another"}).status_code == 409
    assert ops(coordinator, "POST", f"/{payout['id']}/reject", json={"reason": "late"}).status_code == 409
    assert balances(database, node_id) == (30_000 * CREDIT, 0, paid_before + 20_000 * CREDIT)

    earnings = node.me()["earnings"]
    assert (earnings["available_micro"], earnings["paid_out_micro"]) == (30_000 * CREDIT, 20_000 * CREDIT)
    receipt = node._request("GET", f"/api/nodes/me/payouts/{payout['id']}")
    assert [(line["kind"], line["account"], line["amount_micro"]) for line in receipt["money"]] == [
        ("payout_request", "available", -20_000 * CREDIT),
        ("payout_request", "payout_pending", 20_000 * CREDIT),
        ("payout_paid", "payout_pending", -20_000 * CREDIT),
        ("payout_paid", ledger.PAID_OUT, 20_000 * CREDIT),
    ]
    assert receipt["amount"] == "9.20" and receipt["reference"] == "SEPA-2026-12-07-001"


def test_a_rejected_payout_gives_the_credit_back_with_the_reason(coordinator, database):
    node_id, node = earning_node(coordinator, database, 5_000)
    payout = node.request_payout("  wallet:abc   def ")  # all that is available, its spaces tidied
    assert (payout["amount_micro"], payout["payee"]) == (5_000 * CREDIT, "wallet:abc def")
    assert balances(database, node_id)[:2] == (0, 5_000 * CREDIT)

    rejected = ops(
        coordinator, "POST", f"/{payout['id']}/reject", json={"reason": "payee unknown to the bank"}
    )
    assert rejected.json()["state"] == "rejected", rejected.text
    assert ops(coordinator, "POST", f"/{payout['id']}/reject", json={"reason": "again"}).json()["reason"] == (
        "payee unknown to the bank"
    )
    assert ops(coordinator, "POST", f"/{payout['id']}/paid", json={"reference": "x"}).status_code == 409
    assert balances(database, node_id)[:2] == (5_000 * CREDIT, 0)
    mine = node.payouts()["payouts"]
    assert [(row["id"], row["state"], row["reason"]) for row in mine] == [
        (payout["id"], "rejected", "payee unknown to the bank")
    ]
    # Another node's payout is not this one's to read.
    _, neighbour = earning_node(coordinator, database, 1)
    with pytest.raises(SwarmError) as hidden:
        neighbour._request("GET", f"/api/nodes/me/payouts/{payout['id']}")
    assert hidden.value.status_code == 404


def test_two_requests_at_once_cannot_spend_the_same_credit(coordinator, database):
    node_id, node = earning_node(coordinator, database, 3_000)
    with ThreadPoolExecutor(4) as pool:
        outcomes = list(
            pool.map(
                lambda key: _try(
                    lambda: node.request_payout(
                        "me@example.com", amount_micro=2_000 * CREDIT, request_key=key
                    )
                ),
                [f"parallel-{index:04d}" for index in range(4)],
            )
        )
    assert sum(1 for outcome in outcomes if isinstance(outcome, dict)) == 1
    assert all(outcome.status_code == 422 for outcome in outcomes if isinstance(outcome, SwarmError))
    assert balances(database, node_id)[:2] == (1_000 * CREDIT, 2_000 * CREDIT)


def _try(call):
    try:
        return call()
    except SwarmError as error:
        return error


def test_bad_payout_input_is_refused_with_a_reason(coordinator, database):
    _, node = earning_node(coordinator, database, 2_000)
    for body in (
        {"payee": "", "request_key": "valid-key-1"},
        {"payee": "a" * 201, "request_key": "valid-key-2"},
        {"payee": "me", "request_key": "short"},
        {"payee": "me", "request_key": "has spaces in it"},
        {"payee": "me", "request_key": "valid-key-3", "amount_micro": -5},
        {"payee": "me", "request_key": "valid-key-4", "surprise": 1},
    ):
        refused = _try(lambda body=body: node._request("POST", "/api/nodes/me/payouts", json=body))
        assert isinstance(refused, SwarmError) and refused.status_code == 422, body
    assert ops(coordinator, "POST", "/export", json={"currency": "euro", "rate": "1"}).status_code == 422
    assert ops(coordinator, "POST", "/export", json={"rate": "-1"}).status_code == 422
    assert ops(coordinator, "GET", "?state=lost").status_code == 422
    assert httpx.get(f"{coordinator.url}/api/ops/payouts").status_code in (401, 403)


def test_ops_pay_a_batch_from_the_admin_cli(coordinator, database, tmp_path):
    node_id, node = earning_node(coordinator, database, 4_000)
    payout = node.request_payout('=HYPERLINK("http://evil")', amount_micro=4_000 * CREDIT)
    environment = coordinator.database_environment()
    data_dir = ["--data-dir", str(coordinator.data_dir)]

    listed = run_cli("admin", "payouts", *data_dir, environment=environment)
    assert listed.returncode == 0, listed.stderr
    assert payout["id"] in listed.stdout and "Owed to sellers" in listed.stdout

    batch_file = tmp_path / "batch.csv"
    exported = run_cli(
        "admin", "export-payouts", *data_dir, "--output", str(batch_file), environment=environment
    )
    assert exported.returncode == 0, exported.stderr
    rows = {row["payout_id"]: row for row in csv.DictReader(batch_file.open())}
    # A seller's text starting with = would run as a formula in a spreadsheet: it is quoted.
    assert rows[payout["id"]]["payee"] == '\'=HYPERLINK("http://evil")'
    assert rows[payout["id"]]["amount"] == "2.00"  # 4,000 credits at the default $0.0005

    paid = run_cli(
        "admin", "mark-paid", *data_dir, payout["id"], "--reference", "wire 77", environment=environment
    )
    assert paid.returncode == 0 and "is paid" in paid.stdout, paid.stderr
    again = run_cli(
        "admin", "mark-paid", *data_dir, payout["id"], "--reference", "wire 78", environment=environment
    )
    assert again.returncode == 1 and "paid already" in again.stderr
    assert balances(database, node_id)[:2] == (0, 0)
    unknown = run_cli(
        "admin", "reject-payout", *data_dir, "po_nothing", "--reason", "x", environment=environment
    )
    assert unknown.returncode == 1 and "no payout" in unknown.stderr
