"""The listening socket, and the supervisor of ``server.workers`` processes.

The supervisor binds the socket once and every worker inherits it (the kernel hands
each accepted connection to one of them). No SO_REUSEPORT: a port another process
listens on is "address already in use" here too, instead of a silent share with a
stranger that would answer 404 for the other's uploads.

Workers are spawned (not forked: no event loop, thread or lock state is inherited) and
run ``worker_main`` from the composition root. Each reports on its own pipe once it
listens; a worker that exits first closes that pipe, which is how its failure is seen.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from tusd_py.config import Config
from tusd_py.http.server import LISTEN_BACKLOG
from tusd_py.sd_notify import notify_ready, notify_stopping

log = logging.getLogger("tusd_py")

WorkerMain = Callable[[Config, socket.socket, int, Connection], None]
"""``worker_main(config, listener, number, ready)``: a module-level function (spawn
pickles it by name) that serves on ``listener`` and sends its pid on ``ready`` once
it listens."""


def bind_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: a free port), ready for the event
    loop. Raises ``OSError`` whose text is one line: "cannot listen on HOST:PORT:
    address already in use"."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror}") from error
    listener = socket.socket(family, kind, proto)
    try:
        # Not SO_REUSEPORT; SO_REUSEADDR only lets a restart bind past TIME_WAIT.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(LISTEN_BACKLOG)
        listener.setblocking(False)
    except OSError as error:
        listener.close()
        reason = (error.strerror or str(error)).lower()
        raise OSError(error.errno, f"cannot listen on {host}:{port}: {reason}") from error
    return listener


@dataclass
class _Worker:
    number: int
    process: BaseProcess
    ready: Connection
    """Read end of the worker's pipe: its pid once it listens, EOF if it exits first."""
    listening: bool = False

    def describe(self) -> str:
        return f"worker {self.number} (pid {self.process.pid})"


def supervise(config: Config, listener: socket.socket, worker_main: WorkerMain) -> int:
    """Run ``server.workers`` processes on ``listener`` until they exit; the exit
    status (0: every worker shut down cleanly).

    "started" is logged and systemd notified only once every worker listens. When a
    worker exits before it listens (it logged why: one line with its number and pid),
    the supervisor waits for the others' reports, logs one line naming the failed
    ones, stops the rest and returns 1. SIGTERM/SIGINT are passed on and each
    worker shuts down gracefully. A worker that dies later is reported, not restarted:
    the service manager restarts the whole unit."""
    port = int(listener.getsockname()[1])
    context = multiprocessing.get_context("spawn")
    workers: list[_Worker] = []
    stopping = False

    def stop_workers(signum: int) -> None:
        for worker in workers:
            if worker.process.pid is not None and worker.process.exitcode is None:
                os.kill(worker.process.pid, signum)

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        notify_stopping()
        stop_workers(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for number in range(1, config.server.workers + 1):
        reader, writer = context.Pipe(duplex=False)
        process = context.Process(
            target=worker_main, args=(config, listener, number, writer), name=f"tusd-py-worker-{number}"
        )
        workers.append(_Worker(number, process, reader))
        process.start()
        writer.close()  # the worker holds the only write end: EOF when it exits
    listener.close()  # the workers hold theirs; the supervisor never accepts
    try:
        _wait_for_reports(workers)
        failed = [worker for worker in workers if not worker.listening]
        if stopping:
            return _join(workers)
        if not failed:
            log.info("started %d workers on port %d", len(workers), port)
            notify_ready(f"{len(workers)} workers listening on port {port}")
            return _join(workers)
        log.error("not started: %s exited before listening", ", ".join(worker.describe() for worker in failed))
        stopping = True
        stop_workers(signal.SIGTERM)
        for worker in workers:
            worker.process.join()
        return 1
    finally:
        for worker in workers:
            worker.ready.close()


_STOPPED = (0, -signal.SIGTERM, -signal.SIGINT)
"""Exit statuses of a worker that was told to stop: a graceful shutdown, or the signal
itself before the worker installed its handler."""


def _wait_for_reports(workers: list[_Worker]) -> None:
    """Wait until every worker listens or exited. All of them, not only the first
    failure: stopping the others at once would race with their own failures, which
    each worker logs itself."""
    waiting = {worker.ready: worker for worker in workers}
    while waiting:
        for handle in multiprocessing.connection.wait(list(waiting)):
            assert isinstance(handle, Connection)
            worker = waiting.pop(handle)
            try:
                handle.recv()
            except EOFError:
                continue
            worker.listening = True


def _join(workers: list[_Worker]) -> int:
    """Wait for every (started) worker to exit; 1 if one did not shut down cleanly."""
    status = 0
    for worker in workers:
        worker.process.join()
        if worker.process.exitcode in _STOPPED:
            continue
        code = worker.process.exitcode
        log.error("%s exited with status %s", worker.describe(), code)
        status = 1
    return status
