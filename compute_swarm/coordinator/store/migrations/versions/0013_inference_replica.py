"""inference requests name the coordinator replica that relays them

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("inference_requests") as batch:
        batch.add_column(sa.Column("replica", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("inference_requests") as batch:
        batch.drop_column("replica")
