"""What the pre-access hook costs a client sending 1 MiB chunks: the PATCH rate of
tusd-py (file store) with ``pre-access`` on (allows cached, ``hooks.access_cache_ttl``
at its default) against the same server with it off, in one run.

Both servers are configured alike and ask the same webhook receiver (an aiohttp
subprocess that allows everything) at creation; only ``pre-access`` differs. Each run
measures "off" and "on" (which goes first alternates from run to run) with fresh
servers and data directories, after a sync; the ratio quoted is on/off of the same run,
and the medians are over ``--runs`` runs. Every client sends ``Authorization`` (what the
cache keys on), on its own keep-alive connection, ``--uploads`` uploads one after the
other, each in ``--patches`` PATCHes of ``--chunk`` bytes: the first PATCH of each
upload asks the hook, the others are served from the cache.

Run: ``python3 -m benchmarks.access --runs 5``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import MiB, ServerProcess, free_port, median, new_event_loop, parse_size, random_buffer
from benchmarks.rawclient import TUS_VERSION, HTTPError, RawConnection

HOST = "127.0.0.1"

RECEIVER = """
import sys
from aiohttp import web

async def hook(request):
    event = await request.json()
    return web.json_response({"owner": "bench"} if event["type"] == "pre-create" else {})

app = web.Application()
app.router.add_post("/hook", hook)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


def _server(name: str, directory: Path, hook_url: str, events: list[str]) -> ServerProcess:
    port = free_port()
    config = directory / "config.toml"
    config.write_text(
        f'[server]\nhost = "{HOST}"\nport = {port}\n'
        f'[store.file]\ndirectory = "{directory / "data"}"\n'
        f'[log]\nlevel = "warning"\n'
        f'[hooks]\nurl = "{hook_url}"\nevents = {events!r}\n'.replace("'", '"')
    )
    command = [sys.executable, "-m", "tusd_py.cli", "--config", str(config)]
    return ServerProcess(name, command, HOST, port, directory / "server.log")


async def _client(port: int, buffer: memoryview, load: Load, token: str) -> int:
    """``load.uploads`` uploads one after the other, each in ``load.patches`` PATCHes."""
    headers = {"Tus-Resumable": TUS_VERSION, "Authorization": f"Bearer {token}"}
    chunk, patches = load.chunk, load.patches
    async with RawConnection(HOST, port) as connection:
        for _ in range(load.uploads):
            created = await connection.request("POST", "/files/", {**headers, "Upload-Length": str(chunk * patches)})
            if created.status != 201:
                raise HTTPError(f"POST: {created.status} {created.body[:200]!r}")
            path = "/" + created.header("Location").split("/", 3)[3]
            patch_headers = {**headers, "Content-Type": "application/offset+octet-stream"}
            for number in range(patches):
                answer = await connection.request(
                    "PATCH", path, {**patch_headers, "Upload-Offset": str(number * chunk)}, body=buffer,
                    body_length=chunk,
                )
                if answer.status != 204:
                    raise HTTPError(f"PATCH {number}: {answer.status} {answer.body[:200]!r}")
    return load.uploads * patches


@dataclass(frozen=True)
class Load:
    clients: int
    chunk: int
    patches: int
    uploads: int


async def _patch_rate(port: int, load: Load) -> float:
    buffer = random_buffer(load.chunk)
    started = time.perf_counter()
    done = await asyncio.gather(*(_client(port, buffer, load, f"user-{n}") for n in range(load.clients)))
    return sum(done) / (time.perf_counter() - started)


def _measure(name: str, hook_url: str, events: list[str], load: Load) -> float:
    os.sync()  # the previous measurement's dirty pages must not be written back during this one
    with tempfile.TemporaryDirectory(prefix="tusd-py-access-") as directory:
        with _server(name, Path(directory), hook_url, events) as server:
            with asyncio.Runner(loop_factory=new_event_loop) as runner:
                return runner.run(_patch_rate(server.port, load))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4, help="concurrent uploads (one connection each)")
    parser.add_argument("--chunk", type=parse_size, default=MiB, help="PATCH body size (default 1MiB)")
    parser.add_argument("--patches", type=int, default=64, help="PATCHes per upload")
    parser.add_argument("--uploads", type=int, default=8, help="uploads per client, one after the other")
    args = parser.parse_args(argv)
    load = Load(args.clients, args.chunk, args.patches, args.uploads)

    receiver_port = free_port()
    with tempfile.TemporaryDirectory(prefix="tusd-py-access-receiver-") as directory:
        script = Path(directory) / "receiver.py"
        script.write_text(RECEIVER)
        receiver = ServerProcess(
            "receiver", [sys.executable, str(script), str(receiver_port)], HOST, receiver_port, Path(directory) / "log"
        )
        with receiver:
            hook_url = f"http://{HOST}:{receiver_port}/hook"
            offs, ons, ratios = [], [], []
            for run in range(1, args.runs + 1):
                # Which goes first alternates: the second of a pair must not be the one
                # that always meets what the first left behind.
                if run % 2:
                    off = _measure("pre-access off", hook_url, ["pre-create"], load)
                    on = _measure("pre-access on", hook_url, ["pre-create", "pre-access"], load)
                else:
                    on = _measure("pre-access on", hook_url, ["pre-create", "pre-access"], load)
                    off = _measure("pre-access off", hook_url, ["pre-create"], load)
                offs.append(off)
                ons.append(on)
                ratios.append(on / off)
                print(f"run {run}: off {off:.1f} PATCH/s, on (cached) {on:.1f} PATCH/s, on/off {on / off:.3f}",
                      flush=True)
    print(f"median of {args.runs} runs ({args.clients} clients x {args.uploads} uploads, {args.chunk // 1024} KiB "
          f"PATCHes, {args.patches} per upload): off {median(offs):.1f} PATCH/s, on {median(ons):.1f} PATCH/s, "
          f"on/off {median(ratios):.3f}")


if __name__ == "__main__":
    main()
