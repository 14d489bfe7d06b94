"""The final object's key of an S3 upload (``store.s3.object_key``).

A template is text with placeholders:

- ``{id}``: the upload id;
- ``{metadata.NAME}``: the text of metadata key ``NAME`` (the upload is refused with
  400 when it is missing);
- ``{date:FORMAT}``: the creation time in UTC, ``FORMAT`` made of ``%Y %m %d %H %M %S``
  and the characters ``/ - _ .`` (e.g. ``{date:%Y/%m/%d}``).

``{{`` and ``}}`` stand for literal braces. The rendered key goes under
``store.s3.prefix``. A metadata value is one path segment: it is refused (400, never
rewritten) when it contains ``/`` or ``\\``, a control character, is ``.`` or ``..`` or
empty, so a client can never place its object outside the prefix or on top of another
upload's bookkeeping. A key chosen by a pre-create hook (``storage.Key``) follows the same
rules, segment by segment. Every key is at most 1024 bytes of UTF-8 (S3's limit).
"""

from __future__ import annotations

import re
import time
import unicodedata
from dataclasses import dataclass

from tusd_py.stores.base import InvalidObjectKey, UploadInfo

MAX_KEY_BYTES = 1024
"""S3's longest key, in bytes of UTF-8."""

DEFAULT_TEMPLATE = "{id}"

_FIELD = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_METADATA_NAME = re.compile(r"[A-Za-z0-9._~-]{1,128}")
_DATE_FORMAT = re.compile(r"(?:%[YmdHMS]|[/_.-])+")


@dataclass(frozen=True, slots=True)
class _Piece:
    kind: str
    """"text", "id", "metadata" or "date"."""
    value: str


class ObjectKeyTemplate:
    """A parsed ``store.s3.object_key``."""

    def __init__(self, template: str) -> None:
        """Raises ``ValueError`` (with a message naming the problem) for a bad template."""
        self.template = template
        self._pieces: list[_Piece] = []
        position = 0
        for match in _FIELD.finditer(template):
            self._text(template[position:match.start()])
            position = match.end()
            token = match.group(0)
            if token in ("{{", "}}"):
                self._text(token[0])
            elif match.group(1) is None:
                raise ValueError(f"unmatched {token!r} (write {token * 2!r} for a literal brace)")
            else:
                self._pieces.append(_placeholder(match.group(1)))
        self._text(template[position:])
        if not any(piece.kind == "id" for piece in self._pieces) and not any(
            piece.kind == "metadata" for piece in self._pieces
        ):
            raise ValueError("needs {id} or a {metadata.NAME} placeholder (else every upload gets one key)")
        if self._pieces and self._pieces[0].kind == "text" and self._pieces[0].value.startswith("/"):
            raise ValueError("must not start with '/' (S3 keys have no leading slash)")

    def _text(self, text: str) -> None:
        if text:
            self._pieces.append(_Piece("text", text))

    @property
    def is_default(self) -> bool:
        """The key is just the upload id (as before templates existed)."""
        return [(piece.kind, piece.value) for piece in self._pieces] == [("id", "")]

    def render(self, info: UploadInfo) -> str:
        """The key of ``info`` (without the store's prefix); raises ``InvalidObjectKey``."""
        created = time.gmtime(info.created_at or time.time())
        parts: list[str] = []
        for piece in self._pieces:
            if piece.kind == "text":
                parts.append(piece.value)
            elif piece.kind == "id":
                parts.append(info.id)
            elif piece.kind == "date":
                parts.append(time.strftime(piece.value, created))
            else:
                parts.append(_metadata_segment(info, piece.value))
        key = "".join(parts)
        check_key(key)
        return key


def _placeholder(name: str) -> _Piece:
    if name == "id":
        return _Piece("id", "")
    if name.startswith("metadata."):
        key = name[len("metadata."):]
        if not _METADATA_NAME.fullmatch(key):
            raise ValueError(f"{{{name}}}: not a metadata key")
        return _Piece("metadata", key)
    if name.startswith("date:"):
        date_format = name[len("date:"):]
        if not _DATE_FORMAT.fullmatch(date_format):
            raise ValueError(f"{{{name}}}: the format may hold only %Y %m %d %H %M %S and / - _ .")
        return _Piece("date", date_format)
    raise ValueError(f"unknown placeholder {{{name}}} (expected {{id}}, {{metadata.NAME}} or {{date:FORMAT}})")


def _metadata_segment(info: UploadInfo, name: str) -> str:
    try:
        value = info.metadata_text(name) if name in info.metadata else None
    except ValueError:
        value = None
    if value is None:
        raise InvalidObjectKey(f"metadata {name!r} is required to name the object (store.s3.object_key)")
    if "/" in value or "\\" in value:
        raise InvalidObjectKey(f"metadata {name!r} must not contain '/' or '\\' (it names one part of the key)")
    _check_segment(value, f"metadata {name!r}")
    return value


def _check_segment(segment: str, what: str) -> None:
    if segment in ("", ".", ".."):
        raise InvalidObjectKey(f"{what} must not be empty, '.' or '..'")
    if any(unicodedata.category(char)[0] == "C" for char in segment):
        raise InvalidObjectKey(f"{what} must not contain control characters")


def check_key(key: str) -> None:
    """Raise ``InvalidObjectKey`` unless ``key`` is a safe relative key: no leading
    '/', no empty, '.' or '..' segment, no control character, at most 1024 bytes."""
    if key.startswith("/"):
        raise InvalidObjectKey("the object key must not start with '/'")
    for segment in key.split("/"):
        _check_segment(segment, "every part of the object key")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise InvalidObjectKey(f"the object key is longer than {MAX_KEY_BYTES} bytes (S3's limit)")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidObjectKey("the object key is not valid text") from error
