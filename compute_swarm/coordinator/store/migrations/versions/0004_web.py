"""web: several API keys per buyer, browser sessions, and each job's loss history

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("buyer_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("hint", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("revoked_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["buyer_id"], ["buyers.id"], name=op.f("fk_api_keys_buyer_id_buyers")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    op.create_index(op.f("ix_api_keys_buyer_id"), "api_keys", ["buyer_id"], unique=False)
    # Each buyer's one key so far becomes their first key (its hash is all there is: no hint).
    op.execute(
        "INSERT INTO api_keys (id, buyer_id, name, key_hash, hint, created_at, revoked_at) "
        "SELECT 'key_' || substr(api_key_hash, 1, 16), id, 'first key', api_key_hash, '', created_at, NULL "
        "FROM buyers"
    )
    with op.batch_alter_table("buyers") as batch:
        batch.drop_constraint("uq_buyers_api_key_hash", type_="unique")
        batch.drop_column("api_key_hash")

    op.create_table(
        "web_sessions",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("buyer_id", sa.String(length=32), nullable=True),
        sa.Column("api_key_id", sa.String(length=32), nullable=True),
        sa.Column("csrf_token", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["buyer_id"], ["buyers.id"], name=op.f("fk_web_sessions_buyer_id_buyers")),
        sa.ForeignKeyConstraint(
            ["api_key_id"], ["api_keys.id"], name=op.f("fk_web_sessions_api_key_id_api_keys")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_web_sessions")),
    )
    op.create_index(op.f("ix_web_sessions_buyer_id"), "web_sessions", ["buyer_id"], unique=False)
    op.create_index(op.f("ix_web_sessions_expires_at"), "web_sessions", ["expires_at"], unique=False)

    op.create_table(
        "job_progress",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("loss", sa.Float(), nullable=True),
        sa.Column("eval_loss", sa.Float(), nullable=True),
        sa.Column("at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_job_progress_job_id_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_progress")),
    )
    op.create_index(op.f("ix_job_progress_job_id"), "job_progress", ["job_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_job_progress_job_id"), table_name="job_progress")
    op.drop_table("job_progress")
    op.drop_index(op.f("ix_web_sessions_expires_at"), table_name="web_sessions")
    op.drop_index(op.f("ix_web_sessions_buyer_id"), table_name="web_sessions")
    op.drop_table("web_sessions")
    with op.batch_alter_table("buyers") as batch:
        batch.add_column(sa.Column("api_key_hash", sa.String(length=64), nullable=True))
    # A buyer keeps their oldest key that still works; revoked and later keys are lost.
    op.execute(
        "UPDATE buyers SET api_key_hash = (SELECT key_hash FROM api_keys WHERE api_keys.buyer_id = buyers.id "
        "AND revoked_at IS NULL ORDER BY created_at LIMIT 1)"
    )
    with op.batch_alter_table("buyers") as batch:
        batch.create_unique_constraint("uq_buyers_api_key_hash", ["api_key_hash"])
    op.drop_index(op.f("ix_api_keys_buyer_id"), table_name="api_keys")
    op.drop_table("api_keys")
