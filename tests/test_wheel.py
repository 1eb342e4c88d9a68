"""Acceptance: the README's commands, run as written in a copy of the checkout and a fresh
virtual environment (``pip install . && ptb-sessions demo``), and the installed
``ptb-sessions`` command migrating SQLite and a new PostgreSQL database outside the checkout.

One environment serves every test of this module (a session-scoped fixture: built once, even
when pytest-xdist runs other modules' tests between this module's). The dependencies
come from the configured package index (pip's cache is reused). Every command in README.rst is
run here (the deployment lines with the test database for their example URL), except the test
command, which ``.ci/run`` runs as written.
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
#: One pytest-xdist worker runs this whole module, so its environment is built once.
pytestmark = pytest.mark.xdist_group("wheel")
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


@pytest.fixture(scope="session")
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


#: The README's commands: the demo (which installs first), the install alone, the test
#: command (run by .ci/run), and the deployment lines with their example URL.
README_DEMO = "pip install . && ptb-sessions demo"
README_INSTALL = "pip install ."
README_TESTS = 'pip install -e ".[test]" && python -m pytest -q -n 2'
EXAMPLE_URL = "postgresql://bot@db/bot"
README_DEPLOY = (
    f"ptb-sessions --url {EXAMPLE_URL} db upgrade",
    f"ptb-sessions --url {EXAMPLE_URL} db check     # exits non-zero if not at head",
    f"alembic -x url={EXAMPLE_URL} upgrade head",
)


def readme_commands() -> list[str]:
    """Every line of the literal blocks (a paragraph ending in ``::``) of README.rst."""
    lines = (ROOT / "README.rst").read_text(encoding="utf-8").splitlines()
    commands, in_block = [], False
    for line in lines:
        if in_block and line and not line.startswith(" "):
            in_block = False
        if in_block and line.strip():
            commands.append(line.strip())
        if line.endswith("::") and not line.lstrip().startswith(".."):
            in_block = True
    return commands


def _shell(command: str, venv: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``command`` run by bash as a user would type it, with ``venv`` activated."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "PTB_SESSIONS_URL", "TELEGRAM_BOT_TOKEN")
    }
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="session")
def readme_install(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """The README's first command, as written, in a copy of the checkout with a fresh virtual
    environment activated: ``(venv, checkout copy, its output)``."""
    work = tmp_path_factory.mktemp("readme")
    source = work / "ptb-sessions"
    shutil.copytree(ROOT, source, ignore=_NOT_SHIPPED)
    venv = work / "venv"
    _check(_run(sys.executable, "-m", "venv", venv, cwd=work))
    result = _check(_shell(README_DEMO, venv, source))
    return venv, source, result.stdout


@pytest.fixture(scope="session")
def command(readme_install: tuple[Path, Path, str]) -> Path:
    """The ``ptb-sessions`` script that the README's ``pip install .`` installed."""
    venv = readme_install[0]
    python = venv / "bin" / "python"
    where = _check(
        _run(python, "-c", "import ptb_sessions; print(ptb_sessions.__file__)", cwd=venv.parent)
    )
    assert Path(where.stdout.strip()).is_relative_to(venv)  # installed, not the checkout
    return venv / "bin" / "ptb-sessions"


def test_every_readme_command_is_run_here_or_by_ci() -> None:
    assert readme_commands() == [README_DEMO, README_TESTS, README_INSTALL, *README_DEPLOY]
    assert README_TESTS in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()


def test_readme_demo_command_as_written(readme_install: tuple[Path, Path, str]) -> None:
    venv, source, output = readme_install
    total = int(output.splitlines()[-1].removeprefix("total pizzas: "))
    assert total > 0
    again = _check(_shell("ptb-sessions demo", venv, source))
    assert again.stdout.splitlines()[-1] == f"total pizzas: {2 * total}"
    installed = _check(_shell(README_INSTALL, venv, source))  # the Install section's command
    assert installed.returncode == 0


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


def test_readme_deployment_commands(
    readme_install: tuple[Path, Path, str], postgresql_url: str
) -> None:
    venv, source, _ = readme_install
    upgrade, check, alembic = (line.replace(EXAMPLE_URL, postgresql_url) for line in README_DEPLOY)
    result = _shell(check, venv, source)
    assert result.returncode == 1  # not at head yet
    assert "not migrated" in result.stderr
    assert _check(_shell(upgrade, venv, source)).returncode == 0
    assert _alembic.head_revision() in _check(_shell(check, venv, source)).stdout
    assert _check(_shell(alembic, venv, source)).returncode == 0  # from the checkout


def test_installed_demo_runs_offline(command: Path, tmp_path: Path) -> None:
    first = _check(_run(command, "demo", "--chats", "3", "--updates", "40", cwd=tmp_path))
    total = int(first.stdout.splitlines()[-1].removeprefix("total pizzas: "))
    assert total > 0
    second = _check(_run(command, "demo", "--chats", "3", "--updates", "40", cwd=tmp_path))
    assert second.stdout.splitlines()[-1] == f"total pizzas: {2 * total}"
    assert (tmp_path / "ptb_sessions_demo.sqlite3").exists()
