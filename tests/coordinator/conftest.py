"""Fixtures for the coordinator's tests (a module may define its own `database` or `coordinator` instead)."""

from __future__ import annotations

import pytest

from compute_swarm.coordinator.store.database import Database
from tests.coordinator.test_node_socket import check_ledger
from tests.swarm_processes import Coordinator


@pytest.fixture
def database(tmp_path):
    """A migrated SQLite database whose committed effects are kept in `database.carried`."""
    database = Database(f"sqlite:///{tmp_path / 'swarm.db'}")
    database.upgrade()
    carried: list = []
    database.on_commit = carried.extend
    database.carried = carried  # type: ignore[attr-defined]
    yield database
    database.close()


@pytest.fixture
def coordinator(tmp_path):
    """A coordinator process of the test's own, whose ledger must balance when the test ends."""
    server = Coordinator(tmp_path / "coordinator").start()
    yield server
    server.stop()
    check_ledger(server.data_dir)
