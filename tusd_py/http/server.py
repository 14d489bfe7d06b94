"""The HTTP server: listening socket, connection bookkeeping, graceful shutdown.

Usage (see ``tusd_py.cli``)::

    server = HTTPServer(handler, HTTPLimits())
    port = await server.start("127.0.0.1", 0)
    ...
    server.stop_accepting()
    await server.stop(timeout=30)
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from tusd_py.http.limits import HTTPLimits
from tusd_py.http.protocol import HTTPProtocol
from tusd_py.http.types import Handler, ServerObserver

__all__ = ["LISTEN_BACKLOG", "HTTPLimits", "HTTPServer", "ServerContext"]

log = logging.getLogger("tusd_py.http")

LISTEN_BACKLOG = 4096
"""Pending connections the kernel queues for accept (capped at net.core.somaxconn)."""

# After ``stop`` aborted the remaining connections, how long their cancelled handlers
# get to unwind before ``stop`` returns anyway.
_CANCEL_GRACE_SECONDS = 1.0


class ServerContext:
    """State the server shares with its connections."""

    __slots__ = ("handler", "limits", "observer", "connections", "stopping", "flow_observer", "_empty")

    def __init__(self, handler: Handler, limits: HTTPLimits, observer: ServerObserver | None = None) -> None:
        self.handler = handler
        self.limits = limits
        self.observer = observer
        """Told about connections, finished requests and body bytes (metrics)."""
        self.connections: set[HTTPProtocol] = set()
        self.stopping = False
        """Set by ``HTTPServer.stop``: connections close after their current response."""
        self.flow_observer: Callable[[HTTPProtocol, bool], None] | None = None
        """Called with (connection, paused) whenever a connection pauses or resumes
        reading; an introspection hook for tests and metrics."""
        self._empty: asyncio.Event | None = None

    def admit(self, connection: HTTPProtocol, client: str) -> bool:
        """Count ``connection`` (from ``client``, "host:port") as open; or, while the
        server stops or ``max_connections`` are open, refuse it (False)."""
        if self.stopping or len(self.connections) >= self.limits.max_connections:
            # Closing at accept is the cheapest answer under overload; a client that
            # retries later gets through.
            log.warning("connection refused: %d connections open", len(self.connections), extra={"client": client})
            return False
        self.connections.add(connection)
        if self.observer is not None:
            self.observer.connection_opened()
        return True

    def reading_changed(self, connection: HTTPProtocol, paused: bool) -> None:
        """``connection`` paused or resumed reading (tells ``flow_observer``)."""
        if self.flow_observer is not None:
            self.flow_observer(connection, paused)

    def discard(self, connection: HTTPProtocol) -> None:
        """``connection`` is gone (idempotent)."""
        if connection not in self.connections:
            return
        self.connections.remove(connection)
        if self.observer is not None:
            self.observer.connection_closed()
        if not self.connections and self._empty is not None:
            self._empty.set()

    async def wait_empty(self) -> None:
        """Return once no connection is open (or still running a handler)."""
        if not self.connections:
            return
        if self._empty is None:
            self._empty = asyncio.Event()
        self._empty.clear()
        await self._empty.wait()


class HTTPServer:
    """An asyncio HTTP/1.1 server that calls ``handler(request)`` for every request."""

    def __init__(
        self, handler: Handler, limits: HTTPLimits | None = None, *, observer: ServerObserver | None = None
    ) -> None:
        """``observer`` (optional) is told about connections, requests and body bytes;
        ``tusd_py.metrics.Metrics`` is one."""
        self._context = ServerContext(handler, limits if limits is not None else HTTPLimits(), observer)
        self._server: asyncio.Server | None = None

    @property
    def limits(self) -> HTTPLimits:
        """The limits this server enforces."""
        return self._context.limits

    @property
    def open_connections(self) -> int:
        """Connections open now (including ones whose handler is still finishing)."""
        return len(self._context.connections)

    @property
    def connections(self) -> frozenset[HTTPProtocol]:
        """The open connections (introspection for tests and metrics)."""
        return frozenset(self._context.connections)

    @property
    def flow_observer(self) -> Callable[[HTTPProtocol, bool], None] | None:
        """Called with (connection, paused) when a connection pauses or resumes reading."""
        return self._context.flow_observer

    @flow_observer.setter
    def flow_observer(self, observer: Callable[[HTTPProtocol, bool], None] | None) -> None:
        self._context.flow_observer = observer

    async def start(self, host: str, port: int, *, sock: socket.socket | None = None) -> int:
        """Listen on ``host:port`` and return the bound port (``port=0`` picks a free one);
        with ``sock``, accept on that bound socket instead (one a supervisor bound for
        its workers) and ignore ``host`` and ``port``."""
        if self._server is not None:
            raise RuntimeError("the server is already started")
        loop = asyncio.get_running_loop()
        context = self._context
        context.stopping = False

        def connection() -> HTTPProtocol:
            return HTTPProtocol(context)

        # A large backlog absorbs connection bursts (tus clients retry in herds after an
        # outage); the kernel caps it at net.core.somaxconn.
        if sock is not None:
            self._server = await loop.create_server(connection, sock=sock, backlog=LISTEN_BACKLOG)
        else:
            self._server = await loop.create_server(
                connection, host, port, reuse_address=True, backlog=LISTEN_BACKLOG
            )
        sockets = self._server.sockets
        return int(sockets[0].getsockname()[1]) if sockets else port

    def stop_accepting(self) -> None:
        """Close the listening socket(s); open connections are not touched."""
        if self._server is not None:
            self._server.close()

    async def stop(self, timeout: float) -> None:  # noqa: ASYNC109 - the API cli.py uses
        """Stop accepting, close idle keep-alive connections, wait up to ``timeout``
        seconds for in-flight requests to finish, then abort what remains."""
        self.stop_accepting()
        context = self._context
        context.stopping = True  # busy connections close after their response
        for connection in list(context.connections):
            connection.close_if_idle()
        try:
            async with asyncio.timeout(timeout):
                await context.wait_empty()
        except TimeoutError:
            remaining = list(context.connections)
            log.warning("aborting %d connections still busy after %.1fs", len(remaining), timeout)
            tasks = [task for connection in remaining if (task := connection.task) is not None]
            for connection in remaining:
                connection.abort()
            if tasks:
                await asyncio.wait(tasks, timeout=_CANCEL_GRACE_SECONDS)
        if self._server is not None:
            server, self._server = self._server, None
            await server.wait_closed()
