"""Recording the statements a persistence or storage runs, on every backend.

Every statement goes through SQLAlchemy's execution layer, so its ``before_cursor_execute``
event on each of the database's engines sees them all.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import event

from ptb_sessions._store import Database

_WRITES = ("INSERT", "UPDATE", "DELETE")
#: MariaDB's ``SET STATEMENT var = value FOR`` in front of a statement.
_SET_STATEMENT = re.compile(r"^\s*SET STATEMENT .*? FOR ", re.IGNORECASE)


def _rows_of(statement: str, params: Any) -> int:
    """The rows of one statement's parameters: one, or as many as its arrays hold (a
    statement over arrays of values, one element per row), or as many as its table of values
    (MySQL: ``SELECT %s AS k, ... UNION ALL VALUES (...), (...)``) has rows."""
    if "SELECT %s AS k" in statement:
        tuples = statement.count("), (") + 1 if " UNION ALL VALUES (" in statement else 0
        return 1 + tuples
    values = params.values() if isinstance(params, dict) else params or ()
    return max((len(value) for value in values if isinstance(value, list)), default=1)


def _kind(statement: str) -> str:
    """The statement without MariaDB's ``SET STATEMENT ... FOR`` prefix, upper case."""
    return _SET_STATEMENT.sub("", statement).lstrip().upper()


class StatementLog:
    """Every statement run on ``database`` from now on (connections opened later included)."""

    def __init__(self, database: Database) -> None:
        self.statements: list[tuple[str, Any, int]] = []  # (sql, parameters, rows of params)
        self.commits = 0
        for engine in database.engines:
            event.listen(engine, "before_cursor_execute", self._on_execute)
            event.listen(engine, "commit", self._on_commit)

    def _on_execute(
        self, conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
    ) -> None:
        rows = len(params) if many else _rows_of(statement, params)
        self.statements.append((statement, params, rows))

    def _on_commit(self, conn: Any) -> None:
        self.commits += 1

    def rows_written(self) -> int:
        """How many rows the recorded INSERT, UPDATE and DELETE statements wrote (one per
        parameter set, or per element of the arrays of a statement over arrays)."""
        return sum(rows for sql, _, rows in self.statements if _kind(sql).startswith(_WRITES))

    def mentioning(self, text: str) -> list[tuple[str, Any, int]]:
        """The statements whose SQL or parameters contain ``text``."""
        return [s for s in self.statements if text in s[0] or text in repr(s[1])]
