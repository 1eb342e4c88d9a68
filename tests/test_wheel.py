"""Acceptance: the built wheel, installed in a fresh virtual environment, migrates SQLite and a
new PostgreSQL database with its ``ptb-sessions`` command, run outside the checkout.

One wheel and one environment serve every test of this module (module-scoped fixture). The
dependencies come from the configured package index (pip's cache is reused).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import server_url
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from ptb_sessions import _alembic

ROOT = Path(__file__).resolve().parents[1]
_NOT_SHIPPED = shutil.ignore_patterns(
    ".git",
    ".venv*",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    "tests",
    "bench",
    "*.sqlite3*",
)


def _run(*argv: str | Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "PTB_SESSIONS_URL", "TELEGRAM_BOT_TOKEN", "VIRTUAL_ENV")
    }
    return subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _check(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"{result.args}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the checkout (the checkout itself stays untouched)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=_NOT_SHIPPED)
    dist = work / "dist"
    _check(
        _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, source, cwd=work)
    )
    (built,) = dist.glob("ptb_sessions-*.whl")
    return built


@pytest.fixture(scope="module")
def command(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``ptb-sessions`` script of a fresh virtual environment with the wheel installed."""
    venv = tmp_path_factory.mktemp("venv") / "venv"
    # no pip inside (faster): this interpreter's pip installs into it
    _check(_run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=venv.parent))
    python = venv / "bin" / "python"
    _check(
        _run(
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            "install",
            "-q",
            wheel,
            cwd=venv.parent,
        )
    )
    where = _check(
        _run(python, "-c", "import ptb_sessions; print(ptb_sessions.__file__)", cwd=venv.parent)
    )
    assert Path(where.stdout.strip()).is_relative_to(venv)  # not the checkout
    return venv / "bin" / "ptb-sessions"


@pytest.fixture
def postgresql_url() -> Iterator[str]:
    """A new, empty PostgreSQL database ``ptbs_wheel_<random>``, dropped afterwards."""
    server = make_url(server_url("postgresql"))
    name = f"ptbs_wheel_{secrets.token_hex(4)}"

    async def execute(statement: str) -> None:
        engine = create_async_engine(server, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as connection:
                await connection.execute(text(statement))
        finally:
            await engine.dispose()

    asyncio.run(execute(f'CREATE DATABASE "{name}"'))
    try:
        # a plain sync URL: the command runs it on asyncpg
        yield server.set(drivername="postgresql", database=name).render_as_string(
            hide_password=False
        )
    finally:
        asyncio.run(execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_wheel_ships_the_migrations_and_the_command(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    assert "ptb_sessions/migrations/env.py" in names
    assert "ptb_sessions/migrations/script.py.mako" in names
    assert any(n.startswith("ptb_sessions/migrations/versions/0001") for n in names)
    assert "ptb_sessions/py.typed" in names
    assert "ptb-sessions = ptb_sessions.cli:main" in scripts


def _migrate(command: Path, url: str, cwd: Path) -> None:
    head = _alembic.head_revision()
    result = _run(command, "--url", url, "db", "check", cwd=cwd)
    assert result.returncode == 1
    assert "not migrated" in result.stderr
    _check(_run(command, "--url", url, "db", "upgrade", cwd=cwd))
    current = _check(_run(command, "--url", url, "db", "current", cwd=cwd))
    assert current.stdout.strip() == f"{head} (head)"
    check = _check(_run(command, "--url", url, "db", "check", cwd=cwd))
    assert head in check.stdout


def test_installed_command_migrates_sqlite(command: Path, tmp_path: Path) -> None:
    _migrate(command, f"sqlite:///{tmp_path / 'bot.sqlite3'}", tmp_path)
    assert (tmp_path / "bot.sqlite3").exists()


def test_installed_command_migrates_a_new_postgresql_database(
    command: Path, postgresql_url: str, tmp_path: Path
) -> None:
    _migrate(command, postgresql_url, tmp_path)


def test_installed_demo_runs_offline(command: Path, tmp_path: Path) -> None:
    first = _check(_run(command, "demo", "--chats", "3", "--updates", "40", cwd=tmp_path))
    total = int(first.stdout.splitlines()[-1].removeprefix("total pizzas: "))
    assert total > 0
    second = _check(_run(command, "demo", "--chats", "3", "--updates", "40", cwd=tmp_path))
    assert second.stdout.splitlines()[-1] == f"total pizzas: {2 * total}"
    assert (tmp_path / "ptb_sessions_demo.sqlite3").exists()
