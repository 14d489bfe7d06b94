"""A TCP proxy that counts the bytes passing each way: S3 traffic of one upload.

Put between a server and moto, it says how many bytes the server sent to S3 and read
back from it, whatever client library the server uses (aiobotocore, the AWS SDK for
JavaScript) and without trusting the server's own accounting. It runs on threads in the
harness process, which costs CPU the client would otherwise have: the suite uses it in
an untimed pass only.
"""

from __future__ import annotations

import contextlib
import socket
import threading

_COPY_SIZE = 256 * 1024


class CountingProxy:
    """Forwards every connection on a free loopback port to ``upstream_host:upstream_port``.

    ``bytes_up`` counts client -> upstream bytes, ``bytes_down`` upstream -> client, over
    all connections. Use as a context manager; the counts are final after the block.
    """

    def __init__(self, upstream_host: str, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server((host, 0), backlog=128)
        self.port: int = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept_forever, name="count-proxy", daemon=True)

    def __enter__(self) -> CountingProxy:
        self._acceptor.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._closed = True
        # shutdown() wakes the acceptor's accept() on Linux; close() alone may not.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._acceptor.join()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join()
        for sock in self._sockets:
            sock.close()

    def _accept_forever(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets += [client, upstream]
            self.connections += 1
            for source, sink, up in ((client, upstream, True), (upstream, client, False)):
                thread = threading.Thread(target=self._pump, args=(source, sink, up), daemon=True)
                thread.start()
                self._threads.append(thread)

    def _pump(self, source: socket.socket, sink: socket.socket, up: bool) -> None:
        """Copy ``source`` to ``sink`` until EOF; pass the EOF on (half-close)."""
        buffer = bytearray(_COPY_SIZE)
        view = memoryview(buffer)
        with contextlib.suppress(OSError):
            while count := source.recv_into(buffer):
                sink.sendall(view[:count])
                with self._lock:
                    if up:
                        self.bytes_up += count
                    else:
                        self.bytes_down += count
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
