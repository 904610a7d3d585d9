"""The migrations build exactly the schema the code declares."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from compute_swarm.coordinator.store.database import Database
from compute_swarm.coordinator.store.tables import Base


def test_migrations_match_the_tables(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'schema.sqlite3'}")
    database.upgrade()
    database.upgrade()  # a second run is a no-op
    with database.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    database.close()
    assert differences == []
