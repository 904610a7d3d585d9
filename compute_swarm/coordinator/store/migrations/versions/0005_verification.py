"""verification: nodes' records and trust, jobs' verification outcome and credit release

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("trusted", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("error_rate", sa.Float(), nullable=True))
        batch.add_column(sa.Column("clean_streak", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("mismatches", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("verifications", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("quarantined_at", sa.Float(), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("verifies_job_id", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("delivered_result_sha256", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("verification", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("verification_detail", sa.Text(), nullable=True))
        batch.add_column(sa.Column("credit_release_at", sa.Float(), nullable=True))
        batch.create_index(batch.f("ix_jobs_verifies_job_id"), ["verifies_job_id"], unique=False)
        batch.create_index(batch.f("ix_jobs_credit_release_at"), ["credit_release_at"], unique=False)
    # Jobs completed before verification existed keep their credit pending no longer than new ones:
    # they release at the next sweep.
    op.execute("UPDATE jobs SET verification = 'skipped', credit_release_at = 0 WHERE state = 'completed'")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index(batch.f("ix_jobs_credit_release_at"))
        batch.drop_index(batch.f("ix_jobs_verifies_job_id"))
        batch.drop_column("credit_release_at")
        batch.drop_column("verification_detail")
        batch.drop_column("verification")
        batch.drop_column("delivered_result_sha256")
        batch.drop_column("verifies_job_id")
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("quarantined_at")
        batch.drop_column("verifications")
        batch.drop_column("mismatches")
        batch.drop_column("clean_streak")
        batch.drop_column("error_rate")
        batch.drop_column("trusted")
