"""For ``ptb-sessions import-pickle``: the classes a bot defined in its own script.

A bot run as ``python bot.py`` defines its classes in ``__main__``, so its pickle names them
``__main__.Cart``, which no other program can import. With ``--path DIR``, the script in DIR
that defines the missing name at its top level (found by reading its source, without running
it) is loaded as a module of its own, which runs its top level as an import would and skips
its ``if __name__ == "__main__":`` part; while the pickle is read it stands in for
``__main__``.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Final

__all__ = [
    "MAIN",
    "as_main",
    "is_from_script",
    "load_script",
    "missing_main_name",
    "scripts_defining",
]

#: The module name the classes of a bot script have when the bot runs.
MAIN: Final = "__main__"
#: The name a bot script is loaded under (anything but ``__main__``, so its main part is
#: skipped).
_LOADED_NAME: Final = "_ptb_sessions_bot_script"
_MISSING: Final = re.compile(r"Can't get attribute '([^']+)' on <module '([^']+)'")


def missing_main_name(cause: BaseException | None) -> str | None:
    """The name unpickling looked for in ``__main__`` and did not find, if that is what
    ``cause`` says."""
    if not isinstance(cause, AttributeError):
        return None
    found = _MISSING.search(str(cause))
    # __main__ shows as '__main__', or by its spec's name under `python -m` (pkg.__main__)
    spec = getattr(sys.modules.get(MAIN), "__spec__", None)
    main_names = (MAIN, getattr(spec, "name", MAIN))
    return found.group(1) if found and found.group(2) in main_names else None


def _top_level_names(script: Path) -> set[str]:
    try:
        tree = ast.parse(script.read_bytes(), filename=str(script))
    except (OSError, SyntaxError, ValueError):
        return set()
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def scripts_defining(name: str, paths: Sequence[Path]) -> list[Path]:
    """The ``*.py`` files directly in ``paths`` whose top level defines ``name`` (the first
    part of a qualified name), read as source: nothing runs."""
    first = name.split(".", 1)[0]
    return [
        script
        for directory in paths
        for script in sorted(directory.glob("*.py"))
        if first in _top_level_names(script)
    ]


def load_script(script: Path) -> ModuleType:
    """The bot script ``script``, loaded as a module that is not ``__main__``: its top level
    runs (as importing it would), its ``if __name__ == "__main__":`` part does not.

    Raises:
        Exception: Whatever running its top level raises.
    """
    spec = importlib.util.spec_from_file_location(_LOADED_NAME, script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[_LOADED_NAME] = module  # dataclasses look their module up while it runs
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(_LOADED_NAME, None)
    return module


def is_from_script(cls: type, script: ModuleType | None) -> bool:
    """Whether ``cls`` was defined by the loaded bot ``script``."""
    return script is not None and cls.__module__ == script.__name__


@contextlib.contextmanager
def as_main(script: ModuleType | None) -> Iterator[None]:
    """Let ``script`` stand in for ``__main__`` (nothing changes if it is :obj:`None`)."""
    if script is None:
        yield
        return
    real = sys.modules[MAIN]
    sys.modules[MAIN] = script
    try:
        yield
    finally:
        sys.modules[MAIN] = real
