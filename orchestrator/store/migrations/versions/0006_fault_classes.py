"""fault classes: whose fault a failure was, input claims awaiting confirmation, per-client
input-failure score (throttling), skipped renditions on results, the media probe of a blob,
and inputs known to fail

Revision ID: 0006_fault_classes
Revises: 0005_replicas
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_fault_classes"
down_revision = "0005_replicas"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("fault", sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column("input_claims", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("skipped_renditions", sa.JSON(), nullable=True))
    with op.batch_alter_table("clients") as batch_op:
        batch_op.add_column(
            sa.Column("input_failures", sa.Float(), nullable=False, server_default="0")
        )
        batch_op.add_column(
            sa.Column("input_failures_at", sa.Float(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("blobs") as batch_op:
        batch_op.add_column(sa.Column("probe", sa.JSON(), nullable=True))
    op.create_table(
        "refused_inputs",
        sa.Column("input_key", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("input_key"),
    )


def downgrade() -> None:
    op.drop_table("refused_inputs")
    with op.batch_alter_table("blobs") as batch_op:
        batch_op.drop_column("probe")
    with op.batch_alter_table("clients") as batch_op:
        batch_op.drop_column("input_failures_at")
        batch_op.drop_column("input_failures")
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("skipped_renditions")
        batch_op.drop_column("input_claims")
        batch_op.drop_column("fault")
