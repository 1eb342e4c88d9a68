"""Benchmark: the floor of a write through SQLite's database thread.

On SQLite, ``SQLAlchemyStorage`` runs every statement in one thread of its own, so that the
event loop never blocks. This times a round trip to such a thread that does nothing
(``loop.run_in_executor`` of a no-op on a one-thread pool): no sequential session write on
SQLite can be faster than this, whatever the statement costs.

Usage: python bench/thread_hop.py [--calls N]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from concurrent.futures import ThreadPoolExecutor


async def round_trip_us(calls: int) -> float:
    """Microseconds per round trip, over ``calls`` round trips."""
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(1) as executor:
        began = time.perf_counter()
        for _ in range(calls):
            await loop.run_in_executor(executor, int)
        return (time.perf_counter() - began) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    args = parser.parse_args()
    for run in range(1, 4):
        us = asyncio.run(round_trip_us(args.calls))
        print(f"run {run}: {us:.1f} µs per round trip ({args.calls:,} calls)")


if __name__ == "__main__":
    main()
