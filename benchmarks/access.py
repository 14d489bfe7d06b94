"""What the pre-access hook costs a client sending 1 MiB chunks: the PATCH rate of
tusd-py (file store) with ``pre-access`` on (allows cached, ``hooks.access_cache_ttl``
at its default) against the same server with it off, in one run.

Both servers are configured alike and ask the same webhook receiver (an aiohttp
subprocess that allows everything) at creation; only ``pre-access`` differs. Each run
measures "off" then "on" with fresh servers and data directories; the ratio quoted is
on/off of the same run, and the medians are over ``--runs`` runs. Every client sends
``Authorization`` (what the cache keys on), on its own keep-alive connection, one
upload each, PATCHes of ``--chunk`` bytes one after the other.

Run: ``flock /tmp/bench.lock python3 -m benchmarks.access --runs 3``
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
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


async def _client(port: int, buffer: memoryview, chunk: int, patches: int, token: str) -> int:
    headers = {"Tus-Resumable": TUS_VERSION, "Authorization": f"Bearer {token}"}
    async with RawConnection(HOST, port) as connection:
        created = await connection.request("POST", "/files/", {**headers, "Upload-Length": str(chunk * patches)})
        if created.status != 201:
            raise HTTPError(f"POST: {created.status} {created.body[:200]!r}")
        path = "/" + created.header("Location").split("/", 3)[3]
        patch_headers = {**headers, "Content-Type": "application/offset+octet-stream"}
        for number in range(patches):
            answer = await connection.request(
                "PATCH", path, {**patch_headers, "Upload-Offset": str(number * chunk)}, body=buffer, body_length=chunk
            )
            if answer.status != 204:
                raise HTTPError(f"PATCH {number}: {answer.status} {answer.body[:200]!r}")
    return patches


async def _patch_rate(port: int, clients: int, chunk: int, patches: int) -> float:
    buffer = random_buffer(chunk)
    started = time.perf_counter()
    done = await asyncio.gather(*(_client(port, buffer, chunk, patches, f"user-{n}") for n in range(clients)))
    return sum(done) / (time.perf_counter() - started)


def _measure(name: str, hook_url: str, events: list[str], clients: int, chunk: int, patches: int) -> float:
    with tempfile.TemporaryDirectory(prefix="tusd-py-access-") as directory:
        with _server(name, Path(directory), hook_url, events) as server:
            with asyncio.Runner(loop_factory=new_event_loop) as runner:
                return runner.run(_patch_rate(server.port, clients, chunk, patches))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4, help="concurrent uploads (one connection each)")
    parser.add_argument("--chunk", type=parse_size, default=MiB, help="PATCH body size (default 1MiB)")
    parser.add_argument("--patches", type=int, default=64, help="PATCHes per upload")
    args = parser.parse_args(argv)

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
                off = _measure("pre-access off", hook_url, ["pre-create"], args.clients, args.chunk, args.patches)
                on = _measure("pre-access on", hook_url, ["pre-create", "pre-access"], args.clients, args.chunk,
                              args.patches)
                offs.append(off)
                ons.append(on)
                ratios.append(on / off)
                print(f"run {run}: off {off:.1f} PATCH/s, on (cached) {on:.1f} PATCH/s, on/off {on / off:.3f}",
                      flush=True)
    print(f"median of {args.runs} runs ({args.clients} clients, {args.chunk // 1024} KiB PATCHes, "
          f"{args.patches} per upload): off {median(offs):.1f} PATCH/s, on {median(ons):.1f} PATCH/s, "
          f"on/off {median(ratios):.3f}")


if __name__ == "__main__":
    main()
