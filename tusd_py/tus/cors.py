"""CORS for browser clients (tus-js-client, Uppy).

Headers are added only for an allowed ``Origin``; a request from any other origin gets
no CORS header at all, so the browser blocks it while non-browser clients are unaffected.
"""

from __future__ import annotations

from tusd_py.config import CorsConfig
from tusd_py.http.types import Headers

ALLOW_METHODS = "POST, HEAD, PATCH, OPTIONS, GET, DELETE"

ALLOW_HEADERS = (
    "Authorization",
    "Origin",
    "X-Requested-With",
    "X-Request-ID",
    "X-HTTP-Method-Override",
    "Content-Type",
    "Upload-Length",
    "Upload-Offset",
    "Tus-Resumable",
    "Upload-Metadata",
    "Upload-Defer-Length",
    "Upload-Concat",
    "Upload-Checksum",
    "Upload-Complete",
    "Upload-Draft-Interop-Version",
)
"""Request headers a browser may send cross-origin; ``cors.allow_headers`` adds to them."""

EXPOSE_HEADERS = (
    "Upload-Offset",
    "Location",
    "Upload-Length",
    "Tus-Version",
    "Tus-Resumable",
    "Tus-Max-Size",
    "Tus-Extension",
    "Upload-Metadata",
    "Upload-Defer-Length",
    "Upload-Concat",
    "Upload-Expires",
    "Upload-Checksum",
    "Upload-Complete",
    "Upload-Draft-Interop-Version",
    "Upload-Limit",
    "Content-Range",
    "Content-Disposition",
    "X-Request-ID",
)
"""Response headers a browser lets script read; ``cors.expose_headers`` adds to them."""


class Cors:
    """Decides which CORS headers a request gets."""

    def __init__(self, config: CorsConfig) -> None:
        self._enabled = config.enabled
        self._any_origin = "*" in config.allow_origins
        self._origins = frozenset(config.allow_origins)
        self._credentials = config.allow_credentials
        self._max_age = str(config.max_age)
        self._allow_headers = _joined(ALLOW_HEADERS, config.allow_headers)
        self._expose_headers = _joined(EXPOSE_HEADERS, config.expose_headers)

    def allowed_origin(self, headers: Headers) -> str | None:
        """The request's Origin when CORS is enabled and the origin is allowed."""
        if not self._enabled:
            return None
        origin = headers.get("origin")
        if origin is None or not (self._any_origin or origin in self._origins):
            return None
        return origin

    def is_preflight(self, method: str, headers: Headers) -> bool:
        """An OPTIONS request a browser sends before a cross-origin request."""
        return (
            method == "OPTIONS"
            and "access-control-request-method" in headers
            and self.allowed_origin(headers) is not None
        )

    def preflight_headers(self, origin: str) -> list[tuple[str, str]]:
        """Headers answering a preflight from ``origin``."""
        return [
            *self._origin_headers(origin),
            ("Access-Control-Allow-Methods", ALLOW_METHODS),
            ("Access-Control-Allow-Headers", self._allow_headers),
            ("Access-Control-Max-Age", self._max_age),
        ]

    def response_headers(self, origin: str) -> list[tuple[str, str]]:
        """Headers every (non-preflight) response to ``origin`` carries."""
        return [*self._origin_headers(origin), ("Access-Control-Expose-Headers", self._expose_headers)]

    def _origin_headers(self, origin: str) -> list[tuple[str, str]]:
        # The origin is echoed rather than answered with '*' so that credentials work
        # and caches see Vary: Origin whichever list is configured.
        headers = [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
        if self._credentials:
            headers.append(("Access-Control-Allow-Credentials", "true"))
        return headers


def _joined(built_in: tuple[str, ...], added: list[str]) -> str:
    """``built_in`` and the configured ``added`` names (those not already listed, in
    any case) as one header value."""
    seen = {name.lower() for name in built_in}
    names = list(built_in)
    for name in added:
        if name.lower() not in seen:
            seen.add(name.lower())
            names.append(name)
    return ", ".join(names)
