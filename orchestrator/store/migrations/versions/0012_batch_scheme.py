"""batch scheme: a result batch says what its signature covers

Batches were signed over the list of their result hashes ("list"); they are now signed over
the Merkle root of that list and its count ("merkle"), so that each result's proof is its path
to the root rather than the whole list. Batches stored before this revision are "list", and
keep being proven so.

Revision ID: 0012_batch_scheme
Revises: 0011_prompt_prices
"""

import sqlalchemy as sa
from alembic import op

revision = "0012_batch_scheme"
down_revision = "0011_prompt_prices"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("result_batches") as batch_op:
        batch_op.add_column(
            sa.Column("scheme", sa.String(8), nullable=False, server_default="list")
        )


def downgrade() -> None:
    with op.batch_alter_table("result_batches") as batch_op:
        batch_op.drop_column("scheme")
