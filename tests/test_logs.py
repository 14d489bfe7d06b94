"""Log lines say each thing once: the access line's text form, the warning for an
unavailable pre-create hook, and the worker fields of a worker process."""

from __future__ import annotations

import io
import json
import logging
import os
import sys

import pytest

from tusd_py.config import LogConfig
from tusd_py.hooks import HookError
from tusd_py.logs import setup_logging
from tusd_py.tus.errors import ERR_HOOK_UNAVAILABLE, TusError, error_response


def _logged(monkeypatch: pytest.MonkeyPatch, log_format: str, worker: int | None = None) -> io.StringIO:
    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buffer)
    setup_logging(LogConfig(level="info", format=log_format), worker=worker)
    return buffer


def _access_line() -> None:
    logging.getLogger("tusd_py.access").info(
        "%s %s %s", "PATCH", "/files/abc", 204,
        extra={"method": "PATCH", "path": "/files/abc", "status": 204, "bytes_in": 5, "request_id": "r1"},
    )


def test_text_access_line_names_method_path_and_status_once(monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = _logged(monkeypatch, "text")
    _access_line()
    line = buffer.getvalue().strip()
    assert line.endswith("info    PATCH /files/abc 204 bytes_in=5 request_id=r1"), line
    for repeated in ("method=", "path=", "status="):
        assert repeated not in line


def test_json_access_line_keeps_the_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = _logged(monkeypatch, "json")
    _access_line()
    document = json.loads(buffer.getvalue())
    assert (document["method"], document["path"], document["status"]) == ("PATCH", "/files/abc", 204)


def test_other_loggers_keep_fields_called_status(monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = _logged(monkeypatch, "text")
    logging.getLogger("tusd_py.hooks").warning("hook answered", extra={"status": 500})
    assert buffer.getvalue().strip().endswith("hook answered status=500")


def test_unavailable_hook_is_logged_with_its_cause_not_its_code_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = _logged(monkeypatch, "text")
    try:
        raise TusError(ERR_HOOK_UNAVAILABLE) from HookError(
            "pre-create hook at http://hooks.example/ connection refused (3 attempts)", status=503
        )
    except TusError as error:
        response = error_response(error, "POST", "r2")
    assert response.status == 503
    line = buffer.getvalue().strip()
    assert "ERR_HOOK_UNAVAILABLE: ERR_HOOK_UNAVAILABLE" not in line
    assert "ERR_HOOK_UNAVAILABLE: pre-create hook at http://hooks.example/ connection refused (3 attempts)" in line


def test_an_error_without_a_cause_is_logged_with_its_message(monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = _logged(monkeypatch, "text")
    error_response(TusError(ERR_HOOK_UNAVAILABLE), "POST")
    assert f"ERR_HOOK_UNAVAILABLE: {ERR_HOOK_UNAVAILABLE.message}" in buffer.getvalue()


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_worker_s_lines_carry_its_number_and_pid(monkeypatch: pytest.MonkeyPatch, log_format: str) -> None:
    buffer = _logged(monkeypatch, log_format, worker=3)
    logging.getLogger("tusd_py").info("listening")
    line = buffer.getvalue().strip()
    if log_format == "json":
        document = json.loads(line)
        assert (document["worker"], document["pid"]) == (3, os.getpid())
    else:
        assert line.endswith(f"listening worker=3 pid={os.getpid()}")
