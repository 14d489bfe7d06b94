"""Flow control of reading: one switch per connection that pauses the transport
while any of several reasons holds and resumes it once none does.

Each part of the connection that must stop the socket from being read (body
backpressure, a pipelined request waiting its turn, a splice thread owning the
socket, ...) holds its own reason, so releasing one never resumes reading that
another still needs paused.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

__all__ = ["ReadingGate"]


class ReadingGate:
    """Pauses and resumes one transport's reading (see the module docstring)."""

    BACKPRESSURE: Final = 1
    """Unread body bytes are above the high-water mark."""
    PIPELINE: Final = 2
    """Bytes of a next request arrived while one is in flight."""
    STOPPED: Final = 4
    """The body was malformed: nothing more is read."""
    SPLICE: Final = 8
    """A splice thread reads the socket (or is about to)."""
    FIRST_READ: Final = 16
    """A body framed by the connection waits for the application's first read."""

    __slots__ = ("_transport", "_reasons", "_paused", "_closed", "_on_change")

    def __init__(self, on_change: Callable[[bool], None]) -> None:
        """``on_change(paused)`` is called whenever the transport is paused or resumed."""
        self._transport: asyncio.Transport | None = None
        self._reasons = 0
        self._paused = False
        self._closed = False
        self._on_change = on_change

    def attach(self, transport: asyncio.Transport) -> None:
        """Control ``transport`` from now on."""
        self._transport = transport

    @property
    def paused(self) -> bool:
        """Whether the transport is paused (the loop does not read its socket)."""
        return self._paused

    def holds(self, reason: int) -> bool:
        """Whether ``reason`` is held."""
        return bool(self._reasons & reason)

    def hold(self, reason: int) -> None:
        """Keep reading paused for ``reason`` (idempotent)."""
        self._set(self._reasons | reason)

    def release(self, reasons: int) -> None:
        """Drop ``reasons`` (any combination); reading resumes once none is held."""
        self._set(self._reasons & ~reasons)

    def close(self) -> None:
        """The connection is closing: leave the transport alone from now on."""
        self._closed = True

    def resume_for_linger(self) -> None:
        """Read again whatever is held: a closing connection reads and drops what the
        client still sends (a lingering close, see ``protocol.py``)."""
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()

    def _set(self, reasons: int) -> None:
        self._reasons = reasons
        paused = reasons != 0
        if paused is self._paused or self._closed or self._transport is None:
            return
        self._paused = paused
        if paused:
            self._transport.pause_reading()
        else:
            self._transport.resume_reading()
        self._on_change(paused)
