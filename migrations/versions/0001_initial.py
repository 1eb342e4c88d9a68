"""The table of ptb-sessions: one row per (namespace, key).

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from ptb_sessions._schema import ExactString, LongText

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ptb_sessions_data",
        sa.Column("namespace", ExactString(128), nullable=False),
        sa.Column("key", ExactString(512), nullable=False),
        sa.Column("codec", sa.String(16), nullable=False),
        sa.Column("data", LongText(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("data_version", sa.Double(), nullable=True),
        sa.Column("touched_at", sa.Double(), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("namespace", "key", name="pk_ptb_sessions_data"),
    )
    op.create_index("ix_ptb_sessions_data_expires_at", "ptb_sessions_data", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_ptb_sessions_data_expires_at", table_name="ptb_sessions_data")
    op.drop_table("ptb_sessions_data")
