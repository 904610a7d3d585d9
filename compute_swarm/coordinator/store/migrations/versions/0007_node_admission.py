"""node admission: when ops let each node in, and the invite codes they hand out

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("approved_at", sa.Float(), nullable=True))
    # The nodes already registered joined under open admission: they stay in.
    op.execute("UPDATE nodes SET approved_at = created_at")
    op.create_table(
        "node_invites",
        sa.Column("code_hash", sa.String(length=64), nullable=False),
        sa.Column("uses_left", sa.Integer(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("note", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("code_hash", name=op.f("pk_node_invites")),
    )


def downgrade() -> None:
    op.drop_table("node_invites")
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("approved_at")
