"""The integrity checksum the S3 store sends with every UploadPart and PutObject
(``store.s3.checksum``).

S3 recomputes the checksum of the body it received and rejects the request when it
differs, so a body corrupted between this process and S3 is never stored. The
checksum of a part is computed once, while the part is spooled (``s3_spool``), in the
worker thread that writes the spool file; a CRC costs well under 0.1 CPU s/GiB with
the hardware implementations of ``awscrt`` (the library botocore's ``crt`` extra
installs), MD5 about 1.6 s/GiB and SHA-256 about 0.9 s/GiB.

- ``md5``: the ``Content-MD5`` header, which every S3-compatible service accepts;
- ``crc32``, ``crc32c``, ``crc64nvme``, ``sha256``: S3's "additional checksums"
  (``x-amz-checksum-*``). A multipart upload must be created with its algorithm, and
  CompleteMultipartUpload then names each part's checksum; the algorithm an upload was
  created with is kept in its ``.info`` (``S3Fields.checksum``), so a changed setting
  applies to new uploads only;
- ``none``: no checksum (only TCP's, and SigV4's payload hash where it is signed).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

from awscrt import checksums as crt_checksums

from tusd_py.config import S3StoreConfig
from tusd_py.stores.s3_client import BodyChecksum
from tusd_py.stores.s3_spool import Hasher

CHECKSUMS = ("crc64nvme", "crc32c", "crc32", "sha256", "md5", "none")
"""The values of ``store.s3.checksum``."""
DEFAULT_CHECKSUM = "crc32c"
"""Hardware-fast (SSE 4.2 / ARMv8 CRC), accepted by AWS S3 on PutObject and on
multipart uploads created with it, and by MinIO, Ceph (Squid and later) and R2."""
LEGACY_CHECKSUM = "md5"
"""The checksum of uploads whose ``.info`` predates ``store.s3.checksum``: their
multipart uploads were created without an algorithm, which only Content-MD5 fits."""


class _Crc:
    """A CRC from ``awscrt`` as a ``Hasher`` (continued over each ``update``)."""

    def __init__(self, function: Callable[[bytes, int], int], size: int) -> None:
        self._function = function
        self._size = size
        self._value = 0

    def update(self, data: bytes | memoryview, /) -> None:
        # awscrt's C side reads any buffer (a view is not copied); it annotates bytes.
        self._value = self._function(cast(bytes, data), self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(self._size, "big")


@dataclass(frozen=True, slots=True)
class Checksum:
    """One value of ``store.s3.checksum``: how to compute it and how S3 is told."""

    name: str
    _hasher: Callable[[], Hasher] | None

    @property
    def hasher(self) -> Callable[[], Hasher] | None:
        """A factory of incremental hashers (None for ``none``)."""
        return self._hasher

    def of_digest(self, digest: bytes) -> BodyChecksum:
        """The request checksum of a body whose digest is ``digest``."""
        return BodyChecksum(self.name, base64.b64encode(digest).decode("ascii"))

    def of(self, body: bytes) -> BodyChecksum | None:
        """The request checksum of ``body`` (None for ``none``)."""
        return self.of_chunks((body,))

    def of_chunks(self, chunks: Iterable[bytes]) -> BodyChecksum | None:
        """The request checksum of the body made of ``chunks`` (None for ``none``)."""
        if self._hasher is None:
            return None
        hasher = self._hasher()
        for chunk in chunks:
            hasher.update(chunk)
        return self.of_digest(hasher.digest())

    @property
    def names_parts(self) -> bool:
        """A multipart upload must be created with this algorithm, and completed with
        every part's checksum (S3's additional checksums; not md5 or none)."""
        return self.name not in ("md5", "none")


def _crc(function: Callable[[bytes, int], int], size: int) -> Callable[[], Hasher]:
    return lambda: _Crc(function, size)


def _md5() -> Hasher:
    return hashlib.md5(usedforsecurity=False)


_ALGORITHMS = {
    "crc64nvme": Checksum("crc64nvme", _crc(crt_checksums.crc64nvme, 8)),
    "crc32c": Checksum("crc32c", _crc(crt_checksums.crc32c, 4)),
    "crc32": Checksum("crc32", _crc(crt_checksums.crc32, 4)),
    "sha256": Checksum("sha256", hashlib.sha256),
    "md5": Checksum("md5", _md5),
    "none": Checksum("none", None),
}


def signs_payload(config: S3StoreConfig) -> bool:
    """Whether SigV4 signs each body's SHA-256 (``store.s3.payload_signing``). "auto":
    not over TLS with a checksum, which together protect the body as well (botocore's
    own default with Content-MD5); over plain http the signature is all that stops
    someone on the path from changing a body and its checksum (a CRC is no MAC)."""
    if config.payload_signing != "auto":
        return config.payload_signing == "always"
    over_tls = not config.endpoint_url or config.endpoint_url.startswith("https://")
    return not (over_tls and config.checksum != "none")


def checksum_named(name: str) -> Checksum:
    """The algorithm ``name`` (one of ``CHECKSUMS``); raises ``ValueError``."""
    try:
        return _ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown S3 checksum {name!r} (one of {', '.join(CHECKSUMS)})") from None
