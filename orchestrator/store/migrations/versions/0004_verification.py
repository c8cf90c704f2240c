"""verification: check jobs, verification records, CO2 per job, decayed reputation, slashes

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

from orchestrator.store.models import WeiAmount

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("co2_g", sa.Float(), nullable=True))
        batch_op.add_column(
            sa.Column("kind", sa.String(length=8), nullable=False, server_default="job")
        )
        batch_op.add_column(sa.Column("parent_id", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("verification", sa.JSON(), nullable=True))
        batch_op.create_index("ix_jobs_parent_id", ["parent_id"])
    with op.batch_alter_table("workers") as batch_op:
        for name in ("rep_good", "rep_bad", "rep_at"):
            batch_op.add_column(sa.Column(name, sa.Float(), nullable=False, server_default="0"))
        for name in ("verifications_passed", "verifications_failed"):
            batch_op.add_column(sa.Column(name, sa.Integer(), nullable=False, server_default="0"))
    op.create_table(
        "slashes",
        sa.Column("evidence_hash", sa.String(length=66), nullable=False),
        sa.Column("worker_address", sa.String(length=42), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("amount_wei", WeiAmount(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("tx_hash", sa.String(length=66), nullable=True),
        sa.Column("slashed_wei", WeiAmount(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"]),
        sa.PrimaryKeyConstraint("evidence_hash"),
    )
    with op.batch_alter_table("slashes") as batch_op:
        batch_op.create_index("ix_slashes_worker_address", ["worker_address"])


def downgrade() -> None:
    op.drop_table("slashes")
    with op.batch_alter_table("workers") as batch_op:
        for name in (
            "verifications_failed",
            "verifications_passed",
            "rep_at",
            "rep_bad",
            "rep_good",
        ):
            batch_op.drop_column(name)
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_index("ix_jobs_parent_id")
        for name in ("verification", "parent_id", "kind", "co2_g"):
            batch_op.drop_column(name)
