"""What the persistence knows about each key it tracks: one named state per key, and how many
running updates use it. Knows nothing of SQL or of PTB."""

from __future__ import annotations

import asyncio
import enum
import itertools
from collections.abc import Hashable
from typing import Any, Final, Generic, TypeVar, cast

from ptb_sessions._errors import StorageError
from ptb_sessions._store import ANY_VERSION

__all__ = ["NOTHING", "KeyState", "KeyTracker", "TrackedKey", "UpdateHolds"]

K = TypeVar("K", bound=Hashable)

#: :attr:`TrackedKey.held` when the persistence holds no object of PTB's for the key.
NOTHING: Final[Any] = object()


class KeyState(enum.Enum):
    """The state of one tracked key."""

    #: Never read in this process (or forgotten since). Lazy: read before any write, and merge.
    UNLOADED = "unloaded"
    #: Read or written: :attr:`TrackedKey.version` and :attr:`TrackedKey.digest` are the row's.
    LOADED = "loaded"
    #: The load failed; never written until a load succeeds.
    FAILED = "failed"
    #: A conflict dropped our write; read again at the next use.
    STALE = "stale"


class TrackedKey:
    """One key's state, and the number of running updates that use it.

    Attributes:
        state: The :class:`KeyState`.
        version: With :attr:`~KeyState.LOADED`, the version the next write expects: the row's,
            :obj:`None` for no row, or :data:`~ptb_sessions._store.ANY_VERSION` to write
            whatever is stored (PTB replaced the data under this key).
        digest: With :attr:`~KeyState.LOADED`, the hash of the stored encoding, :obj:`None` if
            unknown or nothing is stored.
        held: The very object PTB holds for this key (identity tells a reload from an object
            PTB replaced), or :data:`NOTHING`.
        needs_writeback: Write even if unchanged (migrated on load, or old data under a ttl).
        expires_at: The expiry last written or touched, :obj:`None` without a ttl.
        in_use: How many running updates use the key; a key in use is never evicted.
    """

    __slots__ = ("digest", "expires_at", "held", "in_use", "needs_writeback", "state", "version")

    def __init__(
        self,
        state: KeyState = KeyState.UNLOADED,
        version: int | None = None,
        digest: int | None = None,
        held: Any = NOTHING,
        needs_writeback: bool = False,
        expires_at: float | None = None,
    ) -> None:
        self.state = state
        self.version = version
        self.digest = digest
        self.held = held
        self.needs_writeback = needs_writeback
        self.expires_at = expires_at
        self.in_use = 0

    def __repr__(self) -> str:
        return (
            f"TrackedKey({self.state.name}, version={self.version}, digest={self.digest}, "
            f"in_use={self.in_use})"
        )

    def reset(self) -> None:
        """Back to :attr:`~KeyState.UNLOADED`, keeping :attr:`in_use`."""
        self.state = KeyState.UNLOADED
        self.version = self.digest = self.expires_at = None
        self.held = NOTHING
        self.needs_writeback = False

    def is_unchanged(self, digest: int) -> bool:
        """Whether a value encoding to ``digest`` needs no write."""
        return self.state is KeyState.LOADED and self.digest == digest and not self.needs_writeback


class KeyTracker(Generic[K]):
    """The tracked keys of one namespace, in least recently used order.

    Each transition is one method. A key with no entry is :attr:`~KeyState.UNLOADED`.

    Args:
        namespace: The namespace, for error messages.
    """

    __slots__ = ("_keys", "loading", "namespace")

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._keys: dict[K, TrackedKey] = {}
        #: Loads under way, so concurrent refreshes of one key read it once.
        self.loading: dict[K, asyncio.Future[None]] = {}

    def get(self, key: K) -> TrackedKey | None:
        """The entry of ``key``, if tracked."""
        return self._keys.get(key)

    def state(self, key: K) -> KeyState:
        """The state of ``key``."""
        entry = self._keys.get(key)
        return KeyState.UNLOADED if entry is None else entry.state

    def _entry(self, key: K) -> TrackedKey:
        entry = self._keys.get(key)
        if entry is None:
            entry = self._keys[key] = TrackedKey()
        return entry

    def loaded(
        self,
        key: K,
        version: int | None,
        digest: int | None,
        *,
        held: Any = NOTHING,
        needs_writeback: bool = False,
        expires_at: float | None = None,
    ) -> TrackedKey:
        """``key`` was read (``version`` :obj:`None`: there is no row) or PTB's object adopted."""
        entry = self._keys.get(key)
        if entry is None:  # the common case at start: one object made with its values
            entry = self._keys[key] = TrackedKey(
                KeyState.LOADED, version, digest, held, needs_writeback, expires_at
            )
            return entry
        entry.state = KeyState.LOADED
        entry.version = version
        entry.digest = digest
        entry.held = held
        entry.needs_writeback = needs_writeback
        entry.expires_at = expires_at
        return entry

    def written(
        self, key: K, version: int | None, digest: int | None, expires_at: float | None
    ) -> None:
        """Our write of ``key`` committed: the row is now at ``version``."""
        entry = self._entry(key)
        entry.state = KeyState.LOADED
        entry.version = version
        entry.digest = digest
        entry.needs_writeback = False
        entry.expires_at = expires_at

    def touched(self, key: K, expires_at: float | None) -> None:
        """The expiry of ``key`` was refreshed without a write."""
        entry = self._keys.get(key)
        if entry is not None:
            entry.expires_at = expires_at

    def replaced(self, key: K, held: Any) -> None:
        """PTB holds a new object under ``key`` (the old one was dropped or moved away): write
        it whatever is stored, never bring the stored row back."""
        self.loaded(key, ANY_VERSION, None, held=held)

    def failed(self, key: K) -> None:
        """The load of ``key`` failed: it is never written until a load succeeds."""
        entry = self._entry(key)
        entry.state = KeyState.FAILED
        entry.held = NOTHING

    def stale(self, key: K) -> None:
        """A conflict dropped our write of ``key``: read it again at its next use."""
        entry = self._entry(key)
        entry.state = KeyState.STALE
        entry.version = entry.digest = None
        entry.held = NOTHING

    def forget(self, key: K) -> None:
        """``key`` was deleted, evicted or moved away: back to :attr:`~KeyState.UNLOADED`."""
        entry = self._keys.get(key)
        if entry is None:
            return
        if entry.in_use:
            entry.reset()
        else:
            del self._keys[key]

    def check_writable(self, key: K) -> TrackedKey | None:
        """Raise :class:`~ptb_sessions.StorageError` if ``key`` must not be written; else
        return its entry, if tracked."""
        entry = self._keys.get(key)
        if entry is not None and entry.state is KeyState.FAILED:
            raise StorageError(
                f"{self.namespace}[{key!r}] is not written: its stored row could not be loaded "
                "(see the earlier error), and writing would replace it"
            )
        return entry

    def used(self, key: K) -> None:
        """``key`` was used now (least recently used order)."""
        entry = self._keys.pop(key, None)
        if entry is not None:
            self._keys[key] = entry

    def acquire(self, key: K) -> None:
        """A running update uses ``key``."""
        self._entry(key).in_use += 1

    def release(self, key: K) -> None:
        """A running update no longer uses ``key``."""
        entry = self._keys.get(key)
        if entry is None:
            return
        entry.in_use = max(0, entry.in_use - 1)
        if not entry.in_use and entry.state is KeyState.UNLOADED:
            del self._keys[key]

    def least_recently_used(self, limit: int | None = None) -> list[tuple[K, TrackedKey]]:
        """The tracked keys (at most ``limit``), least recently used first."""
        items = self._keys.items()
        return list(items if limit is None else itertools.islice(items, limit))

    def may_evict(self, key: K, entry: TrackedKey) -> bool:
        """Whether ``key`` is loaded and neither in use nor being loaded."""
        return entry.state is KeyState.LOADED and not entry.in_use and key not in self.loading


class UpdateHolds:
    """Which keys the running updates use, so that they are never evicted under them.

    PTB calls ``refresh_*_data`` once per update (and per job), in the task that runs it. A key
    is held from that refresh until the task ends (each concurrent update and each job runs in
    its own task), or until the same task refreshes the same kind of data again (a task that
    runs updates one after the other, as PTB's update fetcher without ``concurrent_updates``:
    the earlier update has ended). A key held ``also`` joins the keys the task holds instead.
    """

    __slots__ = ("_by_task",)

    def __init__(self) -> None:
        self._by_task: dict[asyncio.Task[Any], dict[KeyTracker[Any], list[Hashable]]] = {}

    def hold(self, tracker: KeyTracker[K], key: K, *, also: bool = False) -> None:
        """The current task's update uses ``key`` of ``tracker``; with ``also``, besides the
        keys of ``tracker`` it already holds (else in their place)."""
        task = asyncio.current_task()
        if task is None:
            return
        held = self._by_task.get(task)
        if held is None:
            held = self._by_task[task] = {}
            task.add_done_callback(self._task_done)
        keys = cast("list[K] | None", held.get(tracker))
        if keys is not None and key in keys:
            if not also and len(keys) > 1:
                for other in keys:
                    if other != key:
                        tracker.release(other)
                held[tracker] = [key]
            return
        if keys is not None and also:
            keys.append(key)
        else:
            for previous in keys or ():
                tracker.release(previous)
            held[tracker] = [key]
        tracker.acquire(key)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        for tracker, keys in self._by_task.pop(task, {}).items():
            for key in keys:
                tracker.release(key)
