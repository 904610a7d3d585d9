"""ops sessions: a fingerprint of the admin token each was opened with

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("web_sessions") as batch:
        batch.add_column(sa.Column("admin_token_fingerprint", sa.String(length=64), nullable=True))
    # Which token opened the ops sessions already open is not known: they end, and ops sign in again.
    op.execute("DELETE FROM web_sessions WHERE kind = 'ops'")


def downgrade() -> None:
    with op.batch_alter_table("web_sessions") as batch:
        batch.drop_column("admin_token_fingerprint")
