"""Discard sink: the loopback limit of the benchmarks.

A server that speaks just enough tus to satisfy the benchmark clients and does nothing
with what it gets: POST -> 201 + Location, PATCH -> 204 + Upload-Offset, HEAD -> 200
with the offset, anything else -> 204. Body bytes are read into one preallocated buffer
and dropped. It runs as its own process, like the servers under test, so "same client,
same bytes, nothing done with them" is the fastest a Python server on this machine could
take the workload over loopback, and its RSS is the floor for holding the connections.

    python -m benchmarks.sink --port 1090

One event loop (uvloop when installed) with an ``asyncio.BufferedProtocol`` per
connection. Every connection reads into the same buffer: the loop is single-threaded and
a read is fully consumed (head parsed, body bytes counted) before the next one starts,
so no read can overwrite bytes still needed. That keeps the sink's memory flat however
many connections it holds (1,000 idle connections cost a few KiB each), where a thread
per connection would need a stack and a buffer each.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import sys
from typing import cast

from benchmarks.common import new_event_loop

# Bytes asked of the kernel per read. Large enough that syscall overhead is negligible
# next to the copy (1 MiB reads run at memory bandwidth on loopback).
READ_SIZE = 1024 * 1024
_MAX_HEAD_BYTES = 64 * 1024
_HEAD_END = b"\r\n\r\n"

_offsets: dict[str, int] = {}
_lengths: dict[str, int] = {}
_upload_ids = itertools.count(1)
_shared_buffer = bytearray(READ_SIZE)


def _response(status: str, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status}", "Tus-Resumable: 1.0.0", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# Answers without per-request state are built once: the request-rate workloads measure
# how fast a server can answer, and a floor that formats strings would not be a floor.
_NO_CONTENT = _response("204 No Content", {"Tus-Version": "1.0.0"})


def answer(method: str, target: str, headers: dict[str, str]) -> bytes:
    """The tus response the benchmark clients expect for one request."""
    upload_id = target.rstrip("/").rsplit("/", 1)[-1]
    if method == "POST":
        upload_id = str(next(_upload_ids))
        _offsets[upload_id] = 0
        _lengths[upload_id] = int(headers.get("upload-length", "0"))
        return _response("201 Created", {"Location": f"/files/{upload_id}", "Content-Length": "0"})
    if method == "PATCH":
        offset = int(headers.get("upload-offset", "0")) + int(headers.get("content-length", "0"))
        _offsets[upload_id] = offset
        return _response("204 No Content", {"Upload-Offset": str(offset)})
    if method == "HEAD":
        offset, length = _offsets.get(upload_id, 0), _lengths.get(upload_id, 0)
        return _response("200 OK", {"Upload-Offset": str(offset), "Upload-Length": str(length),
                                    "Content-Length": "0"})
    return _NO_CONTENT


class SinkProtocol(asyncio.BufferedProtocol):
    """One keep-alive connection: parse heads, count body bytes away, answer."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._head = bytearray()  # bytes of a request head not complete yet
        self._body_remaining = 0
        self._answer = b""  # sent once the body has been read

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport is not a subclass of asyncio.Transport, only alike.
        self._transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(_shared_buffer)

    def buffer_updated(self, nbytes: int) -> None:
        # Positions into the shared buffer rather than slices of it: bytearray.find with
        # bounds searches for the head's end without copying the body bytes after it.
        data = _shared_buffer
        position = 0
        while position < nbytes:
            if self._body_remaining:
                taken = min(self._body_remaining, nbytes - position)
                self._body_remaining -= taken
                position += taken
                if not self._body_remaining:
                    self._send_answer()
                continue
            if self._head:
                # Rare: a head split across reads. Join, then find its end.
                self._head += data[position:nbytes]
                end = self._head.find(_HEAD_END)
                if end < 0:
                    self._check_head_size()
                    return
                after = len(self._head) - end - len(_HEAD_END)  # bytes of this read past the head
                head = bytes(self._head[:end])
                self._head.clear()
                position = nbytes - after
            else:
                end = data.find(_HEAD_END, position, nbytes)
                if end < 0:
                    self._head += data[position:nbytes]
                    self._check_head_size()
                    return
                head = bytes(data[position:end])
                position = end + len(_HEAD_END)
            self._start_request(head)

    def _check_head_size(self) -> None:
        if len(self._head) > _MAX_HEAD_BYTES and self._transport is not None:
            self._transport.close()

    def _start_request(self, head: bytes) -> None:
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, _ = request_line.split(" ", 2)
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self._answer = answer(method, target, headers)
        self._body_remaining = int(headers.get("content-length", "0"))
        if not self._body_remaining:
            self._send_answer()

    def _send_answer(self) -> None:
        if self._transport is not None:
            self._transport.write(self._answer)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None


async def serve(host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    # backlog: the idle-connections workload opens 1,000 connections at once.
    server = await loop.create_server(SinkProtocol, host, port, reuse_address=True, backlog=4096)
    async with server:
        await stopped.wait()


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
