"""group pins

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "grouppin",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("group", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("model", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("version", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("set_by", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("set_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("group", "model"),
    )
    with op.batch_alter_table("grouppin") as batch_op:
        batch_op.create_index(batch_op.f("ix_grouppin_group"), ["group"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("grouppin") as batch_op:
        batch_op.drop_index(batch_op.f("ix_grouppin_group"))
    op.drop_table("grouppin")
