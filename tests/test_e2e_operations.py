"""Operations, end to end on the composed server (cli.serving): Prometheus metrics after
a real tuspy upload, hooks (Python callables and a webhook) fired by real requests,
JSON logs without secrets, and systemd readiness notification from the `tusd-py`
command."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from aiohttp import web
from helpers import file_store_config, path_of, tuspy_upload
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port
from tests.rawhttp import RawConnection, request
from tusd_py.cli import serving
from tusd_py.config import MiB
from tusd_py.hooks import HookEvent, PreCreateAnswer

STEP_TIMEOUT = 20.0
"""Upper bound for one expected event (a bound, not a delay)."""


# --- metrics ---------------------------------------------------------------------------


def _parse(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def _value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(value for sample_labels, value in samples.get(name, []) if labels.items() <= sample_labels.items())


async def test_metrics_after_atuspy_upload(tmp_path: Path) -> None:
    size, chunk = 3 * MiB + 17, 1 * MiB
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(size))
    async with serving(file_store_config(tmp_path)) as server:
        await asyncio.to_thread(tuspy_upload, f"{server.url}/files/", source, chunk)

        scraper = await RawConnection.open(server.port)
        try:
            # A round trip first: tuspy's closed connections are handled by then.
            await scraper.send_request("OPTIONS", "/files/")
            assert (await scraper.read_response("OPTIONS")).status == 204
            await scraper.send_request("GET", "/metrics")
            response = await scraper.read_response("GET")
            assert response.status == 200
            assert (response.header("content-type") or "").startswith("text/plain; version=")
            first = _parse(response.body.decode())

            other = await RawConnection.open(server.port)
            try:
                await other.send_request("OPTIONS", "/files/")
                assert (await other.read_response("OPTIONS")).status == 204
                await scraper.send_request("GET", "/metrics")
                second = _parse((await scraper.read_response("GET")).body.decode())
            finally:
                await other.close()
        finally:
            await scraper.close()

    requests = "tusd_py_requests_duration_seconds_count"
    assert _value(first, requests, method="POST", status="201") == 1
    assert _value(first, requests, method="PATCH", status="204") == 4  # ceil(size / chunk)
    assert _value(first, requests, method="PATCH") == 4
    assert _value(first, requests, method="OPTIONS", status="204") == 1
    assert _value(first, "tusd_py_received_bytes_total") == size
    assert _value(first, "tusd_py_uploads_created_total") == 1
    assert _value(first, "tusd_py_uploads_finished_total") == 1
    assert _value(first, "tusd_py_uploads_terminated_total") == 0
    # Every request took the upload's lock once, none waited long or timed out.
    assert _value(first, "tusd_py_lock_wait_seconds_count") >= 5
    assert _value(first, "tusd_py_lock_timeouts_total") == 0
    assert _value(first, "tusd_py_connections_open") == 1  # the scraper's own
    assert _value(second, "tusd_py_connections_open") == 2
    assert _value(second, requests, method="GET", status="200") == 1  # the first scrape
    assert _value(first, "process_resident_memory_bytes") > 0


async def test_metrics_path_is_configurable_and_can_be_disabled(tmp_path: Path) -> None:
    async with serving(file_store_config(tmp_path, **{"metrics.path": "/internal/metrics"})) as server:
        response = await request(server.port, "GET", "/internal/metrics")
        assert response.status == 200 and b"tusd_py_connections_open" in response.body
        assert (await request(server.port, "POST", "/internal/metrics")).status == 405
        assert (await request(server.port, "GET", "/metrics")).status == 404
    async with serving(file_store_config(tmp_path, **{"metrics.enabled": False})) as server:
        assert (await request(server.port, "GET", "/metrics")).status == 404


# --- hooks: Python callables -------------------------------------------------------------


class Recorder:
    """Hook callables that record events and let a test wait for one."""

    def __init__(self) -> None:
        self.events: list[HookEvent] = []
        self._changed = asyncio.Condition()
        self.created = 0

    async def record(self, event: HookEvent) -> None:
        async with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    async def pre_create(self, event: HookEvent) -> PreCreateAnswer:
        await self.record(event)
        if event.upload.metadata_text("filename") == "forbidden.exe":
            return PreCreateAnswer(reject=True, status=422, message="no executables")
        self.created += 1
        return PreCreateAnswer(upload_id=f"invoice-{self.created}", metadata={"owner": "alice", "secret": None})

    async def wait_for(self, kind: str, offset: int | None = None) -> HookEvent:
        def found() -> HookEvent | None:
            for event in self.events:
                if event.type == kind and (offset is None or event.upload.offset == offset):
                    return event
            return None

        async with asyncio.timeout(STEP_TIMEOUT), self._changed:
            await self._changed.wait_for(lambda: found() is not None)
        event = found()
        assert event is not None
        return event

    def of(self, kind: str) -> list[HookEvent]:
        return [event for event in self.events if event.type == kind]


async def test_hook_callables_see_the_life_of_an_upload(tmp_path: Path) -> None:
    recorder = Recorder()
    callables = {
        "pre-create": recorder.pre_create,
        "post-create": recorder.record,
        "post-receive": recorder.record,
        "post-finish": recorder.record,
        "post-terminate": recorder.record,
    }
    config = file_store_config(tmp_path, **{"hooks.progress_interval": 0.05})
    async with serving(config, hooks=callables) as server:
        # pre-create rejects: its status and message reach the client; nothing is created.
        rejected = await request(
            server.port,
            "POST",
            "/files/",
            {"Upload-Length": "10", "Upload-Metadata": "filename " + base64.b64encode(b"forbidden.exe").decode()},
        )
        assert rejected.status == 422
        assert b"no executables" in rejected.body
        assert recorder.of("post-create") == []

        # pre-create chooses the id and changes the metadata.
        size = 2 * MiB
        payload = os.urandom(size)
        metadata = "filename " + base64.b64encode(b"photo.jpg").decode() + ",secret " + base64.b64encode(b"x").decode()
        created = await request(
            server.port, "POST", "/files/", {"Upload-Length": str(size), "Upload-Metadata": metadata}
        )
        assert created.status == 201
        location = created.header("location")
        assert location is not None and location.endswith("/files/invoice-1"), location
        head = await request(server.port, "HEAD", "/files/invoice-1")
        assert head.header("upload-metadata") is not None
        stored_metadata = dict(item.split(" ") for item in (head.header("upload-metadata") or "").split(","))
        assert set(stored_metadata) == {"filename", "owner"}
        assert base64.b64decode(stored_metadata["owner"]) == b"alice"
        post_create = await recorder.wait_for("post-create")
        assert post_create.upload.id == "invoice-1"
        assert post_create.request is not None and post_create.request.method == "POST"

        # A PATCH that stalls half-way: progress arrives while it streams (timer, not
        # per chunk), then the final event with the stored offset when it ends.
        half = size // 2
        patch = await RawConnection.open(server.port)
        try:
            await patch.send_request(
                "PATCH",
                "/files/invoice-1",
                {
                    "Content-Type": "application/offset+octet-stream",
                    "Upload-Offset": "0",
                    "Content-Length": str(size),
                    "Authorization": "Bearer client-token-value",
                },
                payload[:half],
            )
            progress = await recorder.wait_for("post-receive", offset=half)
            assert progress.request is not None
            # Python callables get every header (they are the operator's own code).
            assert dict(progress.request.headers)["authorization"] == "Bearer client-token-value"
            await patch.send(payload[half:])
            answer = await patch.read_response("PATCH")
            assert answer.status == 204
        finally:
            await patch.close()
        finished = await recorder.wait_for("post-finish")
        assert finished.upload.offset == size and finished.upload.finished
        final = recorder.of("post-receive")[-1]
        assert final.upload.offset == size

        deleted = await request(server.port, "DELETE", "/files/invoice-1")
        assert deleted.status == 204
        terminated = await recorder.wait_for("post-terminate")
        assert terminated.upload.id == "invoice-1"
        assert terminated.request is not None and terminated.request.method == "DELETE"

        scrape = await request(server.port, "GET", "/metrics")
        samples = _parse(scrape.body.decode())
    assert _value(samples, "tusd_py_uploads_created_total") == 1
    assert _value(samples, "tusd_py_uploads_finished_total") == 1
    assert _value(samples, "tusd_py_uploads_terminated_total") == 1
    assert [event.type for event in recorder.events if event.upload.id == "invoice-1"][-2:] == [
        "post-finish",
        "post-terminate",
    ]


# --- webhook, JSON logs and secrets ---------------------------------------------------------

SECRETS = ("client-token-value", "hook-secret-value", "hookpassword", "query-secret-value")


class Receiver:
    """A webhook receiver (aiohttp) that records what it got."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[dict[str, str], bytes]] = []
        self.got_finish = asyncio.Event()
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def handle(self, http_request: web.Request) -> web.Response:
        body = await http_request.read()
        self.deliveries.append((dict(http_request.headers), body))
        if http_request.headers.get("Hook-Name") == "post-finish":
            self.got_finish.set()
        return web.json_response({})

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


async def test_webhook_json_logs_and_no_secret_leaks(tmp_path: Path, captured_logs: io.StringIO) -> None:
    async with Receiver() as receiver:
        config = file_store_config(
            tmp_path,
            **{
                "hooks.url": f"http://tusd:hookpassword@127.0.0.1:{receiver.port}/hook",
                "hooks.secret": "hook-secret-value",
                "hooks.strip_headers": ["Authorization"],
            },
        )
        source = tmp_path / "source.bin"
        source.write_bytes(os.urandom(MiB + 5))
        async with serving(config) as server:
            client_headers = {"Authorization": "Bearer client-token-value"}
            url = await asyncio.to_thread(tuspy_upload, f"{server.url}/files/", source, MiB, headers=client_headers)
            async with asyncio.timeout(STEP_TIMEOUT):
                await receiver.got_finish.wait()
            # A request with a request id and a secret in the query string.
            connection = await RawConnection.open(server.port)
            try:
                await connection.send_request(
                    "HEAD",
                    path_of(url) + "?access_token=query-secret-value",
                    {"X-Request-ID": "req-abc-123", "Authorization": "Bearer client-token-value"},
                )
                head = await connection.read_response("HEAD")
            finally:
                await connection.close()
            assert head.status == 200
            assert head.header("x-request-id") == "req-abc-123"

    # Webhook deliveries: signed, Basic auth from the URL, never the client's
    # credentials (stripped by hooks.strip_headers).
    kinds = [headers["Hook-Name"] for headers, _ in receiver.deliveries]
    assert kinds[:2] == ["pre-create", "post-create"] and "post-finish" in kinds
    for headers, body in receiver.deliveries:
        expected = "sha256=" + hmac.new(b"hook-secret-value", body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["Tusd-Py-Signature"], expected)
        assert headers["Authorization"] == "Basic " + base64.b64encode(b"tusd:hookpassword").decode()
        document = json.loads(body)
        assert "authorization" not in document["request"]["headers"]
        assert b"client-token-value" not in body

    # Logs: one JSON document per line; access lines carry the request id; no secrets.
    output = captured_logs.getvalue()
    lines = [json.loads(line) for line in output.splitlines()]
    assert lines, "nothing was logged"
    for line in lines:
        assert {"time", "level", "logger", "message"} <= line.keys()
    access = [line for line in lines if line["logger"] == "tusd_py.access"]
    head_lines = [line for line in access if line["request_id"] == "req-abc-123"]
    assert len(head_lines) == 1
    assert head_lines[0]["method"] == "HEAD" and head_lines[0]["status"] == 200
    assert head_lines[0]["path"] == path_of(url)  # the query string is not logged
    assert {line["method"] for line in access} >= {"POST", "PATCH", "HEAD"}
    assert any(line["message"] == "upload created" for line in lines)
    for secret in SECRETS:
        assert secret not in output, secret


# --- systemd readiness --------------------------------------------------------------------


class NotifySocket:
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET; reports the sender's
    PID with each message (SO_PASSCRED), as systemd checks NotifyAccess=main."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(self.path)
        self.sock.settimeout(STEP_TIMEOUT)

    def receive(self) -> tuple[int, str]:
        data, ancillary, _flags, _address = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = -1
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", payload[:12])[0]
        return pid, data.decode()

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_command_notifies_systemd_when_listening_and_stopping(tmp_path: Path, workers: int) -> None:
    notify = NotifySocket(tmp_path / "notify")
    port = free_port()
    env = {
        **os.environ,
        "NOTIFY_SOCKET": notify.path,
        "TUSD_PY_SERVER_WORKERS": str(workers),
        "TUSD_PY_LOCK_BACKEND": "file" if workers > 1 else "memory",
        "TUSD_PY_SERVER_SHUTDOWN_TIMEOUT": "5",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "tusd_py.cli", "--port", str(port), "--directory", str(tmp_path / "data")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        pid, message = notify.receive()
        assert pid == process.pid  # the main process, as NotifyAccess=main requires
        assert message.startswith("READY=1\nSTATUS="), message
        # Ready means listening: every worker answers right away.
        for _ in range(4 * workers):
            with urllib.request.urlopen(
                urllib.request.Request(f"http://127.0.0.1:{port}/files/", method="OPTIONS"), timeout=10
            ) as response:
                assert response.status == 204
        process.send_signal(signal.SIGTERM)
        pid, message = notify.receive()
        assert (pid, message) == (process.pid, "STOPPING=1")
        assert process.wait(timeout=STEP_TIMEOUT) == 0
    finally:
        notify.close()
        if process.poll() is None:
            process.kill()
        stderr = process.communicate()[1].decode(errors="replace")
    assert "Traceback" not in stderr, stderr
