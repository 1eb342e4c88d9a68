"""enhance_storage: timeouts and data migrations on MemoryStorage and on a minimal user adapter.

grammY's edge cases (notes 1.10, items 25-31) adapted, plus the places where grammY is wrong:
numeric versions (10.1), newer stored versions, failing migrations and write-back on read.
"""

from __future__ import annotations

import asyncio
import datetime as dtm
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import pytest

from ptb_sessions._errors import ConflictError, MigrationError, SerializationError
from ptb_sessions.storage import (
    RECORD_MARKER,
    MemoryStorage,
    StorageAdapter,
    apply_migrations,
    enhance_storage,
    is_record,
    make_record,
    normalize_ttl,
    parse_record,
    sorted_migrations,
)


class DictAdapter:
    """The 10-line adapter a user writes: read/write/delete only, values by reference."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.calls: list[tuple[str, str]] = []

    async def read(self, key: str) -> Any | None:
        self.calls.append(("read", key))
        return self.data.get(key)

    async def write(self, key: str, value: Any) -> None:
        self.calls.append(("write", key))
        self.data[key] = value

    async def delete(self, key: str) -> None:
        self.calls.append(("delete", key))
        self.data.pop(key, None)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "user"])
def inner(request: pytest.FixtureRequest) -> StorageAdapter:
    """The adapter to enhance: a MemoryStorage or the minimal user adapter."""
    return MemoryStorage() if request.param == "memory" else DictAdapter()


async def raw(storage: StorageAdapter, key: str) -> Any:
    """What ``storage`` holds for ``key``, without remembering a version for this task."""
    if isinstance(storage, DictAdapter):
        return storage.data.get(key)

    async def peek() -> Any:
        return await storage.read(key)

    return await asyncio.create_task(peek())


async def put(storage: StorageAdapter, key: str, value: Any) -> None:
    """Store ``value`` as legacy/hand-made data under ``key``."""
    await storage.write(key, value)


def grammy_migrations() -> dict[float, Callable[[Any], Any]]:
    """The migrations of grammY's tests: {1: +10, 3: *2, 12: **2}."""
    return {1: lambda x: x + 10, 3: lambda x: x * 2, 12: lambda x: x**2}


# --- the record layout -------------------------------------------------------------------------


async def test_no_options_stores_plain_values_and_reads_records(inner: StorageAdapter) -> None:
    storage = enhance_storage(inner)
    await storage.write("k", {"a": 1})
    assert await raw(inner, "k") == {"a": 1}  # nothing added
    assert await storage.read("k") == {"a": 1}
    # a record written with a ttl earlier is still read as its value
    await put(inner, "r", {RECORD_MARKER: 1, "d": [1, 2], "e": 5.0, "v": 3})
    assert await storage.read("r") == [1, 2]


@pytest.mark.parametrize("ttl", [None, 60])
async def test_record_shaped_data_round_trips(inner: StorageAdapter, ttl: float | None) -> None:
    """grammY 25: data that looks like a record is wrapped again, so it reads back unchanged."""
    storage = enhance_storage(inner, ttl=ttl, clock=FakeClock())
    tricky = {RECORD_MARKER: 1, "d": {RECORD_MARKER: 1, "d": 42}}
    await storage.write("k", tricky)
    stored = await raw(inner, "k")
    assert is_record(stored)
    assert stored["d"] == tricky
    assert await storage.read("k") == tricky


async def test_record_layout_with_ttl_and_migrations(inner: StorageAdapter) -> None:
    clock = FakeClock(100.0)
    storage = enhance_storage(inner, ttl=30, migrations={1: str, 2.5: str}, clock=clock)
    await storage.write("k", "x")
    assert await raw(inner, "k") == {RECORD_MARKER: 1, "d": "x", "v": 2.5, "e": 130.0}


def test_is_record_is_strict() -> None:
    assert is_record({RECORD_MARKER: 1, "d": None})
    assert not is_record({RECORD_MARKER: True, "d": 1})  # True == 1, but is no marker
    assert not is_record({RECORD_MARKER: 2, "d": 1})
    assert not is_record({RECORD_MARKER: 1, "d": 1, "extra": 0})
    assert not is_record({RECORD_MARKER: 1})
    assert not is_record([RECORD_MARKER, "d"])
    assert make_record(5, version=None, expires_at=None) == 5
    assert parse_record({"d": 5}) == ({"d": 5}, None, None)  # legacy data
    assert parse_record({RECORD_MARKER: 1, "d": 5, "e": "soon"}) == (5, None, None)


async def test_legacy_data_has_no_version_and_no_expiry(inner: StorageAdapter) -> None:
    await put(inner, "k", 0)  # stored before the enhancement
    clock = FakeClock()
    storage = enhance_storage(inner, ttl=10, migrations=grammy_migrations(), clock=clock)
    clock.now += 1_000_000
    assert await storage.read("k") == 400  # all migrations ran, no expiry
    assert await raw(inner, "k") == 0  # and nothing was written back


# --- timeouts ---------------------------------------------------------------------------------


async def test_ttl_expires_and_a_write_revives(inner: StorageAdapter) -> None:
    """grammY 26."""
    clock = FakeClock()
    storage = enhance_storage(inner, ttl=dtm.timedelta(seconds=10), clock=clock)
    await storage.write("k", 42)
    clock.now += 10
    assert await storage.read("k") == 42  # still there exactly at the expiry time
    clock.now += 0.5
    assert await storage.read("k") is None
    assert await raw(inner, "k") is None  # reading it deleted it
    await storage.write("k", 43)
    clock.now += 5
    assert await storage.read("k") == 43


async def test_ttl_reads_do_not_extend(inner: StorageAdapter) -> None:
    clock = FakeClock()
    storage = enhance_storage(inner, ttl=10, clock=clock)
    await storage.write("k", 1)
    for _ in range(4):
        clock.now += 3
        await storage.read("k")
    assert await storage.read("k") is None  # 12 s after the write


async def test_expired_value_is_not_migrated(inner: StorageAdapter) -> None:
    clock = FakeClock()

    def boom(value: Any) -> Any:
        raise AssertionError("an expired value must not be migrated")

    await put(inner, "k", {RECORD_MARKER: 1, "d": 1, "e": clock.now - 1})
    storage = enhance_storage(inner, ttl=10, migrations={1: boom}, clock=clock)
    assert await storage.read("k") is None
    assert await raw(inner, "k") is None


async def test_expiry_is_not_applied_without_a_ttl(inner: StorageAdapter) -> None:
    """Removing the ttl from the configuration stops expiry of already stored records."""
    await put(inner, "k", {RECORD_MARKER: 1, "d": "kept", "e": 1.0})
    storage = enhance_storage(inner, clock=FakeClock(5000.0))
    assert await storage.read("k") == "kept"


async def test_expiry_delete_is_based_on_the_version_read() -> None:
    """The expired value is deleted with the version just read, and the following write of the
    fresh session (read as absent) goes through."""
    clock = FakeClock()
    memory = MemoryStorage()
    storage = enhance_storage(memory, ttl=10, clock=clock)
    await storage.write("k", 1)
    clock.now += 11
    assert await storage.read("k") is None
    await storage.write("k", 2)
    assert await storage.read("k") == 2


@pytest.mark.parametrize("ttl", [0, -5, dtm.timedelta(seconds=-1)])
def test_bad_ttl(ttl: Any) -> None:
    with pytest.raises(ValueError, match="ttl"):
        enhance_storage(DictAdapter(), ttl=ttl)


# --- migrations -------------------------------------------------------------------------------


def test_empty_migrations_is_a_value_error() -> None:
    """grammY 27."""
    with pytest.raises(ValueError, match="empty"):
        enhance_storage(DictAdapter(), migrations={})


@pytest.mark.parametrize("bad", ["1", True, None, float("nan"), float("inf")])
def test_non_numeric_versions_are_a_value_error(bad: Any) -> None:
    with pytest.raises(ValueError, match="numbers"):
        enhance_storage(DictAdapter(), migrations={bad: str, 2: str})


def test_migration_must_be_callable() -> None:
    with pytest.raises(TypeError, match="callable"):
        enhance_storage(DictAdapter(), migrations={1: "not a function"})  # type: ignore[dict-item]


async def test_absent_values_are_not_migrated(inner: StorageAdapter) -> None:
    """grammY 28."""

    def boom(value: Any) -> Any:
        raise RuntimeError("must not run")

    storage = enhance_storage(inner, migrations={1: boom})
    assert await storage.read("nothing") is None
    await put(inner, "none", {RECORD_MARKER: 1, "d": None})
    assert await storage.read("none") is None


async def test_writes_store_latest_version_and_delete_passes_through(
    inner: StorageAdapter,
) -> None:
    """grammY 29."""
    storage = enhance_storage(inner, migrations={1: str, 7: str, 3: str})
    await storage.write("k", "x")
    assert await raw(inner, "k") == {RECORD_MARKER: 1, "d": "x", "v": 7}
    await storage.delete("k")
    assert await raw(inner, "k") is None
    assert await storage.read("k") is None


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (0, 400),  # legacy data: from the start
        ({RECORD_MARKER: 1, "d": 5}, 900),  # record without version: all run
        ({RECORD_MARKER: 1, "d": 5, "v": 3}, 25),  # from the middle
        ({RECORD_MARKER: 1, "d": 42, "v": 12}, 42),  # up to date
        ({RECORD_MARKER: 1, "d": 5, "v": 8}, 25),  # from a gap
        ({RECORD_MARKER: 1, "d": 5, "v": 1}, 100),  # after the first
        ({RECORD_MARKER: 1, "d": 5, "v": -4}, 900),  # below every version: all run
    ],
)
async def test_migrations_run_from_the_stored_version(
    inner: StorageAdapter, stored: Any, expected: int
) -> None:
    """grammY 30."""
    await put(inner, "k", stored)
    storage = enhance_storage(inner, migrations=grammy_migrations())
    assert await storage.read("k") == expected


ORDERED = [1, 2, 10, 10.1, 11]


def recording_migrations() -> Mapping[float, Callable[[Any], Any]]:
    def step(version: float) -> Callable[[Any], Any]:
        return lambda trail: [*trail, version]

    # deliberately not in order, with 10.1 next to 10
    return {11: step(11), 10.1: step(10.1), 1: step(1), 10: step(10), 2: step(2)}


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        (None, ORDERED),
        (0, ORDERED),
        (1, [2, 10, 10.1, 11]),
        (2, [10, 10.1, 11]),
        (5, [10, 10.1, 11]),
        (10, [10.1, 11]),
        (10.05, [10.1, 11]),
        (10.1, [11]),
        (10.5, [11]),
        (11, []),
    ],
)
async def test_real_number_versions_run_in_numeric_order(
    inner: StorageAdapter, version: float | None, expected: list[float]
) -> None:
    """Unlike grammY's parseInt, 10.1 runs exactly once, after 10 and before 11."""
    record: dict[str, Any] = {RECORD_MARKER: 1, "d": []}
    if version is not None:
        record["v"] = version
    await put(inner, "k", record)
    storage = enhance_storage(inner, migrations=recording_migrations())
    assert await storage.read("k") == expected
    await storage.write("k", await storage.read("k"))
    assert (await raw(inner, "k"))["v"] == 11
    assert await storage.read("k") == expected  # at the latest version now: nothing runs again


async def test_non_integer_versions_on_legacy_data(inner: StorageAdapter) -> None:
    """grammY crashes on {1.5, 4} with legacy data (parseInt gives 1, which is no key)."""
    await put(inner, "k", 2)
    storage = enhance_storage(inner, migrations={1.5: lambda x: x * 3, 4: lambda x: x + 1})
    assert await storage.read("k") == 7


async def test_newer_stored_version_raises(inner: StorageAdapter) -> None:
    stored = {RECORD_MARKER: 1, "d": {"n": 1}, "v": 12}
    await put(inner, "42", stored)
    storage = enhance_storage(inner, migrations={1: str, 11: str})
    with pytest.raises(MigrationError) as info:
        await storage.read("42")
    message = str(info.value)
    assert "'42'" in message
    assert "12" in message
    assert "11" in message
    assert await raw(inner, "42") == stored  # never silently relabelled


@pytest.mark.parametrize("version", ["1", True, float("nan"), [1]])
async def test_invalid_stored_version_raises(inner: StorageAdapter, version: Any) -> None:
    """grammY reruns every migration on a string version; here it is an error."""
    calls: list[int] = []
    stored = {RECORD_MARKER: 1, "d": 0, "v": version}
    if not (isinstance(version, float) and version != version):
        await put(inner, "k", stored)
    else:  # NaN cannot go through the JSON codec; store it by hand
        inner = DictAdapter()
        inner.data["k"] = stored
    storage = enhance_storage(inner, migrations={1: lambda x: calls.append(1) or x})
    with pytest.raises(MigrationError, match="invalid data version"):
        await storage.read("k")
    assert calls == []


async def test_failing_migration_raises_and_leaves_the_store_untouched(
    inner: StorageAdapter,
) -> None:
    def add_field(value: dict[str, Any]) -> dict[str, Any]:
        value["added"] = True  # changes the value in place ...
        return value

    def fail(value: dict[str, Any]) -> dict[str, Any]:
        raise KeyError("size")  # ... and then the next migration fails

    await put(inner, "42", {RECORD_MARKER: 1, "d": {"pizzas": 3}, "v": 1})
    writes_before = [c for c in getattr(inner, "calls", []) if c[0] == "write"]
    storage = enhance_storage(inner, migrations={1: str, 2: add_field, 2.5: fail, 3: str})
    with pytest.raises(MigrationError) as info:
        await storage.read("42")
    message = str(info.value)
    assert "'42'" in message
    assert "2.5" in message
    assert isinstance(info.value.__cause__, KeyError)
    # not even the in-place change of the successful migration leaked into the store
    assert await raw(inner, "42") == {RECORD_MARKER: 1, "d": {"pizzas": 3}, "v": 1}
    assert [c for c in getattr(inner, "calls", []) if c[0] == "write"] == writes_before


async def test_reading_never_writes_back(inner: StorageAdapter) -> None:
    await put(inner, "k", 0)
    storage = enhance_storage(inner, ttl=100, migrations=grammy_migrations(), clock=FakeClock())
    assert await storage.read("k") == 400
    assert await storage.read("k") == 400
    assert await raw(inner, "k") == 0


async def test_ttl_and_migrations_combined(inner: StorageAdapter) -> None:
    """grammY 31: legacy 0 reads as 400, expires after a write, a rewrite gives 42."""
    clock = FakeClock()
    storage = enhance_storage(inner, ttl=10, migrations=grammy_migrations(), clock=clock)
    await put(inner, "k", 0)
    value = await storage.read("k")
    assert value == 400
    await storage.write("k", value)
    assert await raw(inner, "k") == {RECORD_MARKER: 1, "d": 400, "v": 12, "e": clock.now + 10}
    clock.now += 11
    assert await storage.read("k") is None
    await storage.write("k", 42)
    assert await storage.read("k") == 42


# --- the reusable helpers ---------------------------------------------------------------------


def test_helpers() -> None:
    assert normalize_ttl(None) is None
    assert normalize_ttl(dtm.timedelta(minutes=2)) == 120.0
    assert normalize_ttl(1) == 1.0
    assert normalize_ttl(float("inf")) is None
    with pytest.raises(TypeError):
        normalize_ttl(True)
    ordered = sorted_migrations(recording_migrations())
    assert [version for version, _ in ordered] == ORDERED
    assert apply_migrations(None, 3, ordered, key="k") == (None, 11)
    assert apply_migrations([], 10, ordered, key="k") == ([10.1, 11], 11)
    with pytest.raises(MigrationError, match="'k'"):
        apply_migrations([], 11.5, ordered, key="k")


def test_apply_migrations_does_not_change_the_value_it_was_given() -> None:
    value = {"n": 1}

    def bump(v: dict[str, int]) -> dict[str, int]:
        v["n"] += 1
        return v

    migrated, _ = apply_migrations(value, None, sorted_migrations({1: bump}), key="k")
    assert migrated == {"n": 2}
    assert value == {"n": 1}


# --- native support, optional methods, errors through the wrapper -----------------------------


class NativeAdapter(DictAdapter):
    def __init__(self) -> None:
        super().__init__()
        self.enhanced_with: dict[str, Any] | None = None
        self.result = DictAdapter()

    def _ptb_sessions_enhance(
        self,
        *,
        ttl: float | None,
        migrations: Mapping[float, Callable[[Any], Any]] | None,
        clock: Callable[[], float],
    ) -> StorageAdapter:
        self.enhanced_with = {"ttl": ttl, "migrations": migrations, "clock": clock}
        return self.result


async def test_native_support_is_used() -> None:
    adapter = NativeAdapter()
    clock = FakeClock()
    migrations = {2: str, 1: repr}
    enhanced = enhance_storage(
        adapter, ttl=dtm.timedelta(hours=1), migrations=migrations, clock=clock
    )
    assert enhanced is adapter.result
    assert adapter.enhanced_with is not None
    assert adapter.enhanced_with["ttl"] == 3600.0
    assert list(adapter.enhanced_with["migrations"].items()) == [(1, repr), (2, str)]
    assert adapter.enhanced_with["clock"] is clock
    await enhanced.write("k", 1)
    assert adapter.data == {}  # nothing went through a wrapper


def test_native_support_gets_validated_arguments() -> None:
    adapter = NativeAdapter()
    with pytest.raises(ValueError, match="empty"):
        enhance_storage(adapter, migrations={})
    with pytest.raises(ValueError, match="ttl"):
        enhance_storage(adapter, ttl=0)
    assert adapter.enhanced_with is None


async def test_optional_methods_follow_the_inner_adapter() -> None:
    plain = enhance_storage(DictAdapter(), ttl=5)
    for name in ("has", "keys", "items", "lock"):
        assert not hasattr(plain, name), name
    assert isinstance(plain, StorageAdapter)
    enhanced = enhance_storage(MemoryStorage(), ttl=5)
    for name in ("has", "keys", "items"):
        assert hasattr(enhanced, name), name
    assert not hasattr(enhanced, "lock")


async def test_lock_is_forwarded() -> None:
    events: list[str] = []

    class LockingAdapter(DictAdapter):
        @asynccontextmanager
        async def lock(self, key: str) -> AsyncIterator[None]:
            events.append(f"lock {key}")
            yield
            events.append(f"unlock {key}")

    enhanced: Any = enhance_storage(LockingAdapter(), migrations={1: str})
    async with enhanced.lock("42"):
        events.append("inside")
    assert events == ["lock 42", "inside", "unlock 42"]


@pytest.mark.parametrize("with_ttl", [False, True])
async def test_has_keys_items_skip_expired_and_migrate(with_ttl: bool) -> None:
    clock = FakeClock()
    memory = MemoryStorage(clock=clock)
    await memory.write("legacy", 1)
    storage: Any = enhance_storage(
        memory, ttl=10 if with_ttl else None, migrations={1: lambda x: x * 100}, clock=clock
    )
    await storage.write("old", 2)
    clock.now += 6
    await storage.write("new", 3)
    clock.now += 6  # "old" expired (with a ttl), "new" did not
    live = ["legacy", "new"] if with_ttl else ["legacy", "old", "new"]
    assert [k async for k in aiter(storage.keys())] == live
    items = [item async for item in storage.items()]
    expected = {"legacy": 100, "old": 2, "new": 3}
    assert items == [(k, expected[k]) for k in live]
    assert await storage.has("old") is (not with_ttl)
    assert await storage.has("new")
    assert not await storage.has("missing")
    # iteration skipped the expired value without deleting it; reading deletes it
    assert await memory.has("old")
    if with_ttl:
        assert await storage.read("old") is None
        assert not await memory.has("old")


async def test_keys_with_ttl_on_an_adapter_without_items() -> None:
    clock = FakeClock()

    class KeysAdapter(DictAdapter):
        async def keys(self) -> AsyncIterator[str]:
            for key in list(self.data):
                yield key

    inner = KeysAdapter()
    storage: Any = enhance_storage(inner, ttl=10, clock=clock)
    await storage.write("a", 1)
    clock.now += 11
    await storage.write("b", 2)
    assert [k async for k in aiter(storage.keys())] == ["b"]
    assert not hasattr(storage, "items")


async def test_serialization_error_names_the_key_not_the_record() -> None:
    storage = enhance_storage(MemoryStorage(), ttl=60, migrations={1: str})
    with pytest.raises(SerializationError) as info:
        await storage.write("42", {"cart": [1, 2, threading.Lock()]})
    assert str(info.value).startswith("session['42']['cart'][2]: ")


async def test_conflicts_pass_through_the_wrapper() -> None:
    memory = MemoryStorage()
    storage = enhance_storage(memory, ttl=60, migrations={1: lambda x: x})
    await storage.write("k", {"n": 1})
    mine = await storage.read("k")

    async def other() -> None:
        theirs = await storage.read("k")
        theirs["n"] = 5
        await storage.write("k", theirs)

    await asyncio.create_task(other())
    mine["n"] = 2
    with pytest.raises(ConflictError, match="'k'"):
        await storage.write("k", mine)
    assert await storage.read("k") == {"n": 5}


async def test_expired_read_retries_when_the_value_was_rewritten_meanwhile() -> None:
    """If the expired value is rewritten between the read and its delete, the delete conflicts
    and the new value is read instead of being deleted."""
    clock = FakeClock()
    rewritten = False

    class RacyMemory(MemoryStorage):
        """Another task rewrites the key right after the first read."""

        async def read(self, key: str) -> Any | None:
            nonlocal rewritten
            value = await super().read(key)
            if not rewritten:
                rewritten = True
                fresh = enhance_storage(self, ttl=10, clock=clock)
                await asyncio.create_task(fresh.write(key, "fresh"))
            return value

    memory = RacyMemory()
    await enhance_storage(memory, ttl=10, clock=clock).write("k", "old")
    clock.now += 11  # "old" expired; another task rewrites it right after it is read
    storage = enhance_storage(memory, ttl=10, clock=clock)
    assert await storage.read("k") == "fresh"
    assert await storage.read("k") == "fresh"
