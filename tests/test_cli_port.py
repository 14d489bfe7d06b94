"""The listening socket: bound once by ``workers.bind_listener`` (the supervisor's,
inherited by its workers) and used by ``serving``; the config, which stays what the
operator asked for, is never changed."""

from __future__ import annotations

import copy
import errno
import socket
from pathlib import Path

import pytest
from helpers import file_store_config

from tusd_py import cli
from tusd_py.workers import bind_listener


def test_port_0_binds_a_free_port() -> None:
    with bind_listener("127.0.0.1", 0) as listener:
        assert 0 < listener.getsockname()[1] < 65536
        assert not listener.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)


def test_a_taken_port_is_one_line_address_already_in_use() -> None:
    with bind_listener("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(OSError) as error:
            bind_listener("127.0.0.1", port)
    assert error.value.errno == errno.EADDRINUSE
    assert str(error.value) == f"[Errno {errno.EADDRINUSE}] cannot listen on 127.0.0.1:{port}: address already in use"


async def test_serving_accepts_on_the_given_listener_and_leaves_the_config_alone(tmp_path: Path) -> None:
    config = file_store_config(tmp_path)
    before = copy.deepcopy(config)
    with bind_listener("127.0.0.1", 0) as listener:
        port = listener.getsockname()[1]
        async with cli.serving(config, listener=listener) as running:
            assert running.port == port
            assert running.url.endswith(f":{port}")
    assert config == before
