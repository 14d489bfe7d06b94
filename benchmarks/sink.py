"""Discard sink: the loopback limit for the ingest benchmark.

A plain socket server that speaks just enough tus to satisfy the benchmark client
(POST -> 201 + Location, PATCH -> 204 + Upload-Offset, HEAD -> 200) and reads every
body byte into one preallocated buffer and drops it. It runs as its own process, like
the servers under test, so "same client, same bytes, nothing done with them" is the
fastest any server on this machine could take an upload over loopback.

    python -m benchmarks.sink --port 1090

One thread per connection (blocking sockets); the benchmark uses one connection at a
time, so the sink adds no scheduling of its own.
"""

from __future__ import annotations

import argparse
import itertools
import signal
import socket
import socketserver
import sys
import threading
from types import FrameType

# Bytes asked of the kernel per recv. Large enough that syscall overhead is negligible
# next to the copy (1 MiB reads run at memory bandwidth on loopback).
READ_SIZE = 1024 * 1024
_MAX_HEAD_BYTES = 64 * 1024

_offsets: dict[str, int] = {}
_lengths: dict[str, int] = {}
_offsets_lock = threading.Lock()
_upload_ids = itertools.count(1)


def _response(status: str, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status}", "Tus-Resumable: 1.0.0", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class _SinkHandler(socketserver.BaseRequestHandler):
    """Serves one keep-alive connection until the client closes it."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = bytearray(READ_SIZE)
        view = memoryview(buffer)
        pending = bytearray()
        while True:
            while (end := pending.find(b"\r\n\r\n")) < 0:
                if len(pending) > _MAX_HEAD_BYTES:
                    return
                count = sock.recv_into(view)
                if count == 0:
                    return
                pending += view[:count]
            head = bytes(pending[:end]).decode("latin-1")
            del pending[: end + 4]
            request_line, *header_lines = head.split("\r\n")
            method, target, _ = request_line.split(" ", 2)
            headers = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            remaining = int(headers.get("content-length", "0"))
            # Body bytes that came with the head, then the rest straight into the buffer.
            already = min(remaining, len(pending))
            del pending[:already]
            remaining -= already
            while remaining:
                count = sock.recv_into(view, min(remaining, READ_SIZE))
                if count == 0:
                    return
                remaining -= count
            sock.sendall(self._answer(method, target, headers))

    @staticmethod
    def _answer(method: str, target: str, headers: dict[str, str]) -> bytes:
        upload_id = target.rstrip("/").rsplit("/", 1)[-1]
        if method == "POST":
            upload_id = str(next(_upload_ids))
            with _offsets_lock:
                _offsets[upload_id] = 0
                _lengths[upload_id] = int(headers.get("upload-length", "0"))
            return _response("201 Created", {"Location": f"/files/{upload_id}", "Content-Length": "0"})
        if method == "PATCH":
            with _offsets_lock:
                offset = int(headers.get("upload-offset", "0")) + int(headers.get("content-length", "0"))
                _offsets[upload_id] = offset
            return _response("204 No Content", {"Upload-Offset": str(offset)})
        if method == "HEAD":
            with _offsets_lock:
                offset, length = _offsets.get(upload_id, 0), _lengths.get(upload_id, 0)
            return _response("200 OK", {
                "Upload-Offset": str(offset), "Upload-Length": str(length), "Content-Length": "0",
            })
        return _response("204 No Content", {"Tus-Version": "1.0.0"})


class _SinkServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    server = _SinkServer((args.host, args.port), _SinkHandler)

    def stop(signum: int, frame: FrameType | None) -> None:
        # shutdown() waits for serve_forever() to return, which runs in this thread:
        # call it from another one.
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
