"""The HTTP side of hooks: POSTing an event to the operator's receiver with a
per-attempt timeout, retries with backoff, an HMAC signature and a bounded answer
(``WebhookSender``). What is sent and what an answer means is ``tusd_py.hooks``'s."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from typing import Final
from urllib.parse import urlsplit

import aiohttp

from tusd_py import __version__
from tusd_py.tus.events import HookError

log = logging.getLogger("tusd_py.hooks")

SIGNATURE_HEADER: Final = "Tusd-Py-Signature"
"""Header carrying ``sha256=<hex HMAC of the body>`` when ``hooks.secret`` is set."""
MAX_ANSWER_BYTES: Final = 64 * 1024
"""Largest hook answer read; a larger one is a failed delivery."""
MAX_RETRY_DELAY_SECONDS: Final = 30.0
"""Longest wait between two attempts, however large the backoff grows."""

# Statuses worth retrying: the receiver is overloaded or restarting.
_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


def _safe_url(url: str) -> str:
    """``url`` without credentials or query, for logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


class WebhookSender:
    """POSTs event bodies to one URL with a per-attempt timeout and retries."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        retries: int,
        retry_backoff: float,
        secret: str = "",
        max_connections: int = 100,
    ) -> None:
        self._url = url
        self.safe_url = _safe_url(url)
        self._timeout = timeout
        self._retries = retries
        self._retry_backoff = retry_backoff
        self._secret = secret.encode()
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        # Created on first use: a ClientSession belongs to the running event loop.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                # The overall bound is asyncio.timeout() per attempt; this one only
                # stops aiohttp's own 5-minute default from applying.
                timeout=aiohttp.ClientTimeout(total=None),
                headers={"User-Agent": f"tusd-py/{__version__}"},
            )
        return self._session

    async def send(self, event_type: str, body: bytes) -> bytes:
        """POST ``body``; return the answer body of the first 2xx response.

        Connection errors, timeouts and 408/425/429/5xx answers are retried after
        ``retry_backoff * 2**n`` seconds. Raises ``HookError`` (status 503) when every
        attempt failed, or (status 500) on another status or an oversized answer.
        """
        session = self._get_session()
        headers = {"Content-Type": "application/json", "Hook-Name": event_type}
        if self._secret:
            digest = hmac.new(self._secret, body, hashlib.sha256).hexdigest()
            headers[SIGNATURE_HEADER] = f"sha256={digest}"
        problem = ""
        attempts = self._retries + 1
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(min(self._retry_backoff * 2 ** (attempt - 1), MAX_RETRY_DELAY_SECONDS))
            try:
                async with asyncio.timeout(self._timeout):
                    async with session.post(self._url, data=body, headers=headers) as response:
                        answer = await _read_limited(response)
                        if 200 <= response.status < 300:
                            return answer
                        problem = f"answered {response.status}"
                        if response.status not in _RETRY_STATUSES:
                            raise HookError(f"{event_type} hook at {self.safe_url} {problem}")
            except TimeoutError:
                problem = f"did not answer within {self._timeout:g}s"
            except aiohttp.ClientError as error:
                problem = f"failed: {type(error).__name__}: {error}"
            log.debug("%s hook at %s %s (attempt %d of %d)", event_type, self.safe_url, problem, attempt + 1,
                      attempts)
        raise HookError(f"{event_type} hook at {self.safe_url} {problem} ({attempts} attempts)", status=503)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _read_limited(response: aiohttp.ClientResponse) -> bytes:
    """The response body, refusing one larger than ``MAX_ANSWER_BYTES``."""
    answer = bytearray()
    async for chunk in response.content.iter_chunked(16 * 1024):
        answer += chunk
        if len(answer) > MAX_ANSWER_BYTES:
            raise HookError(f"hook answer is larger than {MAX_ANSWER_BYTES} bytes")
    return bytes(answer)
