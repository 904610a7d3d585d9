"""node reachability: whether the coordinator reached a node's transfer port from outside, where its
peers connect, and when it was tested (swarm transfer)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("reachability", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("peer_address", sa.String(length=300), nullable=True))
        batch.add_column(sa.Column("reachability_checked_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("reachability_checked_at")
        batch.drop_column("peer_address")
        batch.drop_column("reachability")
