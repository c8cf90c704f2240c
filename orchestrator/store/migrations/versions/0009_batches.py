"""batches: results reported under one signature keep the signed list of result hashes

A worker may report many results with one EIP-712 signature over the list of their struct
hashes. The list is kept once per batch (``result_batches``); each job points at its batch and
its place in the list, so its result is still proven alone.

Revision ID: 0009_batches
Revises: 0008_generation
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_batches"
down_revision = "0008_generation"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "result_batches",
        sa.Column("id", sa.String(length=32), primary_key=True),
        sa.Column("worker_id", sa.String(length=32), nullable=False),
        sa.Column("signature", sa.String(length=132), nullable=False),
        sa.Column("result_hashes", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("result_batch_id", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("result_batch_index", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("result_batch_index")
        batch_op.drop_column("result_batch_id")
    op.drop_table("result_batches")
