"""Bounds of the HTTP layer, each with its unit and the reason for its default.

Re-exported as ``tusd_py.http.server.HTTPLimits`` (the name the composition root uses).
These defaults are the only ones: the ``[server]`` config keys that set the limits
(``tusd_py.config.ServerConfig``) start from them; ``config.toml`` shows them.
"""

from __future__ import annotations

from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True, slots=True)
class HTTPLimits:
    """Every limit the HTTP layer enforces. All have production defaults."""

    max_header_size: int = 16 * KiB
    """Bytes: request line plus headers. Larger -> ``431`` and close. 16 KiB fits any
    tus request (metadata included) with room to spare, like nginx's large buffers."""

    header_timeout: float = 10.0
    """Seconds to receive a complete request head once it started (or from accept).
    Exceeded -> ``408`` and close; protects against slowloris-style clients."""

    keepalive_timeout: float = 75.0
    """Seconds an idle keep-alive connection is kept open between requests. Longer than
    nginx's default upstream ``keepalive_timeout`` (60 s), so a reverse proxy in front
    closes an idle connection first and never sends a request on one we are closing."""

    body_timeout: float = 60.0
    """Seconds the application may wait for the next body byte before the body
    iterator raises ``BodyTimeout`` (a half-open client must not hold a lock forever)."""

    max_connections: int = 10_000
    """Open connections; one more is closed right at accept (file descriptors and
    memory stay bounded)."""

    drain_limit: int = 1 * MiB
    """Bytes: after the handler answered without reading the whole body, read and
    discard at most this much to keep the connection; a longer body closes it."""

    drain_timeout: float = 5.0
    """Seconds the drain described above may take before the connection is closed."""

    body_high_water: int = 256 * KiB
    """Bytes of received but unread body above which reading from the socket pauses,
    so a slow store slows the client instead of filling memory. Reading pauses after
    the read that crossed the mark, so an upload waiting for its store holds up to
    this plus one body read (256 KiB); the kernel's socket buffer keeps the client
    sending meanwhile. 256 KiB rather than 1 MiB: 16 concurrent uploads to the S3
    store peaked 11 MiB lower (218 -> 207 MiB), same CPU per GiB (S3 benchmark)."""

    body_low_water: int = 256 * KiB
    """Bytes of unread body below which reading resumes. The gap between the marks
    avoids pausing and resuming the transport on every chunk."""

    def __post_init__(self) -> None:
        if self.body_low_water > self.body_high_water:
            raise ValueError("body_low_water must not exceed body_high_water")
        for name in ("max_header_size", "max_connections", "body_high_water"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("header_timeout", "keepalive_timeout", "body_timeout", "drain_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.drain_limit < 0 or self.body_low_water < 0:
            raise ValueError("drain_limit and body_low_water must not be negative")
