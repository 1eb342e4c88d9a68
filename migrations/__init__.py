"""The alembic environment of ptb-sessions, shipped in the package as
``ptb_sessions.migrations``."""
