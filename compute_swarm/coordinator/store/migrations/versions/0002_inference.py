"""inference: live requests, fine-tuned models' GGUF adapters, batch inference inputs

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("result_gguf_sha256", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("input_adapter_sha256", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("model_suffix", sa.String(length=64), nullable=True))
    op.create_table(
        "inference_requests",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("buyer_id", sa.String(length=32), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("node_id", sa.String(length=32), nullable=True),
        sa.Column("held_micro", sa.BigInteger(), nullable=False),
        sa.Column("price_micro", sa.BigInteger(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["buyer_id"], ["buyers.id"], name=op.f("fk_inference_requests_buyer_id_buyers")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inference_requests")),
    )
    op.create_index(op.f("ix_inference_requests_buyer_id"), "inference_requests", ["buyer_id"], unique=False)
    op.create_index(op.f("ix_inference_requests_state"), "inference_requests", ["state"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_inference_requests_state"), table_name="inference_requests")
    op.drop_index(op.f("ix_inference_requests_buyer_id"), table_name="inference_requests")
    op.drop_table("inference_requests")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("model_suffix")
        batch.drop_column("input_adapter_sha256")
        batch.drop_column("result_gguf_sha256")
