"""The reliability suite: every test runs with all logging captured at DEBUG level, and no
database password may appear in any record (message or traceback) of any test.

The records are checked as they are emitted (keeping them all would distort the memory
measurement of the load test); pytest's own log capture is raised to WARNING during these tests
for the same reason.
"""

from __future__ import annotations

import gc
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).parent))

from _reliability import SECRETS, SecretWatch


def _top_conftest() -> ModuleType:
    """The module of ``tests/conftest.py`` that pytest loaded.

    pytest imports every conftest.py outside a package as the module ``conftest`` and drops
    the previous one from ``sys.modules`` first; tests elsewhere import helpers with
    ``from conftest import ...`` at run time, so this conftest puts the top-level one back.
    """
    top = Path(__file__).resolve().parents[1] / "conftest.py"
    for obj in gc.get_objects():
        path = getattr(obj, "__file__", None) if isinstance(obj, ModuleType) else None
        if path and Path(path).resolve() == top:
            return obj  # type: ignore[no-any-return]
    raise RuntimeError("tests/conftest.py was not loaded before tests/reliability/conftest.py")


_TOP = _top_conftest()
SERVER_URLS: dict[str, str] = _TOP.SERVER_URLS


def pytest_plugin_registered(plugin: object) -> None:
    """Once pytest registered this conftest (its import checks are done), ``conftest`` means
    the top-level one again."""
    if isinstance(plugin, ModuleType) and getattr(plugin, "__file__", None) == __file__:
        sys.modules["conftest"] = _TOP


#: Passwords that must never be logged: the one of the password-URL tests and those of the
#: configured server URLs.
SECRETS.update(
    str(make_url(url).password) for url in SERVER_URLS.values() if make_url(url).password
)


class _Suite:
    records = 0
    leaks: list[str] = []


@pytest.fixture(autouse=True)
def debug_log_watch() -> Iterator[SecretWatch]:
    """All logging at DEBUG level for the test; fails it if a record shows a password."""
    root = logging.getLogger()
    watch = SecretWatch()
    old_level = root.level
    quieted = [(h, h.level) for h in root.handlers if type(h).__module__ == "_pytest.logging"]
    for handler, _ in quieted:
        handler.setLevel(max(handler.level, logging.WARNING))
    root.addHandler(watch)
    root.setLevel(logging.DEBUG)
    # libraries that set their own level (SQLAlchemy sets "sqlalchemy" to WARNING) log at
    # DEBUG too: statements, parameters, pool events
    raised = [
        (logger, logger.level)
        for logger in logging.root.manager.loggerDict.values()
        if isinstance(logger, logging.Logger) and logger.level > logging.DEBUG
    ]
    for logger, _ in raised:
        logger.setLevel(logging.DEBUG)
    try:
        yield watch
    finally:
        root.removeHandler(watch)
        root.setLevel(old_level)
        for logger, level in raised:
            logger.setLevel(level)
        for handler, level in quieted:
            handler.setLevel(level)
        _Suite.records += watch.count
        _Suite.leaks.extend(watch.leaks)
    assert watch.count > 0, "nothing was logged at DEBUG level: the capture does not work"
    assert not watch.leaks, f"a password was logged: {watch.leaks[:3]}"


@pytest.fixture(autouse=True, scope="session")
def debug_log_final_check() -> Iterator[None]:
    """The final check over every test of the suite."""
    yield
    assert not _Suite.leaks, f"a password was logged during the suite: {_Suite.leaks[:3]}"
