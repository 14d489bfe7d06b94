"""The one timer of a connection: it times whichever idle phase the connection is
in (see ``protocol.py``), so that no phase needs a timer of its own."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

__all__ = ["ConnectionTimer"]


class ConnectionTimer:
    """Times one phase at a time; setting a phase replaces the one timed before."""

    HEADER: Final = "header"
    """From accept, or from the first byte of a request head (``header_timeout``)."""
    KEEPALIVE: Final = "keepalive"
    """Between requests (``keepalive_timeout``)."""
    DRAIN: Final = "drain"
    """While the unread rest of a body is discarded (``drain_timeout``)."""
    LINGER: Final = "linger"
    """While a closing connection reads and drops what the client still sends."""

    __slots__ = ("_loop", "_on_expiry", "_handle", "_kind")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_expiry: Callable[[str], None]) -> None:
        """``on_expiry(phase)`` is called when a phase's time is up."""
        self._loop = loop
        self._on_expiry = on_expiry
        self._handle: asyncio.TimerHandle | None = None
        self._kind = ""

    @property
    def kind(self) -> str:
        """The phase being timed ("" when none)."""
        return self._kind

    def set(self, kind: str, delay: float) -> None:
        """Time phase ``kind``: ``on_expiry(kind)`` after ``delay`` seconds."""
        self.cancel()
        self._kind = kind
        self._handle = self._loop.call_later(delay, self._expire)

    def cancel(self) -> None:
        """Time nothing."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._kind = ""

    def _expire(self) -> None:
        kind = self._kind
        self._handle = None
        self._kind = ""
        self._on_expiry(kind)
