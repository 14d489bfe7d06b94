"""The shipped systemd unit: ``systemd-analyze verify`` accepts it without a single
warning, its sandbox scores "OK" in ``systemd-analyze security``, and the settings the
operations guide promises are there. Also the tiny sd_notify client.

``systemd-analyze`` (Debian package ``systemd``) is required in CI (CI=true): there a
missing tool fails the test instead of skipping it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tusd_py import sd_notify

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "tusd-py.service"
INSTALLED_PATH = "/usr/local/bin/tusd-py"


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is missing in CI: .ci/run must `apt-get install -y systemd`")
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    return path


def settings() -> dict[str, list[str]]:
    """``Key -> [values]`` of the unit (comments and section headers dropped)."""
    result: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        result.setdefault(key.strip(), []).append(value.strip())
    return result


def console_script(tmp_path: Path) -> Path:
    """The ``tusd-py`` script that ``pip install`` put beside this interpreter (found
    whatever ``which`` says, e.g. behind pyenv shims); a stub when not installed, since
    verify only checks that ExecStart names an executable file."""
    installed = Path(sys.executable).parent / "tusd-py"
    if installed.is_file() and os.access(installed, os.X_OK):
        return installed
    stub = tmp_path / "bin" / "tusd-py"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    return stub


def unit_for_this_machine(tmp_path: Path) -> Path:
    """A copy of the unit whose ExecStart names an executable that exists here (the
    shipped one assumes /usr/local/bin/tusd-py, which a test machine may not have)."""
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_PATH} " in text
    copy = tmp_path / "tusd-py.service"  # verify derives the unit name from the file name
    copy.write_text(text.replace(f"ExecStart={INSTALLED_PATH} ", f"ExecStart={console_script(tmp_path)} "))
    return copy


def test_unit_verifies_without_warnings(tmp_path: Path) -> None:
    tool = systemd_analyze()
    unit = unit_for_this_machine(tmp_path)
    result = subprocess.run(
        [tool, "verify", "--man=no", "--generators=no", str(unit)],
        capture_output=True, text=True, timeout=60,
    )
    # verify exits 0 even for unknown keys or bad values ("... ignoring"): any line
    # about our unit is a failure.
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "tusd-py" in line]
    assert result.returncode == 0, result.stdout + result.stderr
    assert ours == []


def test_unit_sandbox_scores_ok(tmp_path: Path) -> None:
    tool = systemd_analyze()
    unit = unit_for_this_machine(tmp_path)
    # --threshold: exit non-zero when the exposure score is above it, in tenths
    # (20 = 2.0 of 10; "OK" is below 2.5). The shipped unit scores 1.1.
    result = subprocess.run(
        [tool, "security", "--offline=true", "--threshold=20", str(unit)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


def test_unit_has_the_promised_settings() -> None:
    unit = settings()
    assert unit["ExecStart"] == [f"{INSTALLED_PATH} --config /etc/tusd-py/config.toml"]
    expected = {
        "DynamicUser": "yes",
        "StateDirectory": "tusd-py",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "NoNewPrivileges": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "Restart": "on-failure",
        "LimitNOFILE": "65536",
        "KillSignal": "SIGTERM",
        "CapabilityBoundingSet": "",
    }
    for key, value in expected.items():
        assert unit.get(key) == [value], key
    assert "@system-service" in unit["SystemCallFilter"]
    assert "TUSD_PY_STORE_FILE_DIRECTORY=/var/lib/tusd-py" in unit["Environment"]
    assert unit["Type"] in (["exec"], ["notify"])
    assert "RestartSec" in unit


def test_stop_timeout_leaves_room_for_graceful_shutdown() -> None:
    from tusd_py.config import ServerConfig

    stop_timeout = float(settings()["TimeoutStopSec"][0])
    assert stop_timeout >= ServerConfig().shutdown_timeout + 10


def test_environment_names_real_config_keys() -> None:
    from tusd_py.config import all_keys, env_name

    known = {env_name(key) for key in all_keys()}
    for assignment in settings()["Environment"]:
        name = assignment.split("=", 1)[0]
        if name in PROCESS_ENVIRONMENT:
            continue
        assert name in known, f"{name} is not a tusd-py config variable"


PROCESS_ENVIRONMENT = {"MALLOC_ARENA_MAX"}
"""Variables the unit sets for the process itself (glibc), not tusd-py settings."""


# --- sd_notify ----------------------------------------------------------------------


def test_notify_without_systemd_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify.notify_ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert sd_notify.notify_ready() is False


def test_notify_to_a_path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(path)
        listener.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert sd_notify.notify_ready("listening on 127.0.0.1:1080") is True
        assert listener.recv(4096) == b"READY=1\nSTATUS=listening on 127.0.0.1:1080"
        assert sd_notify.notify_stopping() is True
        assert listener.recv(4096) == b"STOPPING=1"


def test_notify_to_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"tusd-py-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd_notify.notify_ready() is True
        assert listener.recv(4096) == b"READY=1"


def test_notify_never_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert sd_notify.notify_ready() is False
