"""One host, several worker processes: one ``python -m tusd_py.cli --config FILE``
command with ``server.workers = 2`` (a supervisor and two workers sharing the port
with SO_REUSEPORT), the S3 store on moto and the file locker (flock plus Unix datagram
release requests) in its default directory.

The kernel spreads connections over the workers; no response says which worker
answered, so the tests open many connections (several scenarios at once) and assert on
behaviour: the scenarios are those of test_multi_instance.py with both "instances" on
the one port.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests import nginx_support
from tests.instances import (
    Instance,
    MiB,
    merged,
    running,
    s3_settings,
    scenario_concurrent_patches,
    scenario_interrupted_uploads,
    scenario_takeover,
)


@pytest.fixture
def temp_dir() -> Iterator[Path]:
    """The workers' TMPDIR. Short on purpose: the lock sockets' paths must fit in
    sun_path to show up as files (longer ones go to the abstract namespace)."""
    directory = Path(tempfile.mkdtemp(prefix="tusd-w-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _lock_socket_owners(temp_dir: Path) -> set[str]:
    """Pids of the processes with a release socket in the (one) lock directory."""
    [lock_directory] = temp_dir.glob("tusd-py-locks-*")
    return {path.name.split("-")[1] for path in lock_directory.glob(".sock-*")}


@pytest.fixture
async def server(tmp_path: Path, temp_dir: Path, moto_endpoint: str, bucket: str) -> AsyncIterator[Instance]:
    settings = merged(
        s3_settings(moto_endpoint, bucket),
        {"server": {"workers": 2, "behind_proxy": True}, "lock": {"backend": "file"}},
    )
    async with running(tmp_path, {"workers": settings}, {"TMPDIR": str(temp_dir)}) as [instance]:
        # lock.file.directory is empty: with S3 the default is a per-bucket directory
        # in the temp dir. Each worker built its own FileLocker after the spawn and
        # bound its release socket there at startup (cli.start_locker).
        owners = _lock_socket_owners(temp_dir)
        assert len(owners) == 2 and str(instance.process.pid) not in owners, owners
        yield instance


async def test_concurrent_patches_through_two_workers_never_interleave(
    server: Instance, moto_endpoint: str, bucket: str
) -> None:
    # Three races at once: six connections, spread over the workers by the kernel.
    await asyncio.gather(*(
        scenario_concurrent_patches(server.port, server.port, moto_endpoint, bucket, 6 * MiB, seed=100 + index)
        for index in range(3)
    ))


async def test_stalled_patch_is_taken_over_through_another_connection(
    server: Instance, moto_endpoint: str, bucket: str
) -> None:
    await asyncio.gather(*(
        scenario_takeover(server.port, server.port, moto_endpoint, bucket, seed=200 + index) for index in range(3)
    ))


async def test_interrupted_uploads_through_nginx(
    nginx_installed: None, server: Instance, moto_endpoint: str, bucket: str
) -> None:
    with nginx_support.run_nginx([f"127.0.0.1:{server.port}"]) as nginx:
        interruptions = await scenario_interrupted_uploads(nginx.port, moto_endpoint, bucket, count=20, seed=300)
    assert interruptions >= 10
