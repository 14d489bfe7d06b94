"""RFC 9651 parsing of the draft's Item fields, and Upload-Limit serialization."""

from __future__ import annotations

import pytest

from tusd_py.http.types import Headers
from tusd_py.tus.ietf import is_ietf_request
from tusd_py.tus.structured_fields import (
    Item,
    StructuredFieldError,
    Token,
    parse_boolean,
    parse_integer,
    parse_item,
    parse_non_negative_integer,
    serialize_integer_dictionary,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("?1", True),
        ("?0", False),
        ("  ?1  ", True),
        ("?1;a", True),
        ('?0;a=1;b=?0;c=tok;d="s";e=:aGk=:;f=1.5;g=@1700000000', False),
        ("?1; a=1", True),  # spaces after ';' are allowed
    ],
)
def test_booleans(text: str, expected: bool) -> None:
    assert parse_boolean(text) is expected


@pytest.mark.parametrize(
    "text",
    ["", "?", "?2", "?10", "1", "true", "?1 ;a", "?1,?0", "?1;A=1", "?1;a=", "\t?1", '?1;a="unterminated'],
)
def test_invalid_booleans(text: str) -> None:
    with pytest.raises(StructuredFieldError):
        parse_boolean(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0", 0), ("42", 42), ("999999999999999", 999_999_999_999_999), ("-7", -7), ("5;unit=bytes", 5)],
)
def test_integers(text: str, expected: int) -> None:
    assert parse_integer(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "+5", "5.0", "1e3", "0x10", "1_000", "1234567890123456", "?1", "five", "5 5", "٣", "-", "5.", "1.2345"],
)
def test_invalid_integers(text: str) -> None:
    with pytest.raises(StructuredFieldError):
        parse_integer(text)


def test_negative_offsets_and_lengths_fail() -> None:
    with pytest.raises(StructuredFieldError):
        parse_non_negative_integer("-1")
    assert parse_non_negative_integer("0") == 0


def test_several_field_lines_are_combined_and_an_item_cannot_be_a_list() -> None:
    assert parse_integer(["8"]) == 8
    with pytest.raises(StructuredFieldError):
        parse_integer(["5", "6"])


def test_other_bare_items_parse_as_their_types() -> None:
    assert parse_item('"a\\"b"') == Item('a"b')
    assert parse_item("*tok/en:x") == Item(Token("*tok/en:x"))
    assert parse_item(":aGVsbG8=:") == Item(b"hello")
    assert parse_item("-1.25") == Item(-1.25)
    assert parse_item("?1;a;a=2") == Item(True, {"a": 2})  # the last value of a key wins
    with pytest.raises(StructuredFieldError):
        parse_item(":not base64!:")
    with pytest.raises(StructuredFieldError):
        parse_item('"tab\tinside"')


def test_dictionary_serialization() -> None:
    assert serialize_integer_dictionary([("max-size", 100), ("max-age", 60)]) == "max-size=100, max-age=60"
    assert serialize_integer_dictionary([("min-size", 0)]) == "min-size=0"
    with pytest.raises(ValueError):
        serialize_integer_dictionary([("Max", 1)])
    with pytest.raises(ValueError):
        serialize_integer_dictionary([("max-size", 10**15)])


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([("Upload-Draft-Interop-Version", "8")], True),
        ([("upload-draft-interop-version", "junk")], True),  # then answered 400 by the draft handler
        ([("Upload-Draft-Interop-Version", "8"), ("Tus-Resumable", "1.0.0")], False),
        ([("Tus-Resumable", "1.0.0")], False),
        ([("Upload-Complete", "?1")], False),
    ],
)
def test_ietf_request_detection(headers: list[tuple[str, str]], expected: bool) -> None:
    assert is_ietf_request(Headers(headers)) is expected
