"""Alembic's entry point: runs the migrations on the engine the coordinator hands over."""

from alembic import context

from compute_swarm.coordinator.store.tables import Base

target_metadata = Base.metadata
engine = context.config.attributes.get("engine")
if engine is None:
    raise RuntimeError("run migrations through coordinator.store.database.Database.upgrade()")

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=engine.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
