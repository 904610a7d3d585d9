"""Fixtures for the coordinator's in-process tests (a module may define its own `database` instead)."""

from __future__ import annotations

import pytest

from compute_swarm.coordinator.store.database import Database


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
