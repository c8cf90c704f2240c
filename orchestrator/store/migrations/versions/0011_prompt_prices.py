"""prompt prices: a generate job prices its prompt tokens apart from its completion tokens

A worker's generate offer may ask another price for a prompt token than for a completion
token, and a client may cap the two apart. A job keeps the client's prompt cap, the most it can
cost (fixed at submit: what a payer's budget holds for it), the agreed prompt price and the
prompt tokens billed at it. Jobs made before this revision have none of these: their prompt
tokens cost the job's one price, and their bound is max_units at the max price.

Revision ID: 0011_prompt_prices
Revises: 0010_job_lookup_indexes
"""

import sqlalchemy as sa
from alembic import op

from orchestrator.store.models import WeiAmount

revision = "0011_prompt_prices"
down_revision = "0010_job_lookup_indexes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("max_prompt_price_wei_per_unit", WeiAmount(), nullable=True))
        batch_op.add_column(sa.Column("max_cost_wei", WeiAmount(), nullable=True))
        batch_op.add_column(sa.Column("prompt_price_wei_per_unit", WeiAmount(), nullable=True))
        batch_op.add_column(sa.Column("prompt_units", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("prompt_units")
        batch_op.drop_column("prompt_price_wei_per_unit")
        batch_op.drop_column("max_cost_wei")
        batch_op.drop_column("max_prompt_price_wei_per_unit")
