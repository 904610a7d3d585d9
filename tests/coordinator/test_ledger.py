"""The ledger on a real SQLite file: whole micro-credits, balanced transactions, idempotency."""

from __future__ import annotations

import pytest

from compute_swarm.coordinator.service import accounts
from compute_swarm.coordinator.store import ledger
from compute_swarm.coordinator.store.database import Database


@pytest.fixture
def database(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    database.upgrade()
    yield database
    from tests.coordinator.test_node_socket import check_ledger

    check_ledger(tmp_path, file_name="ledger.sqlite3")
    database.close()


def test_grants_are_idempotent_by_key(database):
    with database.transaction() as session:
        buyer, _ = accounts.create_buyer(session, "ada")
        assert ledger.grant(session, buyer.id, 5_000_000, idempotency_key="top-up-1")
        assert not ledger.grant(session, buyer.id, 5_000_000, idempotency_key="top-up-1")
        assert ledger.balance(session, ledger.buyer_account(buyer.id)) == 5_000_000
        assert ledger.balance(session, ledger.ISSUED) == -5_000_000


def test_a_job_is_either_charged_or_refunded_once(database):
    with database.transaction() as session:
        buyer, _ = accounts.create_buyer(session, "grace", 1_000_000)
        ledger.hold_in_escrow(session, buyer.id, "job_1", 300_000)
        assert ledger.charge(session, "job_1", "node_1", 270_000, 30_000)
        assert not ledger.refund(session, "job_1", buyer.id, "too late")
        assert not ledger.charge(session, "job_1", "node_1", 270_000, 30_000)
        assert ledger.balance(session, ledger.buyer_account(buyer.id)) == 700_000
        assert ledger.balance(session, ledger.node_pending_account("node_1")) == 270_000
        assert ledger.balance(session, ledger.FEES) == 30_000
        assert ledger.balance(session, ledger.escrow_account("job_1")) == 0


def test_escrow_needs_the_credits(database):
    with database.transaction() as session:
        buyer, _ = accounts.create_buyer(session, "linus", 10)
        with pytest.raises(ledger.InsufficientCredits, match=r"costs 0\.000011 credits"):
            ledger.hold_in_escrow(session, buyer.id, "job_2", 11)


def test_unbalanced_or_fractional_transactions_are_refused(database):
    with database.transaction() as session:
        with pytest.raises(ledger.LedgerError, match="sum to zero"):
            ledger.post(session, kind="grant", idempotency_key="x", entries={"a": 5, "b": -4})
        with pytest.raises(ledger.LedgerError, match="whole micro-credits"):
            ledger.post(session, kind="grant", idempotency_key="y", entries={"a": 0.5, "b": -0.5})


@pytest.mark.parametrize(
    ("micro", "text"),
    [(0, "0"), (1, "0.000001"), (2_500_000, "2.5"), (-1_250_000, "-1.25"), (7_000_000, "7")],
)
def test_credit_amounts_print_exactly(micro, text):
    assert ledger.format_credits(micro) == text
