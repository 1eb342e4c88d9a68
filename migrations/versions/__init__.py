"""alembic revisions of ptb-sessions."""
