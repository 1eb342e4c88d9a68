"""Side-by-side sessions on SQLite of any checkout: updates/s and CPU time per update.

Runs ``bench/sessions.py``'s sequential and concurrent workloads of the checkout ``TREE`` (its
own ``ptb_sessions`` and ``bench``), with ``SQLAlchemyStorage`` on a temporary SQLite file or
with ``MemoryStorage``, and prints one JSON line. CPU time (``time.process_time``, all threads)
per update is the difference between a 500- and a 2,500-update run, so start-up and warm-up
cancel out; it is steadier than wall time on a shared machine.

Usage: python bench/side_by_side.py TREE {sqlite,sqlite-async,memory}
(``sqlite-async``: aiosqlite through SQLAlchemy's async engine instead of the sync engine in a
thread; only for checkouts with ``Dialect.threaded``). Run each checkout with its own
environment, alternating, e.g. ``for i in 1 2; do venv-a/bin/python bench/side_by_side.py
/path/a sqlite; venv-b/bin/python bench/side_by_side.py /path/b sqlite; done``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from typing import Any

TREE, VARIANT = sys.argv[1], sys.argv[2]
sys.path.insert(0, TREE)
sys.path.insert(0, os.path.join(TREE, "bench"))

import ptb_sessions  # noqa: E402 - from TREE

assert ptb_sessions.__file__ is not None and ptb_sessions.__file__.startswith(TREE)
if VARIANT == "sqlite-async":
    from ptb_sessions import _dialects

    _dialects._SQLite.threaded = False  # type: ignore[misc]

import sessions  # type: ignore[import-not-found]  # noqa: E402 - TREE's bench/sessions.py

from ptb_sessions import MemoryStorage, SQLAlchemyStorage  # noqa: E402


async def main() -> None:
    out: dict[str, Any] = {"tree": TREE, "variant": VARIANT}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, run in (("seq", sessions.run_sequential), ("conc", sessions.run_concurrent)):
            storage: Any = (
                MemoryStorage()
                if VARIANT == "memory"
                else SQLAlchemyStorage(f"sqlite:///{tmp}/{mode}.db")
            )
            cpu: dict[int, float] = {}
            rate = 0.0
            for n in (500, 2500):
                start = time.process_time()
                rate, errors = await run(sessions.session_handlers(storage), n)
                cpu[n] = time.process_time() - start
                assert not errors
            out[mode] = round(rate)
            out[f"{mode}_cpu_us"] = round((cpu[2500] - cpu[500]) / 2000 * 1e6)
            if VARIANT != "memory":
                await storage.close()
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
