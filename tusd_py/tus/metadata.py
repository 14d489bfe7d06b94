"""The Upload-Metadata header, parsed strictly.

The header is a comma-separated list of ``key`` or ``key base64value`` pairs. Keys
are non-empty, unique, and contain no space or comma; values are base64 with correct
padding (RFC 4648, standard alphabet). Values are kept base64-encoded exactly as sent,
so HEAD echoes them byte for byte and nothing downstream ever sees undecoded junk.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from tusd_py.tus.errors import ERR_INVALID_METADATA, TusError

# Canonical base64 blocks; the last block may carry one or two '=' of padding.
_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
# Printable ASCII except space and comma: a key must survive being echoed in a header.
_KEY = re.compile(r"[!-+\--~]+")


def parse_metadata(header: str | None) -> dict[str, str]:
    """Parse Upload-Metadata into ``{key: base64 value}`` (``""`` for a bare key).

    An absent or empty header means no metadata. Raises ``TusError`` (400) naming the
    problem for an empty pair, a bad key, a duplicate key or a value that is not base64.
    """
    if header is None or header.strip() == "":
        return {}
    metadata: dict[str, str] = {}
    for pair in header.split(","):
        pair = pair.strip(" \t")
        if pair == "":
            raise TusError(ERR_INVALID_METADATA, "empty key-value pair")
        key, separator, value = pair.partition(" ")
        if _KEY.fullmatch(key) is None:
            raise TusError(ERR_INVALID_METADATA, "invalid key")
        if key in metadata:
            raise TusError(ERR_INVALID_METADATA, f"duplicate key {key!r}")
        if separator and _BASE64.fullmatch(value) is None:
            raise TusError(ERR_INVALID_METADATA, f"value of {key!r} is not valid base64")
        metadata[key] = value
    return metadata


def format_metadata(metadata: Mapping[str, str]) -> str:
    """The Upload-Metadata header value for ``metadata`` (inverse of the parser)."""
    return ",".join(f"{key} {value}" if value else key for key, value in metadata.items())
