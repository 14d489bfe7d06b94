"""What the tus handler needs to know of the server's configuration, frozen.

The composition root (``cli.tus_options``) builds one ``TusOptions`` from the
``Config``; the handler never sees the whole configuration, and nothing it holds can
change while it runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from tusd_py.tus.cors import Cors


@dataclass(frozen=True, slots=True)
class TusOptions:
    """The tus handler's settings (see ``config.toml`` for each one's meaning)."""

    base_path: str
    """URL path of the upload collection; ends with ``/``."""
    behind_proxy: bool
    """Trust ``Forwarded``/``X-Forwarded-*`` for the client's view of the URL."""
    max_size: int
    """Largest upload in bytes (``Tus-Max-Size``); 0: no limit."""
    lifetime: float
    """Seconds an unfinished upload lives (``expiration``); 0: forever."""
    checksum_max_buffered_size: int
    """Largest body that may carry ``Upload-Checksum`` (held until verified)."""
    checksum_spool_dir: str
    """Where such bodies are held; empty: the system temp directory."""
    cors: Cors
    """Which browser origins may use the API."""
    interim_responses: bool
    """Send the IETF draft's 104 interim response (``server.interim_responses``)."""

    def __post_init__(self) -> None:
        if not self.base_path.endswith("/"):
            raise ValueError(f"base_path must end with '/': {self.base_path!r}")
