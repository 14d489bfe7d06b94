"""The README's operator guide stays complete: its key table names every config key
with the default the code has (config.toml is checked the same way in test_config.py)."""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from tusd_py.config import Config, all_keys, parse_size

README = Path(__file__).resolve().parent.parent / "README.md"
_ROW = re.compile(r"^\| `([a-z0-9_.]+)` \| `([^`]*)` \|", re.MULTILINE)


def test_key_table_lists_every_key_with_its_default() -> None:
    rows = dict(_ROW.findall(README.read_text()))
    assert set(rows) == set(all_keys()), "README's key table and config.py disagree on keys"
    defaults = Config()
    for key, literal in rows.items():
        section_path, name = key.rsplit(".", 1)
        section: object = defaults
        for part in section_path.split("."):
            section = getattr(section, part)
        value = tomllib.loads(f"value = {literal}")["value"]
        expected = getattr(section, name)
        if isinstance(value, str) and not isinstance(expected, str):
            value = parse_size(value, key)
        assert value == expected, f"README shows {key} = {literal}, the default is {expected!r}"


def test_quick_start_is_two_commands() -> None:
    text = README.read_text()
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", quick_start, re.DOTALL)
    assert blocks == ["pip install -c constraints.txt -e . && tusd-py\n", "bash .ci/run\n"]


def _section(title: str) -> str:
    return README.read_text().split(f"\n### {title}\n", 1)[1].split("\n#", 1)[0]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_until_ready(notify: socket.socket, process: subprocess.Popen[bytes]) -> None:
    """Until tusd-py sends READY=1 (or fails the test if the commands end first)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the commands exited with {process.returncode} before tusd-py was ready")
        notify.settimeout(1.0)
        try:
            message = notify.recv(4096).decode()
        except TimeoutError:
            continue
        if "READY=1" in message.splitlines():
            return
    pytest.fail("tusd-py was not ready within 60 s")


def test_try_s3_locally_commands_work(tmp_path: Path) -> None:
    """The recipe's two blocks, as written, in bash: the first (moto, the bucket,
    tusd-py) until tusd-py is ready, then the second (an upload through tusd-py, read
    back from the bucket). The ports are swapped for free ones, `pip install` is what
    this environment already did, and `tusd-py` runs this checkout."""
    serve, upload = re.findall(r"```sh\n(.*?)```", _section("Try S3 locally"), re.DOTALL)
    assert serve.startswith("pip install 'moto[server,s3]'\n")
    serve = serve.split("\n", 1)[1]
    ports = {"5000": str(_free_port()), "1080": str(_free_port())}
    for default, port in ports.items():
        serve, upload = serve.replace(f":{default}", f":{port}"), upload.replace(f":{default}", f":{port}")
        serve = serve.replace(f"-p {default}", f"-p {port}")
    assert ports["5000"] in serve and ports["1080"] in upload
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "tusd-py"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m tusd_py.cli "$@"\n')
    wrapper.chmod(0o755)
    notify_name = f"tusd-py-readme-{secrets.token_hex(6)}"
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("AWS_", "TUSD_PY_")) and key != "NOTIFY_SOCKET"}
    env.update({
        "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONPATH": str(README.parent),
        "TUSD_PY_SERVER_PORT": ports["1080"],
        "NOTIFY_SOCKET": "@" + notify_name,
    })
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind("\0" + notify_name)
        server = subprocess.Popen(["bash", "-euc", serve], cwd=tmp_path, env=env, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_until_ready(notify, server)
            result = subprocess.run(["bash", "-euc", upload], cwd=tmp_path, env=env, capture_output=True,
                                    text=True, timeout=60)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello world\n"
