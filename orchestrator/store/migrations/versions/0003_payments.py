"""payments: payer links, max_units, ledger, vouchers, redemptions, stake eligibility

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

from orchestrator.store.models import WeiAmount

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("clients") as batch_op:
        batch_op.add_column(sa.Column("payer_address", sa.String(length=42), nullable=True))
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("max_units", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("payer_address", sa.String(length=42), nullable=True))
    with op.batch_alter_table("workers") as batch_op:
        batch_op.add_column(sa.Column("stake_eligible", sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column("stake_checked_at", sa.Float(), nullable=True))
    op.create_table(
        "ledger_entries",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("payer", sa.String(length=42), nullable=False),
        sa.Column("payee", sa.String(length=42), nullable=False),
        sa.Column("amount_wei", WeiAmount(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id", "attempt", name="uq_ledger_job_attempt"),
    )
    with op.batch_alter_table("ledger_entries") as batch_op:
        batch_op.create_index("ix_ledger_entries_payer", ["payer"], unique=False)
        batch_op.create_index("ix_ledger_entries_payee", ["payee"], unique=False)
    op.create_table(
        "vouchers",
        sa.Column("payer", sa.String(length=42), nullable=False),
        sa.Column("payee", sa.String(length=42), nullable=False),
        sa.Column("cumulative_wei", WeiAmount(), nullable=False),
        sa.Column("expiry", sa.BigInteger(), nullable=False),
        sa.Column("signer", sa.String(length=42), nullable=False),
        sa.Column("signature", sa.String(length=132), nullable=False),
        sa.Column("entries", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("payer", "payee"),
    )
    op.create_table(
        "redemptions",
        sa.Column("tx_hash", sa.String(length=66), nullable=False),
        sa.Column("log_index", sa.Integer(), nullable=False),
        sa.Column("payer", sa.String(length=42), nullable=False),
        sa.Column("payee", sa.String(length=42), nullable=False),
        sa.Column("cumulative_wei", WeiAmount(), nullable=False),
        sa.Column("paid_wei", WeiAmount(), nullable=False),
        sa.Column("fee_wei", WeiAmount(), nullable=False),
        sa.Column("block_number", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tx_hash", "log_index"),
    )
    with op.batch_alter_table("redemptions") as batch_op:
        batch_op.create_index("ix_redemptions_payer", ["payer"], unique=False)
        batch_op.create_index("ix_redemptions_payee", ["payee"], unique=False)
    op.create_table(
        "chain_cursors",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("next_block", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("chain_cursors")
    op.drop_table("redemptions")
    op.drop_table("vouchers")
    op.drop_table("ledger_entries")
    with op.batch_alter_table("workers") as batch_op:
        batch_op.drop_column("stake_checked_at")
        batch_op.drop_column("stake_eligible")
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("payer_address")
        batch_op.drop_column("max_units")
    with op.batch_alter_table("clients") as batch_op:
        batch_op.drop_column("payer_address")
