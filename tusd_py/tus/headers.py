"""Strict parsing of the tus request headers.

Every value a store ever sees passes through here first: integers are plain decimal
digits (no sign, no spaces, no ``0x``), so ``int()``'s leniency (``" 5"``, ``"+5"``,
``"5_0"``) never lets junk through.
"""

from __future__ import annotations

import re

from tusd_py.http.types import Headers
from tusd_py.tus.errors import (
    ERR_INVALID_CONTENT_TYPE,
    ERR_INVALID_DEFER_LENGTH,
    ERR_INVALID_LENGTH,
    ERR_INVALID_OFFSET,
    ErrorKind,
    TusError,
)

TUS_VERSION = "1.0.0"
"""The only protocol version this server speaks."""

OFFSET_OCTET_STREAM = "application/offset+octet-stream"

# 2**63 - 1 has 19 digits: every length a store can hold fits, and bounding the digit
# count keeps a hostile header from costing a big-integer parse.
MAX_INTEGER = 2**63 - 1
_DIGITS = re.compile(r"[0-9]{1,19}")


def parse_non_negative_int(value: str | None, kind: ErrorKind) -> int:
    """``value`` as a non-negative integer, or ``TusError(kind)`` when it is missing,
    not plain decimal digits, or above ``MAX_INTEGER``."""
    if value is None or _DIGITS.fullmatch(value) is None:
        raise TusError(kind)
    number = int(value)
    if number > MAX_INTEGER:
        raise TusError(kind)
    return number


def single_value(headers: Headers, name: str, kind: ErrorKind) -> str | None:
    """The value of header ``name``, which may appear once; None when absent.

    A repeat with the same value counts once (as h11 treats Content-Length); two
    different values are ``TusError(kind)``: taking either would guess what the
    client (or a proxy that added one) meant, and a wrong offset or length stores
    bytes at the wrong place."""
    values = headers.get_all(name)
    if not values:
        return None
    if any(value != values[0] for value in values[1:]):
        raise TusError(kind, f"{len(set(values))} different values")
    return values[0]


def parse_upload_offset(value: str | None) -> int:
    """The Upload-Offset header (required on PATCH)."""
    return parse_non_negative_int(value, ERR_INVALID_OFFSET)


def parse_upload_length(value: str | None) -> int:
    """The Upload-Length header."""
    return parse_non_negative_int(value, ERR_INVALID_LENGTH)


def parse_defer_length(value: str | None) -> bool:
    """True when Upload-Defer-Length is ``1``; False when absent; else 400."""
    if value is None:
        return False
    if value != "1":
        raise TusError(ERR_INVALID_DEFER_LENGTH)
    return True


def media_type(content_type: str | None) -> str | None:
    """The media type of a Content-Type value, lower-case, without parameters."""
    if content_type is None:
        return None
    return content_type.split(";", 1)[0].strip().lower()


def is_offset_octet_stream(content_type: str | None) -> bool:
    """True for ``application/offset+octet-stream`` (parameters ignored)."""
    return media_type(content_type) == OFFSET_OCTET_STREAM


def require_offset_octet_stream(content_type: str | None) -> None:
    """415 unless the body is declared as ``application/offset+octet-stream``."""
    if not is_offset_octet_stream(content_type):
        raise TusError(ERR_INVALID_CONTENT_TYPE)


_RANGE = re.compile(r"bytes=([0-9]{0,19})-([0-9]{0,19})")


class RangeNotSatisfiable(Exception):
    """The Range header is well formed but selects no byte of the representation."""


def parse_range(value: str | None, size: int) -> tuple[int, int] | None:
    """The byte range ``[start, stop)`` selected by a single-range ``Range`` header.

    Returns None when the whole representation should be sent: no header, a
    malformed one, or several ranges (RFC 9110 lets a server ignore Range, and one
    code path for full responses is simpler than multipart/byteranges). Raises
    ``RangeNotSatisfiable`` when the range starts at or after ``size`` or is an empty
    suffix.
    """
    if value is None:
        return None
    match = _RANGE.fullmatch(value.strip())
    if match is None:
        return None
    first, last = match.group(1), match.group(2)
    if first == "" and last == "":
        return None
    if first == "":
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable
        return max(0, size - suffix), size
    start = int(first)
    if last != "" and int(last) < start:
        return None  # invalid range: ignored, as RFC 9110 requires
    if start >= size:
        raise RangeNotSatisfiable
    stop = size if last == "" else min(int(last) + 1, size)
    return start, stop
