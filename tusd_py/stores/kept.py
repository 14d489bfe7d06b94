"""What a store instance keeps of an upload between two requests, and when it may use
it instead of reading the upload back from storage.

At the end of every call under the upload's lock, an upload handle leaves its state
here: exactly what reading the upload back would give at that moment, since this
instance wrote everything since it last read. The next request of the upload takes the
state back only when its lock says that the hold this state was left by is the one it
directly follows (``LockGeneration.follows``): nobody else, on any instance, held the
lock in between, so nobody else wrote. In every other case (a locker that cannot
vouch, a hold in between, a lease taken over, a record that expired, a call that ended
in an error or was cancelled) the store reads storage, as without this cache. A look
without the lock (no generation) neither takes nor drops what is kept.

S3 store (``s3``): the state is ``.info`` as written, the fields and the layout of the
stored bytes (invariant 6 of ``s3`` still holds: the state in S3 is complete; this is
only a shortcut to it). A stale writer (invariant 7) is an instance that lost its lock
and writes on: whoever took the lock over follows no clean release, so it read S3
itself. What the stale writer stores afterwards can only lower the offset that S3
lists below the one kept here, never change a counted byte; the kept layout's tail
segments are also in the tail cache, so a part built from them carries the client's
bytes either way, and a segment that went missing from S3 fails the read
(``StoreError``), which drops the kept state.

File store (``file``): the state is the parsed ``.info`` with the offset (the data
file's size) and which data file it is: a HEAD or PATCH that follows this instance's
own last hold needs no thread hand-off to stat the files.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, TypeVar

from tusd_py.lockers.base import LockGeneration

KEPT_UPLOADS = 10_000
"""Uploads whose state one store instance keeps: about 1 KB each (S3: plus about
0.2 KB per part listed; tail bytes are in the tail cache, bounded on their own)."""

State = TypeVar("State")


@dataclass(frozen=True, slots=True)
class _Kept(Generic[State]):
    token: str
    """The lock hold that left this state."""
    state: State


class KeptStates(Generic[State]):
    """Per upload id: the state the last hold of this instance left, by hold token;
    bounded, least recently used first out."""

    def __init__(self, capacity: int = KEPT_UPLOADS) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[str, _Kept[State]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, upload_id: str, generation: LockGeneration | None) -> State | None:
        """The kept state of ``upload_id`` if ``generation`` directly follows the hold
        that left it, else None. A hold removes the entry either way (it leaves its
        own state, ``keep``, or none); a read without a generation (the pre-access
        hook's look before the lock, a sweep) leaves it for the hold that follows,
        since it writes nothing (a write under no generation ends in ``keep``, which
        drops the entry)."""
        if generation is None:
            return None
        kept = self._entries.pop(upload_id, None)
        if kept is None or generation.follows is None:
            return None
        return kept.state if kept.token == generation.follows else None

    def keep(self, upload_id: str, generation: LockGeneration | None, state: State) -> None:
        """Leave ``state`` as the state hold ``generation`` ends with (nothing is kept
        without a generation: no later hold could be shown to follow it)."""
        if generation is None:
            self._entries.pop(upload_id, None)
            return
        self._entries[upload_id] = _Kept(generation.token, state)
        self._entries.move_to_end(upload_id)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def keeping(self, upload_id: str, keep: Callable[[], None]) -> _Keeping:
        """Around a call under the lock: ``keep`` the state it ends with (the caller's
        ``keep`` calls ``KeptStates.keep``), drop what was kept when it fails."""
        return _Keeping(self, upload_id, keep)

    def forget(self, upload_id: str) -> None:
        """Drop the kept state (the stored bytes are unknown, or the upload is gone)."""
        self._entries.pop(upload_id, None)


class _Keeping:
    """``KeptStates.keeping``: a plain class, not a generator-based context manager
    (one per store call of every request)."""

    __slots__ = ("_states", "_upload_id", "_keep")

    def __init__(self, states: KeptStates[Any], upload_id: str, keep: Callable[[], None]) -> None:
        self._states = states
        self._upload_id = upload_id
        self._keep = keep

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if exc_type is None:
            self._keep()
        else:
            self._states.forget(self._upload_id)
