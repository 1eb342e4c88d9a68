"""``ptb-sessions import-pickle``: the data of a ``PicklePersistence``, moved into the database.

The file is read by PTB's own :class:`~telegram.ext.PicklePersistence` and written through
:class:`~ptb_sessions.SQLAlchemyPersistence`'s own ``update_*`` methods, so the rows are
exactly those the persistence would write. With the JSON codec, objects of the bot's own
classes that :class:`~ptb_sessions.JSONCodec` supports are stored as registered types, and the
command says which ``types=[...]`` the bot must pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import pickle
import sys
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Final

from telegram.ext import ExtBot, PicklePersistence

from ptb_sessions._cli_botscript import (
    MAIN,
    as_main,
    is_from_script,
    load_script,
    missing_main_name,
    scripts_defining,
)
from ptb_sessions._cli_common import PROG, CLIError, Deadline, dispose, progress_bar
from ptb_sessions._codec import Codec, JSONCodec, PickleCodec
from ptb_sessions._errors import SerializationError
from ptb_sessions._rows import encode_value
from ptb_sessions._sqlalchemypersistence import BUILTIN_NAMESPACES, SQLAlchemyPersistence
from ptb_sessions._types import default_name, registrable_classes

__all__ = ["PICKLE_SUFFIXES", "PickleImport", "import_pickle"]

#: The suffixes of the files of a ``PicklePersistence(single_file=False)``.
PICKLE_SUFFIXES: Final = ("user_data", "chat_data", "bot_data", "callback_data", "conversations")
#: A token for the bot that unpickling puts where the pickled data held PTB's bot.
_PLACEHOLDER_TOKEN: Final = "123456:ptb-sessions-import-placeholder"
#: How many entries are written in one transaction.
_CHUNK: Final = 500


def _pickle_layout(path: Path) -> bool:
    """Whether ``path`` is a single-file ``PicklePersistence`` (else the prefix of its files).

    Raises:
        CLIError: Neither ``path`` nor any ``path_<kind>`` file exists.
    """
    if path.is_file():
        return True
    if any(Path(f"{path}_{suffix}").is_file() for suffix in PICKLE_SUFFIXES):
        return False
    raise CLIError(
        f"there is no PicklePersistence file {path} (single_file=True), nor "
        f"{path}_user_data, {path}_chat_data, ... (single_file=False)"
    )


def _unpickling_error(path: Path, cause: BaseException | None, paths: Sequence[Path]) -> str:
    """Why the objects of the pickle file at ``path`` could not be rebuilt, and what to do."""
    searched = (
        f"--path {' '.join(str(p) for p in paths)}"
        if paths
        else "no --path was given (the current directory is not searched)"
    )
    if isinstance(cause, ModuleNotFoundError):
        return (
            f"cannot read {path}: its objects need the module {cause.name!r}, which cannot be "
            f"imported ({searched}); pass --path DIR, the directory of your bot's modules"
        )
    name = missing_main_name(cause)
    if name is not None:
        scripts = scripts_defining(name, paths)
        found = (
            f"the scripts {', '.join(map(str, scripts))} all define {name}, pass --path with "
            "the directory of the bot's alone"
            if len(scripts) > 1
            else f"no script directly in {searched} defines {name} at its top level"
        )
        return (
            f"cannot read {path}: its objects are of classes defined in the bot's __main__ "
            f"script ({cause}); {found}. Pass --path DIR with the directory of the bot's "
            "script (its top level runs, as an import would; its `if __name__ == "
            "'__main__':` part does not), or move those classes into a module of their own "
            "that the bot imports (e.g. models.py), run the bot once so PicklePersistence "
            f"saves the file again, then run `{PROG} import-pickle --path DIR`"
        )
    if isinstance(cause, AttributeError | ImportError):
        return (
            f"cannot read {path}: its objects need a class that cannot be found ({cause}; "
            f"{searched}); pass --path DIR, the directory of your bot's modules"
        )
    reason = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    return f"cannot read {path}: not a PicklePersistence file{reason}"


@contextlib.contextmanager
def _importable_from(paths: Sequence[Path]) -> Iterator[None]:
    """Let unpickling import modules from ``paths`` (and only from the usual places else)."""
    added = [str(p.resolve()) for p in paths]
    for directory in added:
        if not Path(directory).is_dir():
            raise CLIError(f"--path {directory}: not a directory")
    sys.path[:0] = added
    importlib.invalidate_caches()
    try:
        yield
    finally:
        for directory in added:
            sys.path.remove(directory)


@dataclass(frozen=True, slots=True)
class PickleImport:
    """What ``import-pickle`` did."""

    #: How many entries of each kind were copied.
    counts: dict[str, int]
    #: What the bot must pass as its codec to read the rows (``JSONCodec(types=[Cart])``),
    #: if they hold its own classes.
    codec: str | None


@dataclass(frozen=True, slots=True)
class _Pickled:
    """What a ``PicklePersistence`` file holds, and the bot script its classes came from."""

    data: dict[str, Any]
    script: ModuleType | None


async def _read_pickle(path: Path, single_file: bool) -> dict[str, Any]:
    source: PicklePersistence[Any, Any, Any] = PicklePersistence(path, single_file=single_file)
    # Pickled data may hold PTB's bot (replaced by a marker when pickled): a placeholder bot
    # stands in for it.
    source.set_bot(ExtBot(_PLACEHOLDER_TOKEN))
    data = {
        "user_data": await source.get_user_data(),
        "chat_data": await source.get_chat_data(),
        "bot_data": await source.get_bot_data(),
        "callback_data": await source.get_callback_data(),
    }
    if not single_file:  # a single file holds them (None if never loaded)
        await source.get_conversations("")
    conversations = {
        name: {key: state for key, state in states.items() if state is not None}
        for name, states in (source.conversations or {}).items()
    }
    data["conversations"] = {name: states for name, states in conversations.items() if states}
    callback_data = data["callback_data"]
    if not (isinstance(callback_data, tuple | list) and len(callback_data) == 2):
        data["callback_data"] = None  # old files hold {} when there is none
    return data


def _bot_script_for(cause: BaseException | None, paths: Sequence[Path]) -> ModuleType | None:
    """The bot script in ``paths`` that defines the ``__main__`` class unpickling missed
    (``cause``), loaded; :obj:`None` if there is not exactly one."""
    name = missing_main_name(cause)
    scripts = [] if name is None else scripts_defining(name, paths)
    if len(scripts) != 1:
        return None
    try:
        return load_script(scripts[0])
    except Exception as exc:
        raise CLIError(
            f"cannot load the bot script {scripts[0]} (for the class {name} of the pickle): "
            f"{type(exc).__name__}: {exc}"
        ) from exc


async def _load_pickle(path: Path, paths: Sequence[Path]) -> _Pickled:
    """Everything a ``PicklePersistence`` stored at ``path``, read by PTB's own class. This
    unpickles the file, which runs any code it holds. The modules of its objects' classes are
    imported from ``paths``; classes of the bot's ``__main__`` come from the bot script in
    ``paths`` that defines them (see :mod:`ptb_sessions._cli_botscript`)."""
    single_file = _pickle_layout(path)
    script: ModuleType | None = None
    while True:
        try:
            with _importable_from(paths), as_main(script):
                return _Pickled(await _read_pickle(path, single_file), script)
        except TypeError as exc:  # how PicklePersistence reports unreadable files
            cause = exc.__cause__
            if cause is None or isinstance(cause, pickle.UnpicklingError | EOFError):
                reason = (
                    f"{exc} ({type(cause).__name__}: {cause})" if cause is not None else str(exc)
                )
                raise CLIError(f"cannot read {path}: {reason}") from exc
            if script is None:
                with _importable_from(paths):
                    script = _bot_script_for(cause, paths)
                if script is not None:
                    continue  # once more, with the bot script as __main__
            raise CLIError(_unpickling_error(path, cause, paths)) from exc


def _own_types(data: dict[str, Any], script: ModuleType | None) -> dict[str, type]:
    """The registrable classes in ``data``, by the name the bot's
    :class:`~ptb_sessions.JSONCodec` stores them under: ``module.QualName``, where the module
    of a class of the bot script is ``__main__``, as when the bot runs."""
    return {
        f"{MAIN}.{cls.__qualname__}" if is_from_script(cls, script) else default_name(cls): cls
        for cls in registrable_classes(data)
    }


def _types_argument(types: dict[str, type], script: ModuleType | None) -> str:
    """What the bot passes to read what was imported: ``JSONCodec(types=[Cart, models.S])``."""
    names = sorted(
        cls.__qualname__ if is_from_script(cls, script) else default_name(cls)
        for cls in types.values()
    )
    return f"JSONCodec(types=[{', '.join(names)}])"


def _check_encodable(codec: Codec, data: dict[str, Any]) -> None:
    """Encode every value before writing any, so an unencodable one stops the import whole."""

    def values() -> Iterator[tuple[str, Any]]:
        for kind in ("user_data", "chat_data"):
            for item_id, value in data[kind].items():
                yield f"{kind}[{item_id}]", value
        if data["bot_data"]:
            yield "bot_data", data["bot_data"]
        if data["callback_data"] is not None:
            yield "callback_data", data["callback_data"]
        for name, states in data["conversations"].items():
            for key, state in states.items():
                yield f"conversation:{name}[{list(key)}]", state

    for root, value in values():
        try:
            encode_value(codec, value, root, None)
        except SerializationError as exc:
            hint = (
                " (pass --codec pickle to store arbitrary objects)" if codec.name == "json" else ""
            )
            raise CLIError(f"{exc}; nothing was imported{hint}") from None


async def import_pickle(
    url: Any,
    path: Path,
    *,
    codec_name: str = "json",
    replace: bool = False,
    paths: Sequence[Path] = (),
    deadline: Deadline,
) -> PickleImport:
    """Copy the data of a ``PicklePersistence`` into the database through
    :class:`~ptb_sessions.SQLAlchemyPersistence`'s own ``update_*`` methods, then
    :meth:`~ptb_sessions.SQLAlchemyPersistence.flush`, so the rows are exactly those the
    persistence would write. Creates or upgrades the schema if needed. Reading the file runs
    any code it holds (it is a pickle); the classes of its objects are imported from
    ``paths``, and those of the bot's ``__main__`` script from that script in ``paths``. With
    the JSON codec, the objects of classes it supports are stored as registered types.

    Returns:
        How many entries of each kind were copied, and the ``types`` the bot must give its
        codec to read them.

    Raises:
        CLIError: The file is missing or unreadable, a class of its objects cannot be
            imported, a value cannot be encoded, or the database already holds PTB data
            (without ``replace``).
    """
    pickled = await _load_pickle(path, paths)
    if codec_name == "pickle" and pickled.script is not None:
        raise CLIError(
            f"the objects of {path} are of classes of the bot's __main__ script, which a "
            "pickled row could only name by a module the bot does not have; nothing was "
            "imported (import them with the JSON codec, the default: it stores them as "
            "registered types)"
        )
    data = pickled.data
    types = {} if codec_name == "pickle" else _own_types(data, pickled.script)
    codec: Codec = PickleCodec() if codec_name == "pickle" else JSONCodec(types=types)
    _check_encodable(codec, data)
    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(
        url, codec=codec, timeout=deadline.seconds
    )
    database = persistence.database
    try:
        if not replace:
            await deadline(database.ensure_schema(), "Checking the schema")
            taken = [
                f"{namespace} ({rows} rows)"
                for namespace, rows, _, _ in await deadline(database.stats(), "Counting rows")
                if namespace in BUILTIN_NAMESPACES or namespace.startswith("conversation:")
            ]
            if taken:
                raise CLIError(
                    f"the database {database.masked_url} already holds PTB data: "
                    f"{', '.join(taken)}; nothing was imported (pass --replace to replace "
                    "the entries of the pickle file and keep the others)"
                )
        # Load what is stored, as Application.initialize does, so replaced rows are written
        # with their current versions.
        loads: list[Awaitable[Any]] = [
            persistence.get_user_data(),
            persistence.get_chat_data(),
            persistence.get_bot_data(),
            persistence.get_callback_data(),
        ]
        loads.extend(persistence.get_conversations(name) for name in data["conversations"])
        for load in loads:
            await deadline(load, "Reading the stored data")
        counts = await _write_pickled(persistence, data, path, deadline)
        await deadline(persistence.flush(), "Writing the rows")
    except BaseException:
        await dispose(database, deadline)
        raise
    return PickleImport(counts, _types_argument(types, pickled.script) if types else None)


async def _write_pickled(
    persistence: SQLAlchemyPersistence[Any, Any, Any],
    data: dict[str, Any],
    path: Path,
    deadline: Deadline,
) -> dict[str, int]:
    calls: list[Any] = []
    counts = {"user_data": 0, "chat_data": 0, "bot_data": 0, "callback_data": 0}
    for user_id, value in data["user_data"].items():
        calls.append((persistence.update_user_data, (user_id, value)))
    counts["user_data"] = len(data["user_data"])
    for chat_id, value in data["chat_data"].items():
        calls.append((persistence.update_chat_data, (chat_id, value)))
    counts["chat_data"] = len(data["chat_data"])
    if data["bot_data"]:
        calls.append((persistence.update_bot_data, (data["bot_data"],)))
        counts["bot_data"] = 1
    if data["callback_data"] is not None:
        calls.append((persistence.update_callback_data, (data["callback_data"],)))
        counts["callback_data"] = 1
    for name, states in data["conversations"].items():
        for key, state in states.items():
            calls.append((persistence.update_conversation, (name, key, state)))
        counts[f"conversation:{name}"] = len(states)
    with progress_bar() as bar:
        task = bar.add_task(f"Importing {path.name}", total=len(calls))
        for start in range(0, len(calls), _CHUNK):
            chunk = calls[start : start + _CHUNK]
            # started in one loop iteration, like Application.update_persistence does: the
            # persistence writes each chunk in one transaction
            await deadline(
                asyncio.gather(*(method(*args) for method, args in chunk)), "Writing the rows"
            )
            bar.advance(task, len(chunk))
    return counts
