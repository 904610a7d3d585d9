"""catalogue: the models ops add beside the built-in one

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "catalogue_models",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("source", sa.String(length=300), nullable=False),
        sa.Column("architecture", sa.String(length=32), nullable=False),
        sa.Column("parameters", sa.BigInteger(), nullable=False),
        sa.Column("context_length", sa.Integer(), nullable=False),
        sa.Column("gguf_name", sa.String(length=128), nullable=False),
        sa.Column("gguf_sha256", sa.String(length=64), nullable=False),
        sa.Column("gguf_size", sa.BigInteger(), nullable=False),
        sa.Column("weights", sa.JSON(), nullable=False),
        sa.Column("shape", sa.JSON(), nullable=False),
        sa.Column("chat_template", sa.Text(), nullable=True),
        sa.Column("licence", sa.String(length=100), nullable=False),
        sa.Column("licence_sha256", sa.String(length=64), nullable=False),
        sa.Column("added_at", sa.Float(), nullable=False),
        sa.Column("changed_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_catalogue_models")),
    )


def downgrade() -> None:
    op.drop_table("catalogue_models")
