"""Benchmark: ``JSONCodec.encode`` of 10,000 small chat dicts (the timing that used to be an
assertion in ``tests/test_codec.py``; timings belong here, never in tests). The target is
well under 50 ms for the best of 5 runs.

Usage: python bench/codec.py
"""

from __future__ import annotations

import time

from ptb_sessions import JSONCodec


def main() -> None:
    codec = JSONCodec()
    chats = [{"count": index, "name": f"chat {index}"} for index in range(10_000)]
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for chat in chats:
            codec.encode(chat)
        runs.append(time.perf_counter() - start)
    print(f"JSONCodec.encode, 10,000 small chat dicts: best {min(runs) * 1000:.1f} ms of 5 runs")


if __name__ == "__main__":
    main()
