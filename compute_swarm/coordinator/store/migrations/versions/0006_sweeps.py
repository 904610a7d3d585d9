"""sweeps: a buyer's hyperparameter sweeps, and each trial's sweep and settings

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sweeps",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("buyer_id", sa.String(length=32), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["buyer_id"], ["buyers.id"], name=op.f("fk_sweeps_buyer_id_buyers")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sweeps")),
    )
    op.create_index(op.f("ix_sweeps_buyer_id"), "sweeps", ["buyer_id"], unique=False)
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("sweep_id", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("sweep_parameters", sa.JSON(), nullable=True))
        batch.create_index(batch.f("ix_jobs_sweep_id"), ["sweep_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index(batch.f("ix_jobs_sweep_id"))
        batch.drop_column("sweep_parameters")
        batch.drop_column("sweep_id")
    op.drop_index(op.f("ix_sweeps_buyer_id"), table_name="sweeps")
    op.drop_table("sweeps")
