"""The stored jobs of ``store_jobs=True``: one row per JobQueue job.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from ptb_sessions._schema import ExactString, LongText

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ptb_sessions_jobs",
        sa.Column("id", ExactString(191), nullable=False),
        sa.Column("name", LongText(), nullable=True),
        sa.Column("callback", LongText(), nullable=False),
        sa.Column("codec", sa.String(16), nullable=False),
        sa.Column("data", LongText(), nullable=True),
        sa.Column("chat_id", sa.BigInteger(), nullable=True),
        sa.Column("user_id", sa.BigInteger(), nullable=True),
        sa.Column("trigger", LongText(), nullable=False),
        sa.Column("options", LongText(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("next_run_at", sa.Double(), nullable=True),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_ptb_sessions_jobs"),
    )
    op.create_index("ix_ptb_sessions_jobs_next_run_at", "ptb_sessions_jobs", ["next_run_at"])


def downgrade() -> None:
    op.drop_index("ix_ptb_sessions_jobs_next_run_at", table_name="ptb_sessions_jobs")
    op.drop_table("ptb_sessions_jobs")
