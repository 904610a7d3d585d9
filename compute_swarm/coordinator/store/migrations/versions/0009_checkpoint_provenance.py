"""checkpoint provenance: who made each checkpoint and what it was built on, the checkpoint each lease
started from, and the re-runs that look for the node that introduced a bad state

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "checkpoints",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.String(length=32), nullable=False),
        sa.Column("lease_id", sa.String(length=32), nullable=False),
        sa.Column("resumed_from_sha256", sa.String(length=64), nullable=True),
        sa.Column("uploaded_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_checkpoints_job_id_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_checkpoints")),
        sa.UniqueConstraint("job_id", "sha256", name=op.f("uq_checkpoints_job_id")),
    )
    op.create_index(op.f("ix_checkpoints_job_id"), "checkpoints", ["job_id"], unique=False)
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("resumed_from_sha256", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("checks_checkpoint", sa.JSON(), nullable=True))
    # Checkpoints uploaded before this revision have no known author: a job holding one starts its
    # next lease from it as before (nothing recorded makes it foreign).


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("checks_checkpoint")
        batch.drop_column("resumed_from_sha256")
    op.drop_index(op.f("ix_checkpoints_job_id"), table_name="checkpoints")
    op.drop_table("checkpoints")
