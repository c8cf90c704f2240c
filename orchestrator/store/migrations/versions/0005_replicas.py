"""replicas: the orchestrator processes serving one database, and what they must share

Revision ID: 0005_replicas
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_replicas"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "replicas",
        sa.Column("id", sa.String(length=32), primary_key=True),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("seen_at", sa.Float(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
    )
    op.create_index("ix_replicas_seen_at", "replicas", ["seen_at"])


def downgrade() -> None:
    op.drop_index("ix_replicas_seen_at", table_name="replicas")
    op.drop_table("replicas")
