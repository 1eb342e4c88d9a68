"""Benchmark: encode and decode speed of :class:`~ptb_sessions.JSONCodec`, the codec of this
checkout side by side with the codec before the bot's own types were added (loaded from git), in
one run.

Each workload is a list of values encoded (and its encodings decoded) one by one, the way the
persistence encodes one row at a time; the time is the best of ``--repeat`` rounds, the two
codecs alternating round by round so that a busy machine slows both alike, and the time is
CPU time (``time.process_time``), which waiting for the CPU does not count. Workloads:

* ``plain chat dicts``: 10,000 small chat_data dicts (an int and a str), the common case;
* ``plain nested``: 1,000 dicts of 20 keys with lists and nested dicts, all plain JSON;
* ``tagged built-ins``: 1,000 dicts holding tuples, sets, int keys, dates, Decimals, bytes;
* ``own types`` (this checkout only): 1,000 dicts holding a registered dataclass, an IntEnum,
  a dict subclass and a defaultdict.

Target: plain values no more than 10% slower than before.

Usage: python bench/codec.py [--before REV] [--repeat N]
       (REV: default the parent of the commit that added ptb_sessions/_types.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dtm
import enum
import subprocess
import sys
import time
import types
import uuid
from collections import defaultdict
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

from ptb_sessions import JSONCodec

ROOT = Path(__file__).resolve().parent.parent
TARGET = 0.10


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()


def default_before() -> str:
    """The parent of the commit that added the type registry."""
    added = _git("log", "--diff-filter=A", "--format=%H", "--", "ptb_sessions/_types.py")
    return f"{added.splitlines()[-1]}^" if added else "HEAD"


def codec_before(rev: str) -> Any:
    """A ``JSONCodec()`` of the ``_codec.py`` of ``rev``, as its own module."""
    module = types.ModuleType("_codec_before")
    exec(
        compile(_git("show", f"{rev}:ptb_sessions/_codec.py"), "_codec_before", "exec"),
        module.__dict__,
    )
    return module.JSONCodec()


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclasses.dataclass
class Order:
    item: str
    count: int
    at: dtm.datetime


class Profile(dict[str, Any]):
    pass


def workloads() -> dict[str, list[Any]]:
    when = dtm.datetime(2026, 12, 1, 12, 0, tzinfo=dtm.timezone.utc)
    return {
        "plain chat dicts": [{"count": n, "name": f"chat {n}"} for n in range(10_000)],
        "plain nested": [
            {
                **{f"key{k}": k * n for k in range(10)},
                "history": [{"at": n, "text": "hello", "ok": True} for _ in range(5)],
                "settings": {"lang": "en", "tz": None, "limits": [1, 2.5, 3]},
            }
            for n in range(1_000)
        ],
        "tagged built-ins": [
            {
                "tags": ("a", "b"),
                "seen": {1, 2, n},
                n: "int key",
                "when": when,
                "day": when.date(),
                "price": Decimal("9.90"),
                "raw": b"\x00\x01",
                "id": uuid.UUID(int=n),
            }
            for n in range(1_000)
        ],
    }


def own_workload() -> list[Any]:
    when = dtm.datetime(2026, 12, 1, 12, 0, tzinfo=dtm.timezone.utc)
    return [
        {
            "order": Order("pizza", n, when),
            "level": Level.HIGH,
            "profile": Profile(name="Zoë", age=n),
            "clicks": defaultdict(int, {n: 2}),
        }
        for n in range(1_000)
    ]


def timed(run: Callable[[], object]) -> float:
    """The CPU time of ``run()``: a process waiting for the CPU of a busy machine is not
    charged for the wait, so the comparison holds on a shared machine."""
    start = time.process_time()
    run()
    return time.process_time() - start


def _encode_all(codec: Any, values: list[Any]) -> Callable[[], object]:
    return lambda: [codec.encode(value) for value in values]


def _decode_all(codec: Any, encoded: list[str]) -> Callable[[], object]:
    return lambda: [codec.decode(data) for data in encoded]


def compare(before: Any, after: Any, values: list[Any], repeat: int) -> tuple[float, ...]:
    """Best encode and decode times of all ``values``: before, after, before, after."""
    encoded = [after.encode(value) for value in values]
    assert encoded == [before.encode(value) for value in values], "the stored format changed"
    best = [float("inf")] * 4
    for _ in range(repeat):
        for slot, codec in ((0, before), (1, after)):
            best[slot] = min(best[slot], timed(_encode_all(codec, values)))
            best[slot + 2] = min(best[slot + 2], timed(_decode_all(codec, encoded)))
    return tuple(best)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default=None, help="git revision of the old codec")
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    rev = args.before or default_before()
    before, after = codec_before(rev), JSONCodec()
    print(
        f"JSONCodec before ({_git('rev-parse', '--short', rev)}) vs this checkout, best of "
        f"{args.repeat}, µs per value\n"
    )
    print(
        "| workload | values | encode before | encode after | change | decode before "
        "| decode after | change |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    missed = []
    for name, values in workloads().items():
        enc_b, enc_a, dec_b, dec_a = compare(before, after, values, args.repeat)
        changes = (enc_a / enc_b - 1, dec_a / dec_b - 1)
        per = 1e6 / len(values)
        print(
            f"| {name} | {len(values):,} | {enc_b * per:.2f} | {enc_a * per:.2f} | "
            f"{changes[0]:+.1%} | {dec_b * per:.2f} | {dec_a * per:.2f} | {changes[1]:+.1%} |"
        )
        if name.startswith("plain") and max(changes) > TARGET:
            missed.append(name)
    own = JSONCodec(types=[Order, Level, Profile])
    values = own_workload()
    encoded = [own.encode(value) for value in values]
    enc = min(timed(_encode_all(own, values)) for _ in range(args.repeat))
    dec = min(timed(_decode_all(own, encoded)) for _ in range(args.repeat))
    per = 1e6 / len(values)
    print(
        f"| own types (after only) | {len(values):,} | | {enc * per:.2f} | | | {dec * per:.2f} | |"
    )
    print()
    if missed:
        print(f"TARGET MISSED (plain values at most {TARGET:.0%} slower): {', '.join(missed)}")
    else:
        print(f"Target met: plain values at most {TARGET:.0%} slower.")


if __name__ == "__main__":
    sys.exit(main())
