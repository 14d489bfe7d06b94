"""Structured Field Values (RFC 9651): the subset the IETF resumable-upload draft uses.

The draft's request fields are Items (``Upload-Complete: ?1``, ``Upload-Offset: 42``,
``Upload-Length``, ``Upload-Draft-Interop-Version``); the only Dictionary is the
``Upload-Limit`` response field, which we serialize but never parse.

Parsing follows RFC 9651 section 4.2 exactly (no leniency: ``+5``, ``05.``, ``?true``,
``1,2`` all fail), including parameters, which an Item may carry and a recipient must
accept and ignore unless it knows them. Bare-item types other than Integer and Boolean
are parsed only so that a parameter value of that type does not fail the field.
"""

from __future__ import annotations

import base64
import binascii
import string
from collections.abc import Iterable
from dataclasses import dataclass, field

MAX_INTEGER = 999_999_999_999_999
"""RFC 9651 section 3.3.1: Integers have at most 15 decimal digits."""

_KEY_FIRST = frozenset(string.ascii_lowercase + "*")
_KEY_REST = frozenset(string.ascii_lowercase + string.digits + "_-.*")
# RFC 9110 tchar, plus ':' and '/' (RFC 9651 section 3.3.4).
_TOKEN_REST = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~:/")
_TOKEN_FIRST = frozenset(string.ascii_letters + "*")
_BASE64 = frozenset(string.ascii_letters + string.digits + "+/=")


class StructuredFieldError(ValueError):
    """A field value that is not a valid Structured Field of the expected type."""


@dataclass(frozen=True, slots=True)
class Token:
    """An RFC 9651 Token (kept distinct from String)."""

    value: str


BareItem = int | float | str | bytes | bool | Token


@dataclass(frozen=True, slots=True)
class Item:
    """A parsed Item: its bare value and its parameters (in order)."""

    value: BareItem
    parameters: dict[str, BareItem] = field(default_factory=dict)


class _Parser:
    """Cursor over one field value (RFC 9651 section 4.2 algorithms)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.position = 0

    def peek(self) -> str:
        return self.text[self.position] if self.position < len(self.text) else ""

    def take(self) -> str:
        char = self.peek()
        self.position += 1
        return char

    def skip_spaces(self) -> None:
        while self.peek() == " ":
            self.position += 1

    def fail(self, what: str) -> StructuredFieldError:
        return StructuredFieldError(f"invalid structured field ({what} at {self.position})")

    # --- section 4.2.3 ------------------------------------------------------------

    def item(self) -> Item:
        value = self.bare_item()
        return Item(value, self.parameters())

    def bare_item(self) -> BareItem:
        char = self.peek()
        if char == "-" or (char.isascii() and char.isdigit()):
            return self.number()
        if char == '"':
            return self.string()
        if char == ":":
            return self.byte_sequence()
        if char == "?":
            return self.boolean()
        if char == "@":
            self.take()
            date = self.number()
            if not isinstance(date, int):
                raise self.fail("date")
            return date
        if char in _TOKEN_FIRST:
            return self.token()
        raise self.fail("bare item")

    def parameters(self) -> dict[str, BareItem]:
        parameters: dict[str, BareItem] = {}
        while self.peek() == ";":
            self.take()
            self.skip_spaces()
            key = self.key()
            value: BareItem = True
            if self.peek() == "=":
                self.take()
                value = self.bare_item()
            parameters[key] = value  # a repeated key overwrites (section 4.2.3.2)
        return parameters

    def key(self) -> str:
        if self.peek() not in _KEY_FIRST:
            raise self.fail("key")
        start = self.position
        while self.peek() in _KEY_REST:
            self.position += 1
        return self.text[start : self.position]

    def number(self) -> int | float:
        sign = 1
        if self.peek() == "-":
            self.take()
            sign = -1
        start = self.position
        is_decimal = False
        while True:
            char = self.peek()
            if char.isascii() and char.isdigit():
                self.position += 1
            elif char == "." and not is_decimal:
                if self.position - start > 12:
                    raise self.fail("decimal")
                is_decimal = True
                self.position += 1
            else:
                break
            if self.position - start > (16 if is_decimal else 15):
                raise self.fail("number too long")
        digits = self.text[start : self.position]
        if digits == "" or not digits[0].isdigit():
            raise self.fail("number")
        if not is_decimal:
            return sign * int(digits)
        if digits.endswith(".") or len(digits.split(".", 1)[1]) > 3:
            raise self.fail("decimal")
        return sign * float(digits)

    def string(self) -> str:
        self.take()  # opening DQUOTE
        chars: list[str] = []
        while True:
            char = self.take()
            if char == "":
                raise self.fail("unterminated string")
            if char == "\\":
                escaped = self.take()
                if escaped not in ('"', "\\"):
                    raise self.fail("string escape")
                chars.append(escaped)
            elif char == '"':
                return "".join(chars)
            elif not " " <= char <= "~":
                raise self.fail("string character")
            else:
                chars.append(char)

    def token(self) -> Token:
        start = self.position
        self.position += 1
        while self.peek() in _TOKEN_REST:
            self.position += 1
        return Token(self.text[start : self.position])

    def byte_sequence(self) -> bytes:
        self.take()
        start = self.position
        while self.peek() in _BASE64:
            self.position += 1
        if self.take() != ":":
            raise self.fail("byte sequence")
        try:
            return base64.b64decode(self.text[start : self.position - 1], validate=True)
        except binascii.Error:
            raise self.fail("byte sequence") from None

    def boolean(self) -> bool:
        self.take()
        char = self.take()
        if char == "1":
            return True
        if char == "0":
            return False
        raise self.fail("boolean")


def parse_item(field_lines: str | Iterable[str]) -> Item:
    """Parse a field as an Item; several field lines are combined first, as RFC 9651
    section 4.2 prescribes (so two ``Upload-Offset`` lines fail: an Item is one value)."""
    text = field_lines if isinstance(field_lines, str) else ", ".join(field_lines)
    parser = _Parser(text)
    parser.skip_spaces()
    item = parser.item()
    parser.skip_spaces()
    if parser.position != len(text):
        raise parser.fail("trailing characters")
    return item


def parse_boolean(field_lines: str | Iterable[str]) -> bool:
    """A Boolean Item (``?0``/``?1``, parameters ignored)."""
    value = parse_item(field_lines).value
    if not isinstance(value, bool):
        raise StructuredFieldError("expected a Boolean")
    return value


def parse_integer(field_lines: str | Iterable[str]) -> int:
    """An Integer Item (parameters ignored)."""
    value = parse_item(field_lines).value
    # bool is an int subclass in Python; ?1 is not the Integer 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise StructuredFieldError("expected an Integer")
    return value


def parse_non_negative_integer(field_lines: str | Iterable[str]) -> int:
    """An Integer Item that is 0 or more (what the draft's offsets and lengths are)."""
    value = parse_integer(field_lines)
    if value < 0:
        raise StructuredFieldError("expected a non-negative Integer")
    return value


def serialize_boolean(value: bool) -> str:
    """``?1`` or ``?0``."""
    return "?1" if value else "?0"


def serialize_integer_dictionary(members: Iterable[tuple[str, int]]) -> str:
    """A Dictionary whose members are Integers, e.g. ``max-size=100, max-age=60``."""
    parts = []
    for key, value in members:
        if not key or key[0] not in _KEY_FIRST or any(char not in _KEY_REST for char in key[1:]):
            raise ValueError(f"invalid dictionary key {key!r}")
        if abs(value) > MAX_INTEGER:
            raise ValueError(f"integer out of range: {value}")
        parts.append(f"{key}={value}")
    return ", ".join(parts)
