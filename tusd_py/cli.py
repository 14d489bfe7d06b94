"""`tusd-py` entry point and the composition root.

This is the only module that knows concrete classes: it builds the store, the locker,
the tus handler and the HTTP server from the config, and runs them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, cast

from tusd_py import __version__
from tusd_py.config import Config, ConfigError, load_config
from tusd_py.directories import check_directories, lock_directory
from tusd_py.expiry import Sweeper, SweepResult
from tusd_py.hooks import HookCallable, Hooks
from tusd_py.http.loop import new_event_loop
from tusd_py.http.server import HTTPServer
from tusd_py.http.types import Handler, Request, Response
from tusd_py.lockers.base import Locker, LockObserver, LockUnavailable
from tusd_py.lockers.file import FileLocker
from tusd_py.lockers.memory import MemoryLocker
from tusd_py.logs import setup_logging
from tusd_py.metrics import Metrics
from tusd_py.sd_notify import notify_ready, notify_stopping
from tusd_py.stores.base import Store, StoreError, SupportsExpiration
from tusd_py.stores.file import FileStore
from tusd_py.tus.cors import Cors
from tusd_py.tus.handler import TusHandler
from tusd_py.tus.options import TusOptions
from tusd_py.workers import bind_listener, supervise

if TYPE_CHECKING:  # imported when configured (build_locker)
    from tusd_py.lockers.consul import ConsulLocker
    from tusd_py.lockers.redis import RedisLocker

log = logging.getLogger("tusd_py")


async def build_store(config: Config, metrics: Metrics | None = None) -> Store:
    """The configured store; raises ``StoreError`` with a clear message when unusable.
    ``metrics`` hears S3 call timings and spool use."""
    if config.store.backend == "s3":
        from tusd_py.stores.s3 import S3Store

        return await S3Store.open(config.store.s3, max_size=config.server.max_size, observer=metrics)
    return FileStore(config.store.file.directory)


def build_locker(config: Config, observer: LockObserver | None = None, store: Store | None = None) -> Locker:
    """The configured locker; ``observer`` (the server's metrics) sees lock waits.
    ``store``: the S3 store whose client and bucket the S3 locker uses."""
    lock = config.lock
    if lock.backend == "s3":
        from tusd_py.lockers.s3 import S3Locker
        from tusd_py.stores.s3 import S3Store

        if not isinstance(store, S3Store):
            raise ConfigError("lock.backend = \"s3\" needs store.backend = \"s3\"")
        s3 = config.store.s3
        return S3Locker.from_config(
            store.client, lock.s3, s3.bucket, s3.prefix, lock.acquire_timeout, observer=observer
        )
    # The Consul and Redis lockers (and their clients: requests, urllib3, redis-py) are
    # imported only when configured: ~6 MiB of resident modules in every other server.
    if lock.backend == "consul":
        from tusd_py.lockers.consul import ConsulLocker

        return ConsulLocker.from_config(lock.consul, lock.acquire_timeout, observer=observer)
    if lock.backend == "redis":
        from tusd_py.lockers.redis import RedisLocker

        return RedisLocker.from_config(lock.redis, lock.acquire_timeout, observer=observer)
    if lock.backend == "file":
        return FileLocker(lock_directory(config), lock.acquire_timeout, observer=observer)
    return MemoryLocker(acquire_timeout=lock.acquire_timeout, observer=observer)


_LOCK_SERVICES_REACHED_LATER = {"consul": ("a Consul session", "Consul"), "redis": ("Redis", "Redis")}
"""Lock backends whose service may be unreachable at startup: what is missing, who answers."""


async def start_locker(locker: Locker, backend: str) -> None:
    """Get the locker ready before the server listens.

    A file locker that cannot use its directory stops the startup (``LockUnavailable``:
    a local misconfiguration that waiting will not fix). An unreachable Consul does
    not: the server starts, every request that needs a lock answers 503 (nothing is
    written) and creates the session as soon as Consul answers again, so a Consul
    outage during a deploy or a host reboot does not keep tusd-py down after it. The
    same for an unreachable Redis.
    """
    if isinstance(locker, FileLocker):
        await locker.start()
        return
    service = _LOCK_SERVICES_REACHED_LATER.get(backend)
    if service is None:
        return  # memory and s3 lockers have nothing to start
    try:
        await cast("ConsulLocker | RedisLocker", locker).start()
    except LockUnavailable as error:
        log.warning("starting without %s; requests get 503 until %s answers: %s", service[0], service[1], error)


HookCallables = Mapping[str, HookCallable | Iterable[HookCallable]]
"""Embedders' hooks for ``serving``: event name -> one async callable or several."""


def build_hooks(config: Config, metrics: Metrics | None, callables: HookCallables | None = None) -> Hooks:
    """Hooks from ``[hooks]`` (the webhook) plus the embedder's Python callables."""
    hooks = Hooks(config.hooks, metrics=metrics)
    for event, functions in (callables or {}).items():
        for function in [functions] if callable(functions) else functions:
            hooks.on(event, function)
    return hooks


def with_metrics_endpoint(handler: Handler, path: str, render: Callable[[], tuple[bytes, str]]) -> Handler:
    """``handler`` with ``GET path`` answered by ``render()`` (body, content type)."""

    async def application(request: Request) -> Response:
        if request.target.partition("?")[0] != path:
            return await handler(request)
        if request.method not in ("GET", "HEAD"):
            return Response(405, [("Allow", "GET, HEAD"), ("Content-Type", "text/plain; charset=utf-8")],
                            b"405 Method Not Allowed\n")
        body, content_type = render()
        return Response(200, [("Content-Type", content_type), ("Cache-Control", "no-store")], body)

    return application


def tus_options(config: Config) -> TusOptions:
    """The tus handler's frozen settings, from the configuration."""
    server = config.server
    return TusOptions(
        base_path=server.base_path if server.base_path.endswith("/") else server.base_path + "/",
        behind_proxy=server.behind_proxy,
        max_size=int(server.max_size),
        lifetime=config.expiration.lifetime,
        checksum_max_buffered_size=int(config.checksum.max_buffered_size),
        checksum_spool_dir=config.checksum.spool_dir,
        cors=Cors(config.cors),
        interim_responses=server.sends_interim_responses(),
    )


@dataclass
class Running:
    """A started server: where it listens and its parts (for tests and embedders)."""

    host: str
    port: int
    handler: TusHandler
    http: HTTPServer
    metrics: Metrics
    hooks: Hooks

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


# At shutdown, pending post-* hook deliveries get this long after the last request.
HOOKS_DRAIN_SECONDS = 5.0


@contextlib.asynccontextmanager
async def serving(
    config: Config,
    *,
    hooks: Hooks | HookCallables | None = None,
    listener: socket.socket | None = None,
) -> AsyncIterator[Running]:
    """Run tusd-py inside the current event loop until the block exits; then shut down
    gracefully (running PATCHes store what they received, within shutdown_timeout).

    ``hooks``: Python callables by event (``{"post-finish": fn}``, see
    ``tusd_py.hooks``), added to the ``[hooks]`` webhook; or a ``Hooks`` object, which
    is then used as is (its owner closes it).

    ``listener``: accept on this bound socket (``workers.bind_listener``; a supervisor's
    workers share one) instead of binding ``server.host``/``server.port``.
    """
    metrics = Metrics()
    owned_hooks = not isinstance(hooks, Hooks)
    the_hooks = hooks if isinstance(hooks, Hooks) else build_hooks(config, metrics, hooks)
    store = await build_store(config, metrics)
    try:
        locker = build_locker(config, metrics, store)
        try:
            await start_locker(locker, config.lock.backend)
            handler = TusHandler(store, locker, tus_options(config), hooks=the_hooks, metrics=metrics)
            application: Handler = handler
            if config.metrics.enabled:
                application = with_metrics_endpoint(handler, config.metrics.path, metrics.render)
            http = HTTPServer(application, config.server.http_limits(), observer=metrics)
            bound_port = await http.start(config.server.host, config.server.port, sock=listener)
            sweeper = start_sweeper(config, store, locker)
            try:
                yield Running(config.server.host, bound_port, handler, http, metrics, the_hooks)
            finally:
                await stop_sweeper(sweeper)
                await shutdown(http, handler, config.server.shutdown_timeout)
        finally:
            await locker.close()
    finally:
        try:
            await store.close()
        finally:
            if owned_hooks:
                await the_hooks.close(HOOKS_DRAIN_SECONDS)


def start_sweeper(config: Config, store: Store, locker: Locker) -> asyncio.Task[None] | None:
    """The in-server expiry sweeper (``expiration.sweep_interval`` > 0 and a store that
    can expire uploads), or None."""
    interval = config.expiration.sweep_interval
    if interval <= 0:
        return None
    if not isinstance(store, SupportsExpiration):
        log.warning("expiration.sweep_interval is set but the %s store cannot expire uploads", config.store.backend)
        return None
    sweeper = Sweeper(store, locker, orphan_grace=config.expiration.orphan_grace)
    return asyncio.create_task(sweeper.run(interval), name="tusd-py-expiry-sweeper")


SWEEPER_CANCEL_RETRY_SECONDS = 1.0
"""How long ``stop_sweeper`` waits before cancelling the sweeper again."""


async def stop_sweeper(task: asyncio.Task[None] | None) -> None:
    """Cancel the sweeper and wait for it. Cancelled again while it runs on: inside a
    sweep, Python 3.11's ``wait_for`` can lose a cancellation (its inner call ended at
    the same moment), and the sweeper would sleep until its next sweep instead."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=SWEEPER_CANCEL_RETRY_SECONDS)
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def cleanup(config: Config) -> SweepResult:
    """``tusd-py cleanup``: one sweep of expired uploads and orphans, under the
    configured locker (so a running server's requests are respected)."""
    store = await build_store(config)
    try:
        if not isinstance(store, SupportsExpiration):
            raise StoreError(f"the {config.store.backend} store cannot expire uploads")
        locker = build_locker(config, store=store)
        try:
            await start_locker(locker, config.lock.backend)
            if config.lock.backend == "memory":
                log.warning(
                    "lock.backend is \"memory\": cleanup cannot see the locks of a running server. Run it while "
                    "the server is stopped, use lock.backend \"file\", \"consul\" or \"redis\", or let the server "
                    "sweep (expiration.sweep_interval)"
                )
            return await Sweeper(store, locker, orphan_grace=config.expiration.orphan_grace).sweep()
        finally:
            await locker.close()
    finally:
        await store.close()


def _run_cleanup(config: Config) -> int:
    loop = new_event_loop()
    try:
        result = loop.run_until_complete(cleanup(config))
    except (StoreError, LockUnavailable, OSError) as error:
        log.error("cleanup failed: %s", error)
        return 1
    finally:
        loop.close()
    print(f"removed {result.expired} expired uploads and {result.orphans} orphans"
          + (f"; {result.skipped} expired uploads could not be removed (see the log)" if result.skipped else ""))
    return 1 if result.skipped else 0


async def shutdown(http: HTTPServer, handler: TusHandler, grace_seconds: float) -> None:
    """Stop accepting, ask running PATCHes to store what they have, wait for them."""
    http.stop_accepting()
    handler.release_all()
    await http.stop(grace_seconds)


async def _serve_until_signal(
    config: Config, listener: socket.socket, on_ready: Callable[[], object] | None = None
) -> int:
    """Serve on ``listener`` until SIGTERM/SIGINT. ``on_ready`` is called once the
    server listens; without it, systemd is notified (``Type=notify``) by this process."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with serving(config, listener=listener) as running:
            log.info(
                "tusd-py %s listening on %s%s (store=%s, lock=%s)",
                __version__, running.url, config.server.base_path, config.store.backend, config.lock.backend,
            )
            if on_ready is not None:
                on_ready()
            else:
                notify_ready(f"listening on {running.url}")
            await stop.wait()
            if on_ready is None:
                notify_stopping()
            log.info("shutting down (up to %.0fs for running requests)", config.server.shutdown_timeout)
    except (StoreError, LockUnavailable, OSError) as error:
        log.error("cannot start: %s", error)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tusd-py",
        # argparse would print the optional command as a required "COMMAND ...".
        usage="%(prog)s [options]            serve\n       %(prog)s [options] cleanup    sweep once and exit",
        description=(
            "tus resumable-upload server for S3 and local disk. Without a command it serves; "
            "`tusd-py cleanup` removes expired uploads and orphaned storage once and exits. "
            "Configuration comes from defaults < --config FILE < TUSD_PY_* environment "
            "variables < these flags."
        ),
    )
    parser.add_argument("--version", action="version", version=f"tusd-py {__version__}")
    parser.add_argument("--host", help="listen address (server.host, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (server.port, default 1080; 0 picks a free one)")
    parser.add_argument("--base-path", help="URL path of the upload endpoint (server.base_path, default /files/)")
    _add_store_flags(parser, None)
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    cleanup = commands.add_parser(
        "cleanup",
        prog="tusd-py cleanup",
        help="remove expired uploads and orphaned storage once, then exit (e.g. from a systemd timer)",
        description=(
            "Remove unfinished uploads whose expiry time passed (expiration.lifetime) and storage "
            "without an info document older than expiration.orphan_grace, under the configured "
            "lock (use lock.backend \"file\", \"consul\" or \"redis\" while a server runs). Exit status 1 "
            "when something could not be removed."
        ),
    )
    # SUPPRESS: given after the command they override, absent they keep the main values.
    _add_store_flags(cleanup, argparse.SUPPRESS)
    return parser


def _add_store_flags(parser: argparse.ArgumentParser, default: str | None) -> None:
    """The flags serving and ``cleanup`` share."""
    parser.add_argument("--config", metavar="FILE", default=default,
                        help="TOML config file (see the shipped config.toml)")
    parser.add_argument("--directory", default=default,
                        help="file store directory (store.file.directory, default ./data)")
    parser.add_argument("--store", choices=["file", "s3"], default=default,
                        help="store backend (store.backend, default file)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=default,
                        help="log.level")
    parser.add_argument("--log-format", choices=["text", "json"], default=default, help="log.format")


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


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MALLOC_MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024
"""Allocations below this come from the heap, not from their own mmap."""
MALLOC_TRIM_THRESHOLD_BYTES = 32 * 1024 * 1024
"""Free memory at the top of the heap kept instead of returned to the kernel."""


def tune_malloc() -> None:
    """Keep 1 MiB body chunks out of mmap (glibc only; a no-op elsewhere).

    Every body read allocates a 1 MiB bytes object. With glibc's defaults such a block
    gets its own mmap, or heap memory that is trimmed back to the kernel when freed,
    so the churn of chunks costs fresh zeroed pages: ~95k minor page faults per GiB
    received (measured on the ingest benchmark). Fixed thresholds make those chunks
    reuse heap memory; the heap still shrinks once more than 32 MiB is free at its top.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no mallopt thresholds)
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES)
    mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD_BYTES)


def _run_worker(config: Config, listener: socket.socket, on_ready: Callable[[], object] | None = None) -> int:
    tune_malloc()
    loop = new_event_loop()
    try:
        return loop.run_until_complete(_serve_until_signal(config, listener, on_ready))
    finally:
        loop.close()


def _worker_main(config: Config, listener: socket.socket, number: int, ready: Connection) -> None:
    """A worker process of ``workers.supervise`` (spawned: it starts from here)."""
    setup_logging(config.log, worker=number)

    def report_ready() -> None:
        # The supervisor (systemd's main process) notifies systemd once all are up.
        with contextlib.suppress(OSError):  # a supervisor that gave up closed its end
            ready.send(os.getpid())
        ready.close()

    sys.exit(_run_worker(config, listener, on_ready=report_ready))


def _serve(config: Config) -> int:
    """Check the directories, bind the port once, then serve: in this process, or in
    ``server.workers`` processes that share the socket."""
    try:
        check_directories(config)
        listener = bind_listener(config.server.host, config.server.port)
    except (ConfigError, OSError) as error:
        # An OSError of bind_listener says it all in strerror, without "[Errno 98]".
        log.error("cannot start: %s", getattr(error, "strerror", None) or error)
        return 1
    if config.server.workers > 1:
        return supervise(config, listener, _worker_main)
    return _run_worker(config, listener)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as error:
        print(f"tusd-py: configuration error: {error}", file=sys.stderr)
        return 2
    setup_logging(config.log)
    if args.command == "cleanup":
        return _run_cleanup(config)
    return _serve(config)


if __name__ == "__main__":
    sys.exit(main())
