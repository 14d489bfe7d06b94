"""A fast parse of the plainest request heads, so that h11 never sees most requests.

h11 costs ~30 µs of Python per request head (its state machine, its events, two
regular expressions per header) -- a fifth of a whole HEAD request. A head that is
complete in one read and in the plainest form, exactly the heads tus clients send,
is parsed here with two regular expressions over the whole head; anything else goes
to h11 unchanged (it sees the very same bytes), so this parser may be stricter than
h11 but never more lenient: an HTTP/1.1 request line with an upper-case method and a
visible-ASCII target, header lines ``token: value`` without obs-fold or control
bytes, exactly one Host, at most one Content-Length of digits, and none of the
headers that change how the connection is framed or kept (Transfer-Encoding, Expect,
Upgrade, a Connection other than ``keep-alive``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

__all__ = ["SimpleHead", "parse_simple_head"]

_TOKEN: Final = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_VALUE: Final = rb"(?:[!-~\x80-\xff](?:[ \t]*[!-~\x80-\xff])*)?"
_HEAD: Final = re.compile(
    rb"[A-Z]{1,20} [!-~]+ HTTP/1\.1\r\n(?:" + _TOKEN + rb":[ \t]*" + _VALUE + rb"[ \t]*\r\n)*\r\n"
)
_LINE: Final = re.compile(r"([^:\r\n]+):[ \t]*(.*?)[ \t]*\r\n")
"""Splits a head ``_HEAD`` accepted (decoded as latin-1) into its header lines."""

_LENGTH_DIGITS: Final = 18
"""At most 10^18 - 1 bytes (a longer Content-Length goes to h11, which decides)."""

_REFUSED: Final = frozenset({"transfer-encoding", "expect", "upgrade"})


@dataclass(frozen=True, slots=True)
class SimpleHead:
    """A request head parsed here: header names lower-case, values without the
    surrounding whitespace, the body's length (0: none), and the head's bytes."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    length: int
    raw: bytes


def parse_simple_head(data: bytes | memoryview, max_size: int) -> SimpleHead | None:
    """The head at the start of ``data`` when it is complete and plain (see the
    module docstring) and at most ``max_size`` bytes; otherwise None: h11 decides."""
    window = bytes(data[:max_size])
    end = window.find(b"\r\n\r\n")
    if end < 0:
        return None
    end += 4
    head = window[:end]
    if _HEAD.fullmatch(head) is None:
        return None
    text = head.decode("latin-1")
    line_end = text.index("\r\n")
    method, target, _ = text[:line_end].split(" ")
    headers: list[tuple[str, str]] = []
    length: str | None = None
    hosts = 0
    for name, value in _LINE.findall(text, line_end + 2):
        name = name.lower()
        headers.append((name, value))
        if name == "content-length":
            if length is not None or not (value.isascii() and value.isdigit()) or len(value) > _LENGTH_DIGITS:
                return None
            length = value
        elif name == "host":
            hosts += 1
        elif name in _REFUSED or (name == "connection" and value.lower() != "keep-alive"):
            return None
    if hosts != 1:
        return None
    return SimpleHead(method, target, headers, int(length) if length is not None else 0, head)
