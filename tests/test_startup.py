"""Start-up of the ``tusd-py`` command as an operator meets it: every way it cannot
start is one line on stderr and a non-zero exit, before systemd hears READY=1.

- A taken port, whatever ``server.workers``: the supervisor binds the socket once (no
  SO_REUSEPORT), so a second tusd-py cannot silently share a first one's port.
- A directory the server must write in but cannot. The tests run as root, whom file
  modes do not stop, so the unwritable directory is ``/sys/kernel``: sysfs refuses new
  files to everyone ("Permission denied"), like a directory the service user may not
  write. A path below a regular file ("Not a directory") is the other case.
- A worker that cannot start: its own line (with its number and pid), one line of
  the supervisor's, no traceback, and no "started".
- What is not a reason to stop: a Redis or Consul that does not answer yet (the
  server starts, logs one warning, and answers 503 where it needs a lock).
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.instances import ROOT, START_TIMEOUT, Settings, merged, running, s3_settings, toml_text
from tests.rawhttp import request

UNWRITABLE = "/sys/kernel"
"""A directory that exists and in which not even root can create a file."""

_LINE = re.compile(r"^\S+Z (\w+) +(.*)$")


def _user() -> str:
    return f"{pwd.getpwuid(os.geteuid()).pw_name} (uid {os.geteuid()})"


async def run_to_exit(directory: Path, name: str, settings: Settings) -> tuple[int, list[str]]:
    """Run ``tusd-py --config <name>.toml`` until it exits (it must, within
    START_TIMEOUT); its status and its stderr+stdout lines."""
    config_path = directory / f"{name}.toml"
    config_path.write_text(toml_text(settings))
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tusd_py.cli", "--config", str(config_path),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        cwd=directory, env=env, start_new_session=True,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), START_TIMEOUT)
    except TimeoutError:
        # The whole group: workers that outlive their supervisor hold the pipe open.
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = await process.communicate()
        pytest.fail(f"tusd-py did not exit (it should not have started):\n{output.decode(errors='replace')}")
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace").splitlines()


def _file_settings(directory: Path, **server: Any) -> dict[str, dict[str, Any]]:
    return {
        "server": {"host": "127.0.0.1", "port": 0, "shutdown_timeout": 5, **server},
        "store.file": {"directory": str(directory)},
        "lock": {"backend": "file"},
    }


def _only_line(lines: list[str]) -> tuple[str, str]:
    assert len(lines) == 1, "\n".join(lines)
    match = _LINE.match(lines[0])
    assert match is not None, lines[0]
    return match.group(1), match.group(2)


# --- item: a taken port ----------------------------------------------------------------

def _in_use(port: int) -> str:
    return f"cannot start: cannot listen on 127.0.0.1:{port}: address already in use"


@pytest.mark.parametrize("first_workers", [2, 1])
async def test_a_second_server_with_workers_cannot_share_a_taken_port(tmp_path: Path, first_workers: int) -> None:
    first_settings = _file_settings(tmp_path / "first", workers=first_workers)
    async with running(tmp_path, {"first": first_settings}) as [first]:
        status, lines = await run_to_exit(tmp_path, "second", _file_settings(
            tmp_path / "second", port=first.port, workers=2
        ))
    assert status == 1
    assert _only_line(lines) == ("error", _in_use(first.port))


async def test_a_single_worker_on_a_taken_port_says_the_same(tmp_path: Path) -> None:
    first_settings = _file_settings(tmp_path / "first")
    async with running(tmp_path, {"first": first_settings}) as [first]:
        status, lines = await run_to_exit(tmp_path, "second", _file_settings(tmp_path / "second", port=first.port))
    assert status == 1
    assert _only_line(lines) == ("error", _in_use(first.port))


# --- item: directories checked at start-up ---------------------------------------------

_UNREACHABLE_S3: Mapping[str, Mapping[str, Any]] = {
    # Never contacted: the directory check comes first.
    "store": {"backend": "s3"},
    "store.s3": {"bucket": "never-used", "endpoint_url": "http://127.0.0.1:9", "region": "us-east-1"},
}


@pytest.mark.parametrize(("what", "key", "layer"), [
    ("data", "store.file.directory", {"store.file": {"directory": UNWRITABLE}}),
    ("lock", "lock.file.directory", {"lock.file": {"directory": UNWRITABLE}}),
    ("checksum", "checksum.spool_dir", {"checksum": {"spool_dir": UNWRITABLE}}),
    ("spool", "store.s3.spool_dir", merged(_UNREACHABLE_S3, {"store.s3": {"spool_dir": UNWRITABLE}})),
])
@pytest.mark.parametrize("workers", [1, 2])
async def test_an_unwritable_directory_stops_the_start(
    tmp_path: Path, what: str, key: str, layer: Settings, workers: int
) -> None:
    settings = merged(_file_settings(tmp_path / "data", workers=workers), layer)
    status, lines = await run_to_exit(tmp_path, "server", settings)
    assert status == 1
    assert _only_line(lines) == (
        "error",
        f"cannot start: the {what} directory {UNWRITABLE} ({key}) is not writable by user {_user()}: "
        "Permission denied",
    )


async def test_a_directory_below_a_file_stops_the_start(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    settings = merged(_file_settings(tmp_path / "data"), {"checksum": {"spool_dir": str(tmp_path / "a-file" / "x")}})
    status, lines = await run_to_exit(tmp_path, "server", settings)
    assert status == 1
    assert _only_line(lines) == (
        "error",
        f"cannot start: the checksum directory {tmp_path / 'a-file' / 'x'} (checksum.spool_dir) is not writable "
        f"by user {_user()}: Not a directory",
    )


async def test_missing_directories_are_created(tmp_path: Path) -> None:
    settings = merged(_file_settings(tmp_path / "new" / "data"), {"checksum": {"spool_dir": str(tmp_path / "cs")}})
    async with running(tmp_path, {"server": settings}):
        assert (tmp_path / "new" / "data" / ".locks").is_dir() and (tmp_path / "cs").is_dir()


# --- item: workers that cannot start, and "started" -----------------------------------

async def test_workers_that_cannot_start_say_why_in_one_line_each(tmp_path: Path, moto_endpoint: str) -> None:
    settings = merged(
        s3_settings(moto_endpoint, "no-such-bucket"),
        {"server": {"workers": 2}, "lock": {"backend": "file"}, "lock.file": {"directory": str(tmp_path / "locks")}},
    )
    status, lines = await run_to_exit(tmp_path, "server", settings)
    output = "\n".join(lines)
    assert status == 1, output
    assert "Traceback" not in output and "EOFError" not in output
    assert not any("started" in line and "not started" not in line for line in lines), output
    parsed = [_LINE.match(line) for line in lines]
    assert all(parsed), output
    worker_lines = [m.group(2) for m in parsed if m and "cannot start" in m.group(2)]
    supervisor_lines = [m.group(2) for m in parsed if m and m.group(2).startswith("not started: ")]
    assert len(lines) == len(worker_lines) + len(supervisor_lines), output
    assert len(worker_lines) == 2 and len(supervisor_lines) == 1, output
    numbers = set()
    for line in worker_lines:
        found = re.search(r"no-such-bucket.* worker=(\d) pid=(\d+)$", line)
        assert found is not None, line
        numbers.add(found.group(1))
        assert f"worker {found.group(1)} (pid {found.group(2)})" in supervisor_lines[0]
    assert len(numbers) == len(worker_lines)


async def test_started_is_logged_once_every_worker_listens(tmp_path: Path) -> None:
    async with running(tmp_path, {"server": _file_settings(tmp_path / "data", workers=3)}) as [server]:
        lines = server.log().splitlines()
    started = [index for index, line in enumerate(lines) if "started 3 workers" in line]
    listening = [index for index, line in enumerate(lines) if " listening on " in line]
    assert len(started) == 1 and len(listening) == 3, lines
    assert max(listening) < started[0]
    numbers = sorted(re.search(r" worker=(\d) pid=\d+$", lines[index]).group(1)  # type: ignore[union-attr]
                     for index in listening)
    assert numbers == ["1", "2", "3"]


@pytest.mark.parametrize(("backend", "layer", "missing"), [
    ("redis", {"lock.redis": {"url": "redis://127.0.0.1:1/0"}}, "starting without Redis; requests get 503"),
    ("consul", {"lock.consul": {"address": "127.0.0.1:1"}}, "starting without a Consul session; requests get 503"),
])
async def test_an_unreachable_lock_service_does_not_stop_the_start(
    tmp_path: Path, backend: str, layer: Settings, missing: str
) -> None:
    """The lock service may come back after the server: it starts, says so in one line,
    and answers 503 to what needs a lock."""
    settings = merged(_file_settings(tmp_path / "data"), {"lock": {"backend": backend}}, layer)
    async with running(tmp_path, {"server": settings}) as (server,):
        answer = await request(server.port, "POST", "/files/", {"Upload-Length": "10"})
        assert answer.status == 503, answer
        assert missing in server.log()
