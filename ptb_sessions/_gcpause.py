"""Pausing Python's cyclic garbage collector for a burst of allocation that makes no garbage."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["collector_paused"]


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector in the block (if it runs at all).

    Loading every stored row at start allocates hundreds of thousands of long-lived
    containers and frees almost nothing; the collector would walk the growing heap again and
    again, which takes as long as the load itself. Reference counting still frees what is
    dropped, and the collector runs again when the block ends.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
