"""chain rollback: redemption rows carry their block hash and a confirmed flag, the event
cursor its block hash

The rows read so far carry no block hash, so nothing could tell whether the chain still holds
them: they are dropped with the cursor, and the next reconcile reads every Redeemed event again
from the deployment block (the chain is the record; these rows are the orchestrator's copy).

Revision ID: 0007_chain_rollback
Revises: 0006_fault_classes
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_chain_rollback"
down_revision = "0006_fault_classes"
branch_labels = None
depends_on = None

REDEMPTIONS_CURSOR = "broker.redeemed"


def upgrade() -> None:
    op.execute(sa.text("DELETE FROM redemptions"))
    op.execute(
        sa.text("DELETE FROM chain_cursors WHERE name = :name").bindparams(name=REDEMPTIONS_CURSOR)
    )
    with op.batch_alter_table("redemptions") as batch_op:
        batch_op.add_column(sa.Column("block_hash", sa.String(length=66), nullable=False))
        batch_op.add_column(sa.Column("confirmed", sa.Boolean(), nullable=False))
        batch_op.create_index("ix_redemptions_block_number", ["block_number"])
    with op.batch_alter_table("chain_cursors") as batch_op:
        batch_op.add_column(sa.Column("block_hash", sa.String(length=66), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("chain_cursors") as batch_op:
        batch_op.drop_column("block_hash")
    with op.batch_alter_table("redemptions") as batch_op:
        batch_op.drop_index("ix_redemptions_block_number")
        batch_op.drop_column("confirmed")
        batch_op.drop_column("block_hash")
