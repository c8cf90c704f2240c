"""generation: jobs record when their first streamed token arrived (time to first token)

Revision ID: 0008_generation
Revises: 0007_chain_rollback
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_generation"
down_revision = "0007_chain_rollback"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("first_token_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("first_token_at")
