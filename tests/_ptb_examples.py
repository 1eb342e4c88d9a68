"""python-telegram-bot's own example bots, run as they are with an ``SQLAlchemyPersistence``.

Their source is never part of this repository: it is taken at test time from the sdist of the
installed python-telegram-bot version (downloaded once with ``pip download`` into a cache
directory), or from the directory ``PTB_EXAMPLES_DIR``.

:func:`load_example` runs the example's module code as a module of its own, then the body of
its ``main()`` up to ``application.run_polling(...)``, with two substitutions and nothing
else: ``Application.builder()`` is a builder that talks to the in-process Bot API and has the
persistence (so it is "added to its builder"), and a ``PicklePersistence(...)`` it makes is
that same persistence. Updates are fed by the test instead of polled.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

_BUILDER = "__ptb_sessions_builder__"
_PERSISTENCE = "__ptb_sessions_persistence__"
_CACHE = Path(
    os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"),
    "ptb-sessions-tests",
    f"ptb-examples-{version('python-telegram-bot')}",
)


def _download_examples(into: Path) -> None:
    """Extract ``examples/*.py`` of the installed python-telegram-bot's sdist into ``into``."""
    wanted = f"python-telegram-bot=={version('python-telegram-bot')}"
    with tempfile.TemporaryDirectory() as directory:
        download = ["download", "--no-deps", "--no-binary", ":all:", "--quiet"]
        done = subprocess.run(
            [sys.executable, "-m", "pip", *download, "--dest", directory, wanted],
            capture_output=True,
            text=True,
            timeout=300,
        )
        archives = list(Path(directory).glob("*.tar.gz"))
        if done.returncode != 0 or not archives:
            message = f"cannot download the sdist of {wanted}: {done.stderr.strip()[-300:]}"
            if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
                pytest.fail(message)
            pytest.skip(message)
        into.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archives[0]) as archive:
            for member in archive.getmembers():
                parts = Path(member.name).parts
                if len(parts) == 3 and parts[1] == "examples" and parts[2].endswith(".py"):
                    source = archive.extractfile(member)
                    assert source is not None
                    (into / parts[2]).write_bytes(source.read())


def example_source(name: str) -> str:
    """The source of PTB's ``examples/<name>.py``."""
    if "PTB_EXAMPLES_DIR" in os.environ:
        return Path(os.environ["PTB_EXAMPLES_DIR"], f"{name}.py").read_text(encoding="utf-8")
    path = _CACHE / f"{name}.py"
    if not path.exists():
        _download_examples(_CACHE)
    return path.read_text(encoding="utf-8")


class _Substitute(ast.NodeTransformer):
    def visit_Call(self, node: ast.Call) -> Any:
        self.generic_visit(node)
        func = node.func
        if (
            isinstance(func, ast.Attribute)
            and func.attr == "builder"
            and isinstance(func.value, ast.Name)
            and func.value.id == "Application"
        ):
            return ast.copy_location(
                ast.Call(ast.Name(_BUILDER, ast.Load()), args=[], keywords=[]), node
            )
        if isinstance(func, ast.Name) and func.id == "PicklePersistence":
            return ast.copy_location(ast.Name(_PERSISTENCE, ast.Load()), node)
        return node


def _runs_polling(statement: ast.stmt) -> bool:
    return (
        isinstance(statement, ast.Expr)
        and isinstance(statement.value, ast.Call)
        and isinstance(statement.value.func, ast.Attribute)
        and statement.value.func.attr == "run_polling"
    )


def load_example(
    name: str, builder: Callable[[], Any], persistence: Any, monkeypatch: pytest.MonkeyPatch
) -> tuple[ModuleType, Any]:
    """The example's module and the application its ``main()`` builds (see the module docs).
    The module is in :data:`sys.modules` while the test runs, as a script's ``__main__`` is
    (stored job callbacks are found by reference there)."""
    tree = ast.parse(example_source(name), filename=f"{name}.py")
    main = next(
        node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main"
    )
    body: list[ast.stmt] = []
    for statement in main.body:
        if _runs_polling(statement):
            break
        body.append(statement)
    else:
        raise AssertionError(f"{name}.main() does not end with application.run_polling()")
    module = ModuleType(f"ptb_example_{name}")
    module.__dict__[_BUILDER] = builder
    module.__dict__[_PERSISTENCE] = persistence
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(tree, f"{name}.py", "exec"), module.__dict__)  # defines; main() is not run
    main_body = ast.fix_missing_locations(_Substitute().visit(ast.Module(body, [])))
    exec(compile(main_body, f"{name}.py:main", "exec"), module.__dict__)
    return module, module.__dict__["application"]
