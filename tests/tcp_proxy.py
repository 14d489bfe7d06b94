"""A TCP proxy on 127.0.0.1 that can freeze mid-request: a stalled S3 endpoint (an
overloaded or partitioned service, a stopped process) in front of a real moto.

Threads, not the event loop: a frozen proxy must not hold up the loop under test, and
it is started and stopped by sync fixtures. ``freeze_after(n)`` stops forwarding in
both directions once ``n`` more bytes went from the clients to the server (so the
freeze lands inside a request body); connections made while frozen are accepted and
stall too. ``thaw`` forwards what was held and carries on.
"""

from __future__ import annotations

import contextlib
import socket
import threading

BUFFER_SIZE = 64 * 1024


class FreezingProxy:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``upstream_port``."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._thawed = threading.Event()
        self._thawed.set()
        self.frozen = threading.Event()
        """Set once a freeze took effect."""
        self._budget: int | None = None
        """Client-to-server bytes still forwarded before freezing (None: not armed)."""
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._start(self._accept)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def freeze_after(self, count: int) -> None:
        """Freeze once ``count`` more bytes went from clients to the server."""
        with self._lock:
            self._budget = count

    def thaw(self) -> None:
        with self._lock:
            self._budget = None
            self.frozen.clear()
        self._thawed.set()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets = list(self._sockets)
        self._thawed.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(timeout=10)

    def _start(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(("127.0.0.1", self._upstream_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self._sockets += [client, server]
            self._start(self._pump, client, server, True)
            self._start(self._pump, server, client, False)

    def _pump(self, source: socket.socket, target: socket.socket, to_server: bool) -> None:
        try:
            while True:
                self._thawed.wait()
                data = source.recv(BUFFER_SIZE)
                if not data:
                    target.shutdown(socket.SHUT_WR)
                    return
                if to_server:
                    data = self._forward_until_freeze(data, target)
                self._thawed.wait()
                if self._closed:
                    return
                target.sendall(data)
        except OSError:
            return

    def _forward_until_freeze(self, data: bytes, target: socket.socket) -> bytes:
        """Send what the budget allows and freeze when it runs out; the rest (sent
        after ``thaw``)."""
        with self._lock:
            if self._budget is None or len(data) < self._budget:
                if self._budget is not None:
                    self._budget -= len(data)
                return data
            allowed, self._budget = self._budget, None
            self._thawed.clear()
            self.frozen.set()
        target.sendall(data[:allowed])
        return data[allowed:]
