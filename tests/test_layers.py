"""Layer boundaries that imports would silently break: the tus protocol layer knows
hooks only through ``tus.events.UploadHooks`` and never loads the hooks' HTTP client
(aiohttp) or the HTTP layer's parser (h11)."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from tusd_py.hooks import Hooks
from tusd_py.tus.events import UploadHooks

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("module", ["tusd_py.tus.events", "tusd_py.tus.urls", "tusd_py.tus.handler"])
def test_tus_modules_load_without_aiohttp_or_h11(module: str) -> None:
    # A fresh interpreter: this one has long imported both.
    check = f"import sys, {module}; print(sorted(m for m in ('aiohttp', 'h11') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"importing {module} loaded {result.stdout.strip()}"


def test_the_server_loads_the_consul_and_redis_clients_only_when_configured() -> None:
    # Several MiB resident in every server that uses neither (idle S3 server: 92 -> 80 MiB).
    unused = ("redis", "consul", "requests", "urllib3", "tusd_py.lockers.consul", "tusd_py.lockers.redis")
    check = f"import sys, tusd_py.cli; print(sorted(m for m in {unused!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"importing tusd_py.cli loaded {result.stdout.strip()}"


def test_hooks_implement_the_protocol_the_tus_layer_uses() -> None:
    members = [name for name in vars(UploadHooks) if not name.startswith("_")]
    assert set(members) >= {"wants", "pre_create", "post_create", "post_receive", "post_finish", "post_terminate"}
    for name in members:
        expected = getattr(UploadHooks, name)
        actual = getattr(Hooks, name)
        if isinstance(expected, property):
            assert isinstance(actual, property), name
            continue
        assert inspect.iscoroutinefunction(actual) == inspect.iscoroutinefunction(expected), name
        assert list(inspect.signature(actual).parameters.values()) == list(
            inspect.signature(expected).parameters.values()
        ), name
