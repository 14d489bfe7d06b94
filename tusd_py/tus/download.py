"""Content-Type and Content-Disposition for GET downloads.

The client chose the ``filetype`` and ``filename`` metadata, so both are untrusted:
a browser must never render an upload as HTML or script from our origin. Only a short
allowlist of passive media types is served with its own type (inline); everything
else is ``application/octet-stream`` as an attachment.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import quote

from tusd_py.stores.base import UploadInfo

SAFE_INLINE_TYPES = frozenset(
    {
        "image/png",
        "image/jpeg",
        "image/gif",
        "image/webp",
        "image/avif",
        "video/mp4",
        "video/webm",
        "audio/mpeg",
        "audio/ogg",
        "audio/wav",
        "text/plain",
        "application/pdf",
    }
)
"""Media types served inline. No SVG, HTML, XML or JavaScript: they can run script."""

FALLBACK_TYPE = "application/octet-stream"

# Longest ASCII filename we put in the header; real file systems stop at 255 bytes.
_MAX_FILENAME = 255
_UNSAFE_ASCII = re.compile(r'[^A-Za-z0-9 !#$&+,.=@^_`{}~()\[\]\'-]')


def _metadata_text(info: UploadInfo, key: str) -> str | None:
    try:
        return info.metadata_text(key)
    except ValueError:  # pragma: no cover - metadata is validated at creation
        return None


def sanitize_filename(name: str) -> str:
    """The last path component of ``name`` without control characters, trimmed."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(char for char in name if unicodedata.category(char)[0] != "C")
    name = name.strip().strip(".")
    return name[:_MAX_FILENAME]


def _ascii_char(char: str) -> str:
    """``char`` itself when ASCII, the base letter of an accented letter (é -> e),
    else ``_``: one visible character for each, so the fallback keeps the name's shape
    (a Japanese name or a wide space never turns into nothing or a run of spaces)."""
    if char.isascii():
        return char
    base = "".join(part for part in unicodedata.normalize("NFKD", char) if not unicodedata.combining(part))
    return base if len(base) == 1 and base.isascii() and base.isalnum() else "_"


def ascii_fallback(filename: str) -> str:
    """The plain-ASCII stand-in for ``filename`` in ``filename="..."``."""
    fallback = "".join(_ascii_char(char) for char in unicodedata.normalize("NFC", filename))
    return _UNSAFE_ASCII.sub("_", fallback).strip()


def content_disposition(disposition: str, filename: str) -> str:
    """``disposition; filename="ascii"; filename*=UTF-8''percent-encoded`` (RFC 6266 /
    RFC 5987): old clients read the ASCII fallback, others the exact name."""
    fallback = ascii_fallback(filename)
    if fallback == "" or fallback.startswith("."):
        fallback = "download" + fallback  # never a hidden file, never nameless
    value = f'{disposition}; filename="{fallback}"'
    encoded = quote(filename, safe="")
    if encoded != fallback:
        value += f"; filename*=UTF-8''{encoded}"
    return value


def download_headers(info: UploadInfo) -> list[tuple[str, str]]:
    """Content-Type, Content-Disposition and hardening headers for ``info``."""
    filetype = (_metadata_text(info, "filetype") or "").split(";", 1)[0].strip().lower()
    filename = sanitize_filename(_metadata_text(info, "filename") or _metadata_text(info, "name") or "")
    if filetype in SAFE_INLINE_TYPES:
        headers = [("Content-Type", filetype)]
        if filename:
            headers.append(("Content-Disposition", content_disposition("inline", filename)))
    else:
        headers = [
            ("Content-Type", FALLBACK_TYPE),
            ("Content-Disposition", content_disposition("attachment", filename or info.id)),
        ]
    # Even an allowlisted type must not be sniffed into something that runs script.
    headers.append(("X-Content-Type-Options", "nosniff"))
    headers.append(("Content-Security-Policy", "default-src 'none'; sandbox"))
    return headers
