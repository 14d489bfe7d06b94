"""The pre-access hook's memory: which (upload, access mode, credentials) it allowed
recently, so that a client sending many chunks does not wait for the hook receiver on
every PATCH.

An entry is keyed by the upload id, the mode (read or write) and a SHA-256 digest of
the values of the credential headers (``hooks.credential_headers``: Authorization and
Cookie by default), so another client (other credentials, or none) never shares it.
Only "allow" is remembered, for ``hooks.access_cache_ttl`` seconds; a rejection is
asked again next time. ``forget`` drops an upload's entries (it was deleted or
completed). What this trades: within the TTL a revoked credential or a changed rule
still reaches the upload, and the receiver is not told about those requests.

Each server process has its own cache (``server.workers`` processes ask once each).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from typing import Final

MAX_CACHED_UPLOADS: Final = 100_000
"""Uploads with cached answers; beyond it the upload cached longest ago is dropped
(it is asked again), so a flood of distinct uploads cannot grow memory without bound."""
MAX_ENTRIES_PER_UPLOAD: Final = 64
"""Answers cached for one upload (modes x distinct credentials); beyond it the oldest
goes: many clients sharing one upload is unusual, and each is only asked again."""


class AccessCache:
    """Recent pre-access "allow" answers (see the module docstring)."""

    def __init__(
        self,
        ttl: float,
        credential_headers: Iterable[str],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``ttl``: seconds an answer is reused (0: never); ``clock`` (monotonic
        seconds) is injectable so expiry can be tested without sleeping."""
        self._ttl = ttl
        self._credential_headers = frozenset(name.lower() for name in credential_headers)
        self._clock = clock
        # upload id -> {(mode, credential digest): monotonic time the answer expires}
        self._entries: dict[str, dict[tuple[str, bytes], float]] = {}

    def credentials_digest(self, headers: Iterable[tuple[str, str]]) -> bytes:
        """A digest of the credential headers' names and values, in arrival order
        (a request without any of them has its own digest)."""
        digest = hashlib.sha256()
        for name, value in headers:
            if name in self._credential_headers:
                digest.update(f"{name}\0{value}\0".encode("latin-1", "replace"))
        return digest.digest()

    def allowed(self, upload_id: str, mode: str, credentials: bytes) -> bool:
        """True when an allow for this upload, mode and credentials has not expired."""
        entries = self._entries.get(upload_id)
        if entries is None:
            return False
        expires = entries.get((mode, credentials))
        if expires is None:
            return False
        if expires <= self._clock():
            del entries[(mode, credentials)]
            if not entries:
                del self._entries[upload_id]
            return False
        return True

    def remember(self, upload_id: str, mode: str, credentials: bytes) -> None:
        """Cache an allow for ``ttl`` seconds (nothing when ``ttl`` is 0)."""
        if self._ttl <= 0:
            return
        entries = self._entries.get(upload_id)
        if entries is None:
            if len(self._entries) >= MAX_CACHED_UPLOADS:
                del self._entries[next(iter(self._entries))]
            entries = self._entries[upload_id] = {}
        elif len(entries) >= MAX_ENTRIES_PER_UPLOAD:
            del entries[next(iter(entries))]
        entries.pop((mode, credentials), None)  # re-inserted last: the newest
        entries[(mode, credentials)] = self._clock() + self._ttl

    def forget(self, upload_id: str) -> None:
        """Drop every cached answer for ``upload_id``."""
        self._entries.pop(upload_id, None)

    def __len__(self) -> int:
        """Cached answers (for tests and diagnostics)."""
        return sum(len(entries) for entries in self._entries.values())
