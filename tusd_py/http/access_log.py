"""Request ids and the access log: one line per request, on the ``tusd_py.access``
logger (its fields are in ``extra`` for the JSON formatter)."""

from __future__ import annotations

import logging
import os
import random
import re
import secrets
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tusd_py.http.cycle import RequestCycle

__all__ = ["log_exchange", "log_rejected", "new_request_id", "request_id_from"]

access_log = logging.getLogger("tusd_py.access")

_REQUEST_ID_MAX = 128
_REQUEST_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def request_id_from(header: str | None) -> str:
    """The request id: the client's ``X-Request-ID`` reduced to ``[A-Za-z0-9._-]`` and
    128 characters (it ends up in logs and headers), or a random one."""
    if header:
        cleaned = _REQUEST_ID_UNSAFE.sub("", header)[:_REQUEST_ID_MAX]
        if cleaned:
            return cleaned
    return new_request_id()


_request_ids = random.Random(secrets.randbits(64))
# Forked workers must not repeat each other's ids.
os.register_at_fork(after_in_child=lambda: _request_ids.seed(secrets.randbits(64)))


def new_request_id() -> str:
    """16 random hex digits. A request id only correlates log lines, so it needs no
    cryptographic randomness: a PRNG seeded from ``secrets`` once avoids a
    ``getrandom`` system call per request."""
    return f"{_request_ids.getrandbits(64):016x}"


def log_exchange(cycle: RequestCycle, client: str) -> None:
    """The access log line of a finished request (``client``: "host:port")."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    path = cycle.target.partition("?")[0]  # query strings may carry secrets
    status = cycle.outcome
    access_log.info(
        "%s %s %s",
        cycle.method,
        path,
        status or "-",
        extra={
            "method": cycle.method,
            "path": path,
            "status": status,
            "bytes_in": cycle.bytes_in,
            "bytes_out": cycle.bytes_out,
            "duration_ms": round((time.perf_counter() - cycle.started) * 1000, 1),
            "request_id": cycle.request.request_id,
            "client": client,
        },
    )


def log_rejected(status: int, bytes_out: int, request_id: str, client: str) -> None:
    """The access log line of a request rejected before it was parsed."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    access_log.info(
        "- - %d",
        status,
        extra={
            "method": "-",
            "path": "-",
            "status": status,
            "bytes_in": 0,
            "bytes_out": bytes_out,
            "duration_ms": 0.0,
            "request_id": request_id,
            "client": client,
        },
    )
