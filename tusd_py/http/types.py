"""The small interface where the HTTP layer meets an application.

Only these objects cross the boundary: the application never sees h11, a transport
or a socket, and the HTTP layer never sees tus. An application is an async callable
``handler(request) -> Response``.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


class Headers:
    """Request headers: names are lower-case, values are str (decoded as latin-1).

    Kept in arrival order; a name may repeat.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: list[tuple[str, str]] = [(name.lower(), value) for name, value in items]

    @classmethod
    def lowered(cls, items: list[tuple[str, str]]) -> Headers:
        """Headers from ``items`` whose names are lower-case already (taken as is)."""
        headers = cls.__new__(cls)
        headers._items = items
        return headers

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of header ``name`` (case-insensitive), or ``default``."""
        name = name.lower()
        for key, value in self._items:
            if key == name:
                return value
        return default

    def get_all(self, name: str) -> list[str]:
        """Every value of header ``name``, in arrival order."""
        name = name.lower()
        return [value for key, value in self._items if key == name]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


class ClientDisconnected(Exception):
    """The client closed the connection before the request body was complete."""


class BodyTimeout(Exception):
    """No body bytes arrived within the body read timeout."""


class Body(Protocol):
    """A request body, streamed.

    Iterating yields the body in chunks as they arrive (never an empty chunk). The
    first read sends ``100 Continue`` when the client asked for it. Reading raises
    ``ClientDisconnected`` or ``BodyTimeout`` when the body cannot be completed.
    Cancelling a pending read is safe: no byte is lost, the next read returns it.
    """

    def __aiter__(self) -> AsyncIterator[bytes]:
        """Iterate over the chunks of the body."""
        ...

    @property
    def length(self) -> int | None:
        """The declared Content-Length, or None for a chunked body."""
        ...

    @property
    def received(self) -> int:
        """How many body bytes the application has been handed so far."""
        ...


class CopyTarget(Protocol):
    """Where ``CopyableBody.copy_into`` writes: file descriptor ``fd`` at byte
    ``offset``; ``executor`` runs the blocking work (None: the loop's default). Any
    object with these three attributes will do (a store's own target type, say)."""

    @property
    def fd(self) -> int: ...

    @property
    def offset(self) -> int: ...

    @property
    def executor(self) -> Executor | None: ...


class CopyStop:
    """Asks a running ``CopyableBody.copy_into`` to return early (with what it has
    moved so far). ``set`` is called on the event loop thread; worker threads poll
    ``is_set``. A plain flag, not a ``threading.Event``: a worker only ever polls it
    (between socket waits of at most ``splice.POLL_SLICE_SECONDS``), and an Event
    (a lock and a condition) would be built for every copy of every request."""

    __slots__ = ("_stopped", "_on_set")

    def __init__(self) -> None:
        self._stopped = False
        self._on_set: Callable[[], None] | None = None

    def set(self) -> None:
        """Stop the copy (idempotent)."""
        self._stopped = True
        if self._on_set is not None:
            self._on_set()

    def is_set(self) -> bool:
        """Whether ``set`` was called (safe to ask from any thread)."""
        return self._stopped

    def on_set(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` (on the event loop thread) when ``set`` is called; used by
        a body to wake a read waiting for data. None removes it."""
        self._on_set = callback


@runtime_checkable
class CopyableBody(Protocol):
    """An optional capability of a ``Body``: write the body's bytes straight into a
    file, without handing them to the application as ``bytes`` first.

    Where the platform allows (Linux ``splice(2)`` on a plain TCP connection), the
    bytes go from the socket into the file inside the kernel, on a worker thread.
    Iterating and copying may be mixed; the body stays one ordered stream.
    """

    async def copy_into(self, target: CopyTarget, max_bytes: int, stop: CopyStop | None = None) -> int | None:
        """Write up to ``max_bytes`` body bytes into ``target``, in order; return how
        many landed in the file, or None when this body cannot be copied into a file
        (the same answer on every call: iterate it instead).

        Chunks already read from the socket are written first; then, while enough
        bytes wait in the socket, they are spliced into the file; else this waits for
        the next chunk like a read does (body timeout included).

        Returns 0 when the body is complete (or ``max_bytes`` is 0) or ``stop`` was
        set before a byte moved; a ``stop`` set meanwhile ends the call early with the
        bytes moved so far. Raises ``ClientDisconnected`` or ``BodyTimeout`` like
        iteration does, but only on a call that moved nothing (bytes that arrived
        before are returned first). Raises ``OSError`` when the file cannot be written
        (bytes written before the error are in the file). Not cancellable in the
        middle of a write: a cancelled call first finishes (promptly) what it moved.
        """
        ...


Informational = Callable[[int, list[tuple[str, str]]], Awaitable[None]]
"""Send an informational (1xx) response: ``await send_informational(104, headers)``."""


@dataclass(slots=True)
class Request:
    """One HTTP request as the application sees it."""

    method: str
    """Upper-case method as sent, e.g. ``"PATCH"``."""
    target: str
    """The raw request target: path plus optional ``?query``."""
    headers: Headers
    body: Body
    send_informational: Informational
    """Sends a 1xx response before the final one (e.g. 104 for the IETF draft)."""
    client: tuple[str, int] | None = None
    """Peer address, when known."""
    http_version: str = "1.1"
    request_id: str = ""
    """From the X-Request-ID header when present (sanitized), else generated; also
    in the access log line and echoed as X-Request-ID on the response."""


@dataclass(slots=True)
class Response:
    """The final response. ``body`` is bytes, or an async iterable of chunks.

    For a streamed body set ``content-length`` in ``headers`` when known; otherwise the
    HTTP layer uses chunked transfer encoding. Responses to HEAD never carry a body.
    """

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | AsyncIterable[bytes] = b""
    reason: str = ""
    """The reason phrase of the status line (ASCII); empty: the standard phrase of
    ``status`` (or none for a status HTTP does not define)."""


Handler = Callable[[Request], Awaitable[Response]]


class ServerObserver(Protocol):
    """Receives the HTTP layer's numbers (connections, requests, body bytes), e.g. to
    export them as metrics. Every method is called on the event loop thread and must
    be cheap: ``bytes_received`` and ``bytes_sent`` run once per body chunk."""

    def connection_opened(self) -> None:
        """A client connection was accepted (connections refused at accept are not)."""
        ...

    def connection_closed(self) -> None:
        """A connection counted by ``connection_opened`` is gone (exactly once)."""
        ...

    def request_finished(self, method: str, status: int, seconds: float) -> None:
        """A request cycle ended: its response was sent, or the connection failed
        (``status`` 0 when no response went out). Requests rejected before they were
        parsed (malformed, too large, too slow) report method ``"-"``."""
        ...

    def bytes_received(self, count: int) -> None:
        """``count`` request body bytes were handed to the application."""
        ...

    def bytes_sent(self, count: int) -> None:
        """``count`` response body bytes were written to a client."""
        ...
