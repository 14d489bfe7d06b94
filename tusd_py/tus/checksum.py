"""tus ``checksum``: ``Upload-Checksum: <algorithm> <base64 digest>`` on PATCH (and on
a creation-with-upload POST).

A mismatch must store nothing of the request, on every store. Stores write as bytes
arrive (the S3 store even uploads parts while the body is still coming), so a body
with a checksum is first held in a ``ChecksumSpool``: an anonymous temporary file
(unlinked at once, so a crash leaves nothing behind) that is hashed while it is
filled. Only a verified body is handed to the store, which then writes it exactly as
it would write a live body. The consequences, documented for clients and operators:

- the body is bounded by ``checksum.max_buffered_size`` (larger ones get 413 before a
  byte is read when Content-Length says so, else as soon as the bound is crossed);
- an interrupted request with a checksum stores nothing: a partial body cannot be
  verified against a digest of the whole one;
- the first byte reaches the store only after the last one arrived.

All file I/O and hashing run in worker threads (hashlib releases the GIL for large
buffers), never on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from typing import IO, Any

from tusd_py.tus.errors import (
    ERR_CHECKSUM_BODY_TOO_LARGE,
    ERR_CHECKSUM_NOT_SUPPORTED,
    ERR_INVALID_CHECKSUM,
    TusError,
)

ALGORITHMS: dict[str, Callable[[], Any]] = {
    "md5": hashlib.md5,
    "sha1": hashlib.sha1,
    "sha256": hashlib.sha256,
}
"""Supported algorithms by their tus (IANA hash function textual) names."""
ALGORITHM_NAMES = ",".join(ALGORITHMS)
"""The ``Tus-Checksum-Algorithm`` value."""

SPOOL_BATCH_SIZE = 1024 * 1024
"""Bytes gathered in memory before one write + hash in a thread: the thread hop is
noise at this size, and memory per request stays bounded (one batch)."""


@dataclass(frozen=True, slots=True)
class Checksum:
    """A parsed ``Upload-Checksum`` header."""

    algorithm: str
    digest: bytes


def parse_upload_checksum(value: str | None) -> Checksum | None:
    """The Upload-Checksum header, or None when absent.

    400 (``ERR_INVALID_CHECKSUM``) without an algorithm, with bad base64 or with a
    digest of the wrong length for its algorithm; 400 (``ERR_CHECKSUM_NOT_SUPPORTED``)
    for an algorithm we do not offer.
    """
    if value is None:
        return None
    parts = value.strip().split(" ")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise TusError(ERR_INVALID_CHECKSUM)
    name, encoded = parts[0].lower(), parts[1]
    factory = ALGORITHMS.get(name)
    if factory is None:
        raise TusError(ERR_CHECKSUM_NOT_SUPPORTED)
    try:
        digest = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise TusError(ERR_INVALID_CHECKSUM, "the digest is not valid base64") from None
    if len(digest) != factory().digest_size:
        raise TusError(ERR_INVALID_CHECKSUM, f"a {name} digest has {factory().digest_size} bytes")
    return Checksum(name, digest)


class ChecksumSpool:
    """A request body held in an anonymous temporary file until its checksum is known.

    Use as ``async with ChecksumSpool(checksum, limit, directory) as spool``: ``receive``
    fills it from the body, ``matches`` compares the digest, ``chunks`` reads the held
    bytes back for the store.
    """

    def __init__(self, checksum: Checksum, limit: int, directory: str = "") -> None:
        self._checksum = checksum
        self._limit = limit
        self._directory = directory or None
        self._hash = ALGORITHMS[checksum.algorithm]()
        self._file: IO[bytes] | None = None
        self.size = 0
        """Bytes held."""

    async def __aenter__(self) -> ChecksumSpool:
        self._file = await asyncio.to_thread(tempfile.TemporaryFile, dir=self._directory)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            await asyncio.to_thread(file.close)

    async def receive(self, body: AsyncIterable[bytes]) -> None:
        """Hold every byte of ``body``; 413 (``ERR_CHECKSUM_BODY_TOO_LARGE``) as soon as
        it runs past the limit (the rest of the body is not read)."""
        assert self._file is not None, "use ChecksumSpool as an async context manager"
        batch = bytearray()
        async for chunk in body:
            if self.size + len(batch) + len(chunk) > self._limit:
                raise TusError(ERR_CHECKSUM_BODY_TOO_LARGE, f"at most {self._limit} bytes")
            batch += chunk
            if len(batch) >= SPOOL_BATCH_SIZE:
                await self._flush(batch)
                batch = bytearray()
        if batch:
            await self._flush(batch)

    async def _flush(self, batch: bytearray) -> None:
        await asyncio.to_thread(self._write_and_hash, bytes(batch))
        self.size += len(batch)

    def _write_and_hash(self, data: bytes) -> None:
        assert self._file is not None
        self._file.write(data)
        self._hash.update(data)

    def matches(self) -> bool:
        """True when the held bytes have the client's digest."""
        return hmac.compare_digest(self._hash.digest(), self._checksum.digest)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The held bytes, in pieces of ``SPOOL_BATCH_SIZE``."""
        assert self._file is not None
        file = self._file
        await asyncio.to_thread(file.seek, 0)
        while True:
            chunk = await asyncio.to_thread(file.read, SPOOL_BATCH_SIZE)
            if not chunk:
                return
            yield chunk
