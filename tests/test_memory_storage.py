"""MemoryStorage: copies, ttl with a fake clock, iteration, versions and conflicts."""

from __future__ import annotations

import asyncio
import datetime as dtm
import gc
import threading
from typing import Any

import pytest

from ptb_sessions._errors import ConflictError, SerializationError
from ptb_sessions.storage import MemoryStorage, ReadVersions, StorageAdapter


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def collect_keys(storage: MemoryStorage) -> list[str]:
    return [key async for key in aiter(storage.keys())]


async def collect_items(storage: MemoryStorage) -> list[tuple[str, Any]]:
    return [item async for item in storage.items()]


async def test_is_a_storage_adapter() -> None:
    assert isinstance(MemoryStorage(), StorageAdapter)


def test_an_empty_storage_is_still_truthy() -> None:
    storage = MemoryStorage()
    assert len(storage) == 0
    assert (storage or None) is storage


async def test_read_write_delete() -> None:
    storage = MemoryStorage()
    assert await storage.read("42") is None
    await storage.write("42", {"pizzas": 1})
    assert await storage.read("42") == {"pizzas": 1}
    await storage.write("42", 0)
    assert await storage.read("42") == 0
    await storage.delete("42")
    assert await storage.read("42") is None
    await storage.delete("42")  # deleting nothing is fine
    assert len(storage) == 0


async def test_stores_copies() -> None:
    storage = MemoryStorage()
    value = {"cart": ["a"], "n": 1}
    await storage.write("k", value)
    value["cart"].append("b")
    value["n"] = 2
    first = await storage.read("k")
    assert first == {"cart": ["a"], "n": 1}
    first["cart"].append("c")
    second = await storage.read("k")
    assert second == {"cart": ["a"], "n": 1}
    assert second is not first


async def test_round_trips_json_codec_types() -> None:
    storage = MemoryStorage()
    value = {
        1: "int key",
        "1": "str key",
        "t": (1, 2),
        "s": {3},
        "when": dtm.datetime(2024, 5, 1, 12, tzinfo=dtm.timezone.utc),
    }
    await storage.write("k", value)
    assert await storage.read("k") == value


async def test_unserializable_value_raises_naming_the_key_and_keeps_old_value() -> None:
    storage = MemoryStorage()
    await storage.write("42", {"cart": [1]})
    with pytest.raises(SerializationError) as info:
        await storage.write("42", {"cart": [1, 2, threading.Lock()]})
    assert str(info.value).startswith("session['42']['cart'][2]: ")
    assert info.value.root == "session['42']"
    assert await storage.read("42") == {"cart": [1]}


async def test_custom_codec() -> None:
    from ptb_sessions._codec import PickleCodec

    storage = MemoryStorage(codec=PickleCodec())
    await storage.write("k", {"x": 1})
    assert await storage.read("k") == {"x": 1}


async def test_ttl_expires_strictly_after_the_period() -> None:
    clock = FakeClock()
    storage = MemoryStorage(ttl=10, clock=clock)
    await storage.write("k", 1)
    clock.now += 10
    assert await storage.has("k")  # exactly at written_at + ttl: still there
    clock.now += 0.001
    assert await storage.read("k") is None
    assert len(storage) == 0
    clock.now -= 5  # deleted for good, not just hidden
    assert await storage.read("k") is None


async def test_ttl_is_idle_time_reads_and_writes_restart_it() -> None:
    """SPEC 4: a value read every 8 s under a ttl of 10 s never expires; a read refreshes the
    expiry only once a tenth of the ttl has passed; a value left alone expires."""
    clock = FakeClock()
    storage = MemoryStorage(ttl=dtm.timedelta(seconds=10), clock=clock)
    assert storage.ttl == 10.0
    await storage.write("k", 1)
    for _ in range(5):
        clock.now += 8
        assert await storage.read("k") == 1
    clock.now += 0.5  # under a tenth of the ttl: this read does not move the expiry
    assert await storage.read("k") == 1
    clock.now += 9.6  # 10.1 s after the last refresh
    assert await storage.read("k") is None
    await storage.write("k", 2)  # writing again revives it
    clock.now += 9
    await storage.write("k", 3)
    clock.now += 9  # 18 s after the first rewrite, 9 s after the last
    assert await storage.read("k") == 3


@pytest.mark.parametrize("ttl", [0, -1, dtm.timedelta(0), float("nan")])
def test_bad_ttl_is_a_value_error(ttl: Any) -> None:
    with pytest.raises(ValueError, match="ttl"):
        MemoryStorage(ttl=ttl)


def test_non_numeric_ttl_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="ttl"):
        MemoryStorage(ttl="10")  # type: ignore[arg-type]


async def test_has_keys_items_len() -> None:
    storage = MemoryStorage()
    for key, value in (("a", 42), ("b", 43), ("c", 44)):
        await storage.write(key, value)
    assert await storage.has("b")
    assert not await storage.has("z")
    assert await collect_keys(storage) == ["a", "b", "c"]
    assert await collect_items(storage) == [("a", 42), ("b", 43), ("c", 44)]
    assert len(storage) == 3
    items = await collect_items(storage)
    items[0] = ("a", 0)
    assert (await collect_items(storage))[0] == ("a", 42)


async def test_iteration_tolerates_changes_while_iterating() -> None:
    storage = MemoryStorage()
    for key in "abc":
        await storage.write(key, key)
    seen = []
    async for key, value in storage.items():
        seen.append((key, value))
        await storage.delete("b")
        await storage.write("d", "d")
    assert seen == [("a", "a"), ("c", "c")]


async def test_iteration_skips_and_deletes_expired() -> None:
    clock = FakeClock()
    storage = MemoryStorage(ttl=10, clock=clock)
    await storage.write("old", 1)
    clock.now += 6
    await storage.write("new", 2)
    clock.now += 6  # "old" is 12 s old, "new" 6 s
    assert not await storage.has("old")
    assert await storage.has("new")
    assert await collect_keys(storage) == ["new"]
    assert await collect_items(storage) == [("new", 2)]
    assert len(storage) == 1
    clock.now -= 100  # the expired entry is gone, not merely hidden
    assert await collect_keys(storage) == ["new"]


async def test_len_counts_only_live_values() -> None:
    clock = FakeClock()
    storage = MemoryStorage(ttl=5, clock=clock)
    await storage.write("a", 1)
    await storage.write("b", 1)
    assert len(storage) == 2
    clock.now += 6
    assert len(storage) == 0


async def test_write_without_read_is_unconditional() -> None:
    storage = MemoryStorage()
    await storage.write("k", 1)
    await storage.write("k", 2)  # never read: no version to check
    assert await storage.read("k") == 2


async def test_read_then_write_succeeds_and_forgets_the_version() -> None:
    storage = MemoryStorage()
    await storage.write("k", 1)
    assert await storage.read("k") == 1
    await storage.write("k", 2)
    await storage.write("k", 3)  # the write forgot the version read: unconditional again
    assert await storage.read("k") == 3


async def other_writer(coro: Any) -> None:
    """Run ``coro`` in another task, i.e. as another reader/writer."""
    await asyncio.create_task(coro)


async def test_stale_write_raises_conflict_and_overwrites_nothing() -> None:
    storage = MemoryStorage()
    await storage.write("42", {"n": 1})
    mine = await storage.read("42")

    async def concurrent_update() -> None:
        value = await storage.read("42")
        value["n"] += 10
        await storage.write("42", value)

    await other_writer(concurrent_update())
    mine["n"] += 1
    with pytest.raises(ConflictError) as info:
        await storage.write("42", mine)
    assert "'42'" in str(info.value)
    assert "another writer" in str(info.value)
    assert await storage.read("42") == {"n": 11}


async def test_conflict_forgets_the_stale_version() -> None:
    storage = MemoryStorage()
    await storage.write("k", 1)
    await storage.read("k")
    await other_writer(storage.write("k", 2))
    with pytest.raises(ConflictError):
        await storage.write("k", 3)
    assert await storage.read("k") == 2  # read again ...
    await storage.write("k", 3)  # ... and the write goes through
    assert await storage.read("k") == 3


async def test_insert_after_reading_nothing_conflicts_with_a_concurrent_insert() -> None:
    storage = MemoryStorage()
    assert await storage.read("k") is None
    await other_writer(storage.write("k", "theirs"))
    with pytest.raises(ConflictError):
        await storage.write("k", "mine")
    assert await storage.read("k") == "theirs"


async def test_stale_delete_raises_conflict_and_deletes_nothing() -> None:
    storage = MemoryStorage()
    await storage.write("k", 1)
    await storage.read("k")
    await other_writer(storage.write("k", 2))
    with pytest.raises(ConflictError, match="'k'"):
        await storage.delete("k")
    assert await storage.read("k") == 2


async def test_delete_and_rewrite_between_read_and_write_is_detected() -> None:
    storage = MemoryStorage()
    await storage.write("k", 1)
    await storage.read("k")

    async def delete_and_rewrite() -> None:
        await storage.delete("k")
        await storage.write("k", 1)  # same value, but a new version

    await other_writer(delete_and_rewrite())
    with pytest.raises(ConflictError):
        await storage.write("k", 5)
    assert await storage.read("k") == 1


async def test_delete_of_a_key_read_as_absent_and_still_absent() -> None:
    storage = MemoryStorage()
    assert await storage.read("k") is None
    await storage.delete("k")
    assert await storage.read("k") is None


async def test_concurrent_read_write_cycles_lose_no_update_silently() -> None:
    """grammY's lost update: three tasks each do n += 1. With versions, every write either
    lands or raises ConflictError; none is silently lost."""
    storage = MemoryStorage()
    await storage.write("n", 0)
    results: list[str] = []

    async def increment() -> None:
        value = await storage.read("n")
        await asyncio.sleep(0)  # let the others read the same version
        try:
            await storage.write("n", value + 1)
            results.append("ok")
        except ConflictError:
            results.append("conflict")

    await asyncio.gather(*(increment() for _ in range(3)))
    assert results.count("ok") == 1
    assert results.count("conflict") == 2
    assert await storage.read("n") == 1


async def test_expired_since_read_still_writes() -> None:
    clock = FakeClock()
    storage = MemoryStorage(ttl=10, clock=clock)
    await storage.write("k", 1)
    assert await storage.read("k") == 1
    clock.now += 20  # the value expired while the handler ran
    await storage.write("k", 2)
    assert await storage.read("k") == 2


async def test_expired_read_deletes_and_allows_a_fresh_write() -> None:
    clock = FakeClock()
    storage = MemoryStorage(ttl=10, clock=clock)
    await storage.write("k", 1)
    clock.now += 11
    assert await storage.read("k") is None
    await storage.write("k", 2)
    assert await storage.read("k") == 2


async def test_read_versions_are_bounded_and_per_task() -> None:
    versions: ReadVersions[int] = ReadVersions(maxsize=2)
    versions.remember("a", 1)
    versions.remember("b", 2)
    versions.remember("a", 3)  # "a" is now the most recent
    versions.remember("c", None)
    assert len(versions) == 2
    assert versions.pop("b") == (False, None)  # the least recently read was dropped
    assert versions.pop("a") == (True, 3)
    assert versions.pop("c") == (True, None)
    assert versions.pop("c") == (False, None)

    versions.remember("k", 7)

    async def other_task() -> tuple[bool, int | None]:
        return versions.pop("k")

    assert await asyncio.create_task(other_task()) == (False, None)
    assert "k" in versions
    with pytest.raises(ValueError, match="maxsize"):
        ReadVersions(0)


async def test_read_versions_of_finished_tasks_are_freed() -> None:
    storage = MemoryStorage()

    async def reader(i: int) -> None:
        await storage.read(str(i))

    for i in range(100):
        await asyncio.create_task(reader(i))
    await asyncio.sleep(0)
    gc.collect()
    assert len(storage._read_versions._by_task) == 0
