"""`tusd-py` entry point and the composition root.

This is the only module that knows concrete classes: it builds the store, the locker,
the tus handler and the HTTP server from the config, and runs them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from tusd_py import __version__
from tusd_py.config import Config, ConfigError, load_config
from tusd_py.http.loop import new_event_loop
from tusd_py.http.server import HTTPLimits, HTTPServer
from tusd_py.lockers.base import Locker
from tusd_py.lockers.memory import MemoryLocker
from tusd_py.logs import setup_logging
from tusd_py.stores.base import Store, StoreError
from tusd_py.stores.file import FileStore
from tusd_py.tus.handler import TusHandler

log = logging.getLogger("tusd_py")


async def build_store(config: Config) -> Store:
    """The configured store; raises ``StoreError`` with a clear message when unusable."""
    if config.store.backend == "s3":
        from tusd_py.stores.s3 import S3Store

        return await S3Store.open(config.store.s3, max_size=config.server.max_size)
    return FileStore(config.store.file.directory)


def build_locker(config: Config) -> Locker:
    """The configured locker."""
    return MemoryLocker(acquire_timeout=config.lock.acquire_timeout)


def http_limits(config: Config) -> HTTPLimits:
    server = config.server
    return HTTPLimits(
        max_header_size=server.max_header_size,
        header_timeout=server.header_timeout,
        keepalive_timeout=server.keepalive_timeout,
        body_timeout=server.network_timeout,
        max_connections=server.max_connections,
        drain_limit=server.drain_limit,
    )


@dataclass
class Running:
    """A started server: where it listens and its parts (for tests and embedders)."""

    host: str
    port: int
    handler: TusHandler
    http: HTTPServer

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@contextlib.asynccontextmanager
async def serving(config: Config, *, reuse_port: bool = False) -> AsyncIterator[Running]:
    """Run tusd-py inside the current event loop until the block exits; then shut down
    gracefully (running PATCHes store what they received, within shutdown_timeout)."""
    store = await build_store(config)
    locker = build_locker(config)
    handler = TusHandler(store, locker, config)
    http = HTTPServer(handler, http_limits(config))
    try:
        port = await http.start(config.server.host, config.server.port, reuse_port=reuse_port)
        try:
            yield Running(config.server.host, port, handler, http)
        finally:
            await shutdown(http, handler, config.server.shutdown_timeout)
    finally:
        await locker.close()
        await store.close()


async def shutdown(http: HTTPServer, handler: TusHandler, grace_seconds: float) -> None:
    """Stop accepting, ask running PATCHes to store what they have, wait for them."""
    http.stop_accepting()
    handler.release_all()
    await http.stop(grace_seconds)


async def _serve_until_signal(config: Config, reuse_port: bool = False) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with serving(config, reuse_port=reuse_port) as running:
            log.info(
                "tusd-py %s listening on %s%s (store=%s, lock=%s)",
                __version__, running.url, config.server.base_path, config.store.backend, config.lock.backend,
            )
            await stop.wait()
            log.info("shutting down (up to %.0fs for running requests)", config.server.shutdown_timeout)
    except (StoreError, OSError) as error:
        log.error("cannot start: %s", error)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tusd-py",
        description=(
            "tus resumable-upload server for S3 and local disk. Configuration comes from "
            "defaults < --config FILE < TUSD_PY_* environment variables < these flags."
        ),
    )
    parser.add_argument("--version", action="version", version=f"tusd-py {__version__}")
    parser.add_argument("--config", metavar="FILE", help="TOML config file (see the shipped config.toml)")
    parser.add_argument("--host", help="listen address (server.host, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (server.port, default 1080; 0 picks a free one)")
    parser.add_argument("--base-path", help="URL path of the upload endpoint (server.base_path, default /files/)")
    parser.add_argument("--directory", help="file store directory (store.file.directory, default ./data)")
    parser.add_argument("--store", choices=["file", "s3"], help="store backend (store.backend, default file)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="log.level")
    parser.add_argument("--log-format", choices=["text", "json"], help="log.format")
    return parser


_FLAG_KEYS = {
    "host": "server.host",
    "port": "server.port",
    "base_path": "server.base_path",
    "directory": "store.file.directory",
    "store": "store.backend",
    "log_level": "log.level",
    "log_format": "log.format",
}


def config_from_args(args: argparse.Namespace) -> Config:
    overrides: dict[str, Any] = {
        key: getattr(args, flag) for flag, key in _FLAG_KEYS.items() if getattr(args, flag) is not None
    }
    return load_config(args.config, os.environ, overrides)


def _run_worker(config: Config, reuse_port: bool) -> int:
    loop = new_event_loop()
    try:
        return loop.run_until_complete(_serve_until_signal(config, reuse_port))
    finally:
        loop.close()


def _worker_main(config: Config) -> None:
    setup_logging(config.log)
    sys.exit(_run_worker(config, reuse_port=True))


def _supervise_workers(config: Config) -> int:
    """Run ``server.workers`` processes that share the port with SO_REUSEPORT (the
    kernel spreads connections between them). SIGTERM/SIGINT are passed on; each
    worker shuts down gracefully. A worker that dies is reported, not restarted: the
    service manager (systemd) restarts the whole unit."""
    if config.server.port == 0:
        # Every worker must bind the same port: pick one now.
        with socket.socket() as probe:
            probe.bind((config.server.host, 0))
            config.server.port = int(probe.getsockname()[1])
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_worker_main, args=(config,), name=f"tusd-py-worker-{index}")
               for index in range(config.server.workers)]
    for worker in workers:
        worker.start()
    log.info("started %d workers on port %d", len(workers), config.server.port)

    def forward(signum: int, _frame: object) -> None:
        for worker in workers:
            if worker.pid is not None and worker.exitcode is None:
                os.kill(worker.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    for worker in workers:
        worker.join()
        if worker.exitcode != 0:
            log.error("%s exited with %s", worker.name, worker.exitcode)
            status = 1
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as error:
        print(f"tusd-py: configuration error: {error}", file=sys.stderr)
        return 2
    setup_logging(config.log)
    if config.server.workers > 1:
        return _supervise_workers(config)
    return _run_worker(config, reuse_port=False)


if __name__ == "__main__":
    sys.exit(main())
