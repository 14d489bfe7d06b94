"""The listening port of workers: chosen once by the supervisor, passed to each worker,
and never written back into the config (which stays what the operator asked for)."""

from __future__ import annotations

import copy
from pathlib import Path

from helpers import file_store_config

from tusd_py import cli
from tusd_py.config import load_config


def test_worker_port_for_port_0_is_picked_and_the_config_is_unchanged() -> None:
    config = load_config(environ={}, overrides={"server.port": 0, "server.workers": 2, "lock.backend": "file"})
    before = copy.deepcopy(config)
    port = cli.worker_port(config)
    assert 0 < port < 65536
    assert config == before


def test_worker_port_is_the_configured_one() -> None:
    assert cli.worker_port(load_config(environ={}, overrides={"server.port": 4321})) == 4321


async def test_serving_listens_on_the_given_port_and_leaves_the_config_alone(tmp_path: Path) -> None:
    config = file_store_config(tmp_path)
    before = copy.deepcopy(config)
    port = cli.worker_port(config)
    async with cli.serving(config, port=port) as running:
        assert running.port == port
        assert running.url.endswith(f":{port}")
    assert config == before
