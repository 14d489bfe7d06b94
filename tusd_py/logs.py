"""Logging set-up: text or JSON lines on stderr.

Fields passed with ``extra={...}`` (request id, method, status, ...) appear as
``key=value`` pairs in text and as keys in JSON. Secrets never reach a log: no code
logs credentials, tokens or Authorization headers, and ``redact`` masks them where a
URL or mapping might carry one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import Any

from tusd_py.config import LogConfig

# Attributes every LogRecord has; anything else was passed through ``extra``.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

_SECRET_KEYS = re.compile(r"(token|secret|password|authorization|credential|signature)", re.IGNORECASE)


def redact(value: Any) -> Any:
    """Mask values whose key looks secret, recursively (for dicts logged as fields)."""
    if isinstance(value, dict):
        return {key: "***" if _SECRET_KEYS.search(str(key)) else redact(item) for key, item in value.items()}
    return value


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {key: redact(value) for key, value in vars(record).items() if key not in _STANDARD_ATTRS}


_IN_MESSAGE = {"tusd_py.access": frozenset({"method", "path", "status"})}
"""Fields that a logger's message already shows ("PATCH /files/x 204"): JSON keeps them
as keys for a pipeline, text leaves them out instead of saying them twice."""


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"{stamp}.{int(record.msecs):03d}Z {record.levelname.lower():7} {record.getMessage()}"
        shown = _IN_MESSAGE.get(record.name, frozenset())
        extras = {key: value for key, value in _extras(record).items() if key not in shown}
        if extras:
            line += " " + " ".join(f"{key}={value}" for key, value in extras.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        document.update(_extras(record))
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)


class _WorkerFields(logging.Filter):
    """Adds ``worker`` (its number) and ``pid`` to every record of a worker process, so
    the lines of several workers in one journal can be told apart."""

    def __init__(self, worker: int) -> None:
        super().__init__()
        self._worker = worker
        self._pid = os.getpid()

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self._worker
        record.pid = self._pid
        return True


def setup_logging(config: LogConfig, worker: int | None = None) -> None:
    """Log to stderr in ``config``'s format and level; ``worker``: the number of this
    worker process (its lines then carry ``worker`` and ``pid``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if config.format == "json" else TextFormatter())
    if worker is not None:
        handler.addFilter(_WorkerFields(worker))
    root = logging.getLogger("tusd_py")
    root.handlers[:] = [handler]
    root.setLevel(config.level.upper())
    root.propagate = False
