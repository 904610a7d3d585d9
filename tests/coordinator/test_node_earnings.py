"""A node's earnings hour by hour: `GET /api/nodes/me/earnings` on a real coordinator process, with
charges posted through the real ledger into that coordinator's SQLite file."""

from __future__ import annotations

import secrets
import time

import httpx
import pytest
from sqlalchemy import update

from compute_swarm.coordinator.service import accounts
from compute_swarm.coordinator.store import ledger
from compute_swarm.coordinator.store.database import Database
from compute_swarm.coordinator.store.tables import LedgerTransaction
from compute_swarm.sdk.client import NodeClient, SwarmError
from tests.coordinator.test_node_socket import check_ledger
from tests.swarm_processes import Coordinator

HOUR = 3600
DAY = 86_400


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    server = Coordinator(tmp_path_factory.mktemp("coordinator")).start()
    yield server
    server.stop()


@pytest.fixture
def database(coordinator):
    database = Database(f"sqlite:///{coordinator.data_dir / 'coordinator.sqlite3'}")
    yield database
    database.close()
    check_ledger(coordinator.data_dir)


def register(coordinator: Coordinator, name: str) -> tuple[str, NodeClient]:
    node_id, token = NodeClient.register(coordinator.url, name)
    return node_id, NodeClient(coordinator.url, token)


def pay(database: Database, node_id: str, node_share: int, at: float, *, held_extra: int = 0) -> None:
    """A buyer's job (or, with `held_extra`, a live request that held more than it cost) charged to
    pay `node_share` to the node, settled at `at`."""
    job_id = f"job_{secrets.token_hex(6)}"
    fee = node_share // 9
    with database.transaction() as session:
        buyer, _ = accounts.create_buyer(session, f"buyer of {job_id}", 100_000_000)
        ledger.hold_in_escrow(session, buyer.id, job_id, node_share + fee + held_extra)
        assert ledger.charge(
            session, job_id, node_id, node_share, fee, buyer_id=buyer.id if held_extra else None
        )
        # The ledger stamps a transaction with the clock; the test places this one in the hour it needs.
        session.execute(
            update(LedgerTransaction)
            .where(LedgerTransaction.idempotency_key == f"settle:{job_id}")
            .values(created_at=at)
        )


def test_credits_are_summed_per_hour_within_the_window_for_this_node_only(coordinator, database):
    node_id, node = register(coordinator, "earner")
    other_id, other = register(coordinator, "neighbour")
    now = time.time()
    earlier_hour = int(now // HOUR) * HOUR - 5 * HOUR
    pay(database, node_id, 270_000, earlier_hour + 60)
    pay(database, node_id, 90_000, earlier_hour + HOUR - 1, held_extra=500_000)  # a live request
    pay(database, node_id, 45_000, earlier_hour + HOUR)
    pay(database, node_id, 1_000_000, now - 31 * DAY)
    pay(database, other_id, 7_000_000, earlier_hour + 120)

    before = time.time()
    history = node.earnings_history(days=30)
    after = time.time()

    assert history["hourly"] == [
        {"hour_start": earlier_hour, "credited_micro": 270_000 + 90_000},
        {"hour_start": earlier_hour + HOUR, "credited_micro": 45_000},
    ]
    assert history["total_credited_micro"] == 270_000 + 90_000 + 45_000 + 1_000_000
    assert history["earnings"] == {
        "pending_micro": 270_000 + 90_000 + 45_000 + 1_000_000,
        "available_micro": 0,
        "jobs_completed": 0,
        "payout_pending_micro": 0,
        "paid_out_micro": 0,
    }
    assert other.earnings_history(days=30)["hourly"] == [
        {"hour_start": earlier_hour, "credited_micro": 7_000_000}
    ]
    assert history["since"] % HOUR == 0
    assert int((before - 30 * DAY) // HOUR) * HOUR <= history["since"] <= after - 30 * DAY
    # A longer window reaches the old charge; 30 days is what the tray asks for by default.
    assert node.earnings_history(days=60)["hourly"][0] == {
        "hour_start": int((now - 31 * DAY) // HOUR) * HOUR,
        "credited_micro": 1_000_000,
    }
    default = node.earnings_history()
    assert (default["hourly"], default["total_credited_micro"]) == (
        history["hourly"],
        history["total_credited_micro"],
    )


def test_credit_moving_from_pending_to_available_is_not_earned_again(coordinator, database):
    node_id, node = register(coordinator, "released")
    pay(database, node_id, 500_000, time.time())
    first = node.earnings_history(days=1)
    # No release kind exists yet: this is the move verification will make once it passes a job.
    with database.transaction() as session:
        ledger.post(
            session,
            kind="release",
            idempotency_key=f"release:{node_id}",
            entries={
                ledger.node_pending_account(node_id): -200_000,
                ledger.node_available_account(node_id): 200_000,
            },
        )

    second = node.earnings_history(days=1)
    assert second["earnings"]["pending_micro"] == 300_000
    assert second["earnings"]["available_micro"] == 200_000
    assert second["hourly"] == first["hourly"]
    assert sum(hour["credited_micro"] for hour in second["hourly"]) == 500_000
    assert second["total_credited_micro"] == 500_000


@pytest.mark.parametrize(
    ("days", "bound"), [(0, "greater than or equal to 1"), (61, "less than or equal to 60")]
)
def test_days_out_of_range_are_refused(coordinator, days, bound):
    _, token = NodeClient.register(coordinator.url, f"asks for {days} days")
    with pytest.raises(SwarmError) as refused:
        NodeClient(coordinator.url, token).earnings_history(days=days)
    assert refused.value.status_code == 422
    answer = httpx.get(
        f"{coordinator.url}/api/nodes/me/earnings",
        params={"days": days},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert answer.status_code == 422
    assert (
        answer.json()["detail"][0]["loc"] == ["query", "days"] and bound in answer.json()["detail"][0]["msg"]
    )


def test_earnings_need_a_valid_node_token_as_the_other_node_endpoints_do(coordinator):
    for headers in ({}, {"Authorization": "Bearer swarm-node-not-a-real-token"}):
        history = httpx.get(f"{coordinator.url}/api/nodes/me/earnings", headers=headers)
        me = httpx.get(f"{coordinator.url}/api/nodes/me", headers=headers)
        assert history.status_code == me.status_code == 401
        assert "earnings" not in history.text


@pytest.mark.parametrize(
    ("credits", "hours"),
    [
        ([], []),
        ([(HOUR - 0.001, 5), (HOUR, 7), (2 * HOUR - 1, 1)], [(0, 5), (HOUR, 8)]),
        ([(10 * HOUR + 5, 9), (3 * HOUR, 4), (10 * HOUR, -2)], [(3 * HOUR, 4), (10 * HOUR, 7)]),
    ],
)
def test_sum_by_hour_groups_on_utc_hour_boundaries_in_order(credits, hours):
    assert ledger.sum_by_hour(credits) == hours
