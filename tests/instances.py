"""Run tusd-py as real processes for multi-instance tests (no tests here).

``start_instance`` writes a config file, runs ``python -m tusd_py.cli --config FILE``
(one process, or a supervisor with ``server.workers`` processes) on port 0, and returns
once the server says it is ready: it sends systemd's ``READY=1`` to the
``NOTIFY_SOCKET`` the test gives it (the supervisor sends it only when every worker
listens), with the port it got in ``STATUS``. ``Instance.stop`` sends SIGTERM (a graceful
shutdown) and waits for the exit. Everything is async: the fake Consul the instances
talk to runs in the test's event loop, which must keep running meanwhile.

Also here: the interrupted and racing PATCHes these tests send, S3 inspection of a
moto bucket, and the scenarios shared by the Consul and workers tests (plain requests
and buckets come from ``helpers``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import secrets
import signal
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio
from helpers import create, data_of, head_offset, object_bytes, patch, patch_head, s3_client, sha256, upload_id_of

from tests.consul_fake import FakeConsul
from tests.rawhttp import RawConnection, RawResponse

ROOT = Path(__file__).resolve().parent.parent
KiB = 1024
MiB = 1024 * KiB

START_TIMEOUT = 30.0
"""Bound for an instance to become ready (interpreter start-up and imports)."""
STOP_TIMEOUT = 20.0
"""Bound for a graceful shutdown (the configs below use shutdown_timeout = 5)."""

Settings = Mapping[str, Mapping[str, Any]]
"""Config sections by dotted name (``"store.s3"``) -> key -> value."""


def toml_text(settings: Settings) -> str:
    """A TOML document for ``settings`` (strings, numbers, booleans and lists of
    those: their JSON spelling is valid TOML)."""
    lines: list[str] = []
    for section, values in settings.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def merged(*layers: Settings) -> dict[str, dict[str, Any]]:
    """Later layers' keys win, section by section."""
    result: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for section, values in layer.items():
            result.setdefault(section, {}).update(values)
    return result


def s3_settings(endpoint: str, bucket: str) -> Settings:
    """An S3-store instance on loopback, port 0, with short timeouts for tests."""
    return {
        "server": {"host": "127.0.0.1", "port": 0, "shutdown_timeout": 5, "network_timeout": 10},
        "store": {"backend": "s3"},
        # 5 MiB is S3's (and tusd-py's) smallest part size.
        "store.s3": {"bucket": bucket, "endpoint_url": endpoint, "region": "us-east-1", "part_size": "5MiB"},
        "lock": {"acquire_timeout": 10},
        "log": {"level": "info"},
    }


def consul_settings(address: str) -> Settings:
    return {
        "lock": {"backend": "consul"},
        "lock.consul": {"address": address, "session_ttl": 10, "lock_delay": 1, "request_timeout": 2},
    }


def redis_settings(url: str) -> Settings:
    return {"lock": {"backend": "redis"}, "lock.redis": {"url": url, "lease": LEASE, "request_timeout": 1}}


S3_LOCK_PREFIX = ".locks/"
"""Where the S3 locker keeps its objects by default (``<store.s3.prefix>.locks/``)."""
LEASE = 3
"""The lease of the redis and s3 lockers in these tests: short, so that a killed
holder's locks are free soon (renewals every lease/3 still fit a loaded machine)."""


def s3_lock_settings() -> Settings:
    return {"lock": {"backend": "s3"}, "lock.s3": {"lease": LEASE, "poll_interval": 0.2, "request_timeout": 1}}


# --- the distributed lock services, one interface for the tests --------------------------


class LockService:
    """A distributed locker's backend as the multi-instance tests see it: the settings
    instances need, what is left of its locks, and what a killed instance means for it.
    ``start``/``stop`` run in the test's event loop (the Consul fake is served by it)."""

    name = ""
    lease: float = LEASE
    """Seconds a killed holder's lock may outlive it (after ``instance_killed``)."""

    def settings(self) -> Settings:
        raise NotImplementedError

    async def start(self) -> None:
        """Bring the service up (no-op when it runs elsewhere)."""

    async def stop(self) -> None:
        """Stop what ``start`` started."""

    async def locks_left(self) -> list[str]:
        """The lock objects/keys that exist now (held or not released)."""
        raise NotImplementedError

    def upload_of(self, lock: str) -> str:
        """The upload id a name from ``locks_left`` belongs to."""
        raise NotImplementedError

    def instance_started(self, instance: Instance) -> None:
        """Called after ``instance`` started (and made its session, for Consul)."""

    async def instance_killed(self, instance: Instance) -> None:
        """Called after ``instance`` was SIGKILLed: let the lease run out as it would."""


class S3LockService(LockService):
    """``lock.backend = "s3"``: lock objects in the store's own moto bucket."""

    name = "s3"

    def __init__(self, endpoint: str, bucket: str) -> None:
        self.endpoint = endpoint
        self.bucket = bucket

    def settings(self) -> Settings:
        return s3_lock_settings()

    async def locks_left(self) -> list[str]:
        """Lock objects and release requests, except released locks (free: their body
        says so; kept as the record of that release until the sweep removes them)."""
        left: list[str] = []
        async with s3_client(self.endpoint) as client:
            listing = await client.list_objects_v2(Bucket=self.bucket, Prefix=S3_LOCK_PREFIX)
            for item in listing.get("Contents", []):
                key = str(item["Key"])
                if not key.endswith(".release"):
                    try:
                        response = await client.get_object(Bucket=self.bucket, Key=key)
                    except client.exceptions.NoSuchKey:
                        continue
                    async with response["Body"] as body:
                        if json.loads(await body.read()).get("released") is True:
                            continue
                left.append(key)
        return left

    def upload_of(self, lock: str) -> str:
        return lock[len(S3_LOCK_PREFIX):].removesuffix(".release")


class RedisLockService(LockService):
    """``lock.backend = "redis"``: a real redis-server (started by the sync fixture)."""

    name = "redis"

    def __init__(self, url: str) -> None:
        self.url = url

    def settings(self) -> Settings:
        return redis_settings(self.url)

    async def locks_left(self) -> list[str]:
        client = redis.asyncio.Redis.from_url(self.url, socket_timeout=5)
        try:
            return sorted([key.decode() async for key in client.scan_iter(match="tusd-py:lock:*")])
        finally:
            await client.aclose()

    def upload_of(self, lock: str) -> str:
        return lock.rsplit(":", 1)[1]


class ConsulLockService(LockService):
    """``lock.backend = "consul"``: the in-process fake Consul. Its TTL clock is the
    test's: a killed instance's session is expired as its TTL would, then its
    lock-delay passes."""

    name = "consul"
    LOCK_DELAY = 1.0

    def __init__(self) -> None:
        self.fake = FakeConsul()
        self._sessions: dict[str, set[str]] = {}
        self._seen: set[str] = set()

    def settings(self) -> Settings:
        return consul_settings(self.fake.address)

    async def start(self) -> None:
        await self.fake.start()

    async def stop(self) -> None:
        await self.fake.stop()

    async def locks_left(self) -> list[str]:
        # The Consul locker releases its key (the Consul lock pattern) and leaves the
        # released entry; what must not be left is a held key or a release request.
        return sorted(
            key for key, entry in self.fake.kv.items()
            if (key.startswith("tusd-py/locks/") and entry.session is not None) or key.startswith("tusd-py/release/")
        )

    def upload_of(self, lock: str) -> str:
        return lock.rsplit("/", 1)[1]

    def instance_started(self, instance: Instance) -> None:
        new = set(self.fake.sessions) - self._seen
        self._seen |= new
        self._sessions[instance.name] = new

    async def instance_killed(self, instance: Instance) -> None:
        for session in self._sessions.pop(instance.name, set()):
            if session in self.fake.sessions:
                self.fake.expire_session(session)
        self.fake.advance(self.LOCK_DELAY)


def _prepare_files(directory: Path, name: str, settings: Settings) -> tuple[Path, Path, int]:
    """Write ``<name>.toml``; (its path, the log's path, the log opened for writing)."""
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / f"{name}.toml"
    config_path.write_text(toml_text(settings))
    log_path = directory / f"{name}.log"
    return config_path, log_path, os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)


@dataclass
class Instance:
    """A running tusd-py command (one process, or a supervisor and its workers)."""

    name: str
    port: int
    process: asyncio.subprocess.Process
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def stop(self) -> int:
        """SIGTERM, then wait for the exit (SIGKILL after ``STOP_TIMEOUT``); the exit
        status."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        assert self.process.returncode is not None
        return self.process.returncode


async def start_instance(
    directory: Path, name: str, settings: Settings, environment: Mapping[str, str] | None = None
) -> Instance:
    """Start ``python -m tusd_py.cli --config <directory>/<name>.toml`` (with
    ``environment`` added to ours); return once it is ready (raises with its log if it
    exits first or takes too long)."""
    config_path, log_path, log_fd = _prepare_files(directory, name, settings)
    # An abstract socket: a pytest temp path can be too long for sun_path.
    notify_name = f"tusd-py-test-{secrets.token_hex(6)}"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    notify.bind("\0" + notify_name)
    notify.setblocking(False)
    env = {key: value for key, value in os.environ.items() if key != "CONSUL_HTTP_TOKEN"}
    env.update(environment or {})
    env["NOTIFY_SOCKET"] = "@" + notify_name
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    try:
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tusd_py.cli", "--config", str(config_path),
                stdin=asyncio.subprocess.DEVNULL, stdout=log_fd, stderr=log_fd, cwd=directory, env=env,
            )
        finally:
            os.close(log_fd)
        instance = Instance(name, 0, process, log_path)
        try:
            instance.port = await _wait_until_ready(notify, process)
        except BaseException:
            await instance.stop()
            raise
        return instance
    finally:
        notify.close()


async def _wait_until_ready(notify: socket.socket, process: asyncio.subprocess.Process) -> int:
    loop = asyncio.get_running_loop()
    exited = asyncio.ensure_future(process.wait())
    received: asyncio.Future[bytes] | None = None
    try:
        async with asyncio.timeout(START_TIMEOUT):
            while True:
                received = asyncio.ensure_future(loop.sock_recv(notify, 4096))
                await asyncio.wait({received, exited}, return_when=asyncio.FIRST_COMPLETED)
                if not received.done():
                    raise RuntimeError(f"tusd-py exited with {process.returncode} before it was ready")
                message = received.result().decode()
                if "READY=1" in message.splitlines():
                    found = re.search(r"(?:listening on http://[^:]+:|on port )(\d+)", message)
                    if found is None:
                        raise RuntimeError(f"no port in the readiness message {message!r}")
                    return int(found.group(1))
    finally:
        for waiting in (exited, received):
            if waiting is not None and not waiting.done():
                waiting.cancel()


@contextlib.asynccontextmanager
async def running(
    directory: Path, settings: Mapping[str, Settings], environment: Mapping[str, str] | None = None
) -> AsyncIterator[list[Instance]]:
    """Start the instances (``name -> settings``) at once; stop them on exit, where
    a clean exit (status 0) of each is part of the test."""
    instances = await running_together(directory, settings, environment)
    try:
        yield instances
    finally:
        await stop_all(instances)


# --- S3 (moto) ---------------------------------------------------------------------------


async def bucket_state(endpoint: str, bucket: str) -> dict[str, Any]:
    """Every object (key -> size and ETag) and every uploaded part of every multipart
    upload: what a request must leave alone when it is refused."""
    async with s3_client(endpoint) as client:
        listing = await client.list_objects_v2(Bucket=bucket)
        objects = {item["Key"]: (item["Size"], item["ETag"]) for item in listing.get("Contents", [])}
        uploads = (await client.list_multipart_uploads(Bucket=bucket)).get("Uploads", [])
        parts: dict[str, list[tuple[int, int, str]]] = {}
        for upload in uploads:
            listed = await client.list_parts(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            parts[upload["Key"]] = [(p["PartNumber"], p["Size"], p["ETag"]) for p in listed.get("Parts", [])]
    return {"objects": objects, "parts": parts}


async def running_together(
    directory: Path, settings: Mapping[str, Settings], environment: Mapping[str, str] | None = None
) -> list[Instance]:
    """Start several instances at once (``name -> settings``); stopping is the
    caller's (``stop_all``)."""
    started = await asyncio.gather(
        *(start_instance(directory, name, layer, environment) for name, layer in settings.items()),
        return_exceptions=True,
    )
    instances = [item for item in started if isinstance(item, Instance)]
    errors = [item for item in started if isinstance(item, BaseException)]
    if errors:
        await stop_all(instances)
        raise errors[0]
    return instances


def cluster_settings(endpoint: str, bucket: str, service: LockService) -> dict[str, dict[str, Any]]:
    """An S3-store instance (behind nginx) locking through ``service``."""
    return merged(s3_settings(endpoint, bucket), service.settings(), {"server": {"behind_proxy": True}})


async def start_locking(directory: Path, name: str, settings: Settings, service: LockService) -> Instance:
    """``start_instance``, then tell ``service`` (one at a time: Consul sessions are
    told apart by what appeared during the start)."""
    instance = await start_instance(directory, name, settings)
    service.instance_started(instance)
    return instance


async def kill(instance: Instance, service: LockService) -> None:
    """SIGKILL ``instance`` (no release, no goodbye) and tell ``service``."""
    instance.process.kill()
    await instance.process.wait()
    await service.instance_killed(instance)


async def stop_all(instances: list[Instance]) -> None:
    """Stop every instance (in parallel); a non-zero exit status fails the test."""
    statuses = await asyncio.gather(*(instance.stop() for instance in instances))
    for instance, status in zip(instances, statuses, strict=True):
        assert status == 0, f"{instance.name} exited with {status}:\n{instance.log()[-4000:]}"


# --- scenarios shared by the Consul (several instances) and workers (one host) tests ----

PATCH_CHUNK = 256 * KiB


async def unbuffered_connection(port: int) -> RawConnection:
    """A connection whose ``send`` returns only once every byte is in the kernel, so
    a test knows what it sent before it stalls or aborts."""
    connection = await RawConnection.open(port)
    connection.writer.transport.set_write_buffer_limits(high=0)
    return connection


async def _read_head(connection: RawConnection) -> RawResponse:
    """The next response head (informational or final) without its body."""
    return await connection.read_informational(timeout=30.0)


async def expect_continue_patch(port: int, path: str, offset: int, length: int) -> tuple[RawConnection, RawResponse]:
    """Send a PATCH head with ``Expect: 100-continue``; return the connection and the
    first response head. tusd-py sends ``100 Continue`` only once the handler holds the
    upload's lock and reads the body, which makes it an event tests can wait for."""
    connection = await unbuffered_connection(port)
    head = patch_head(path, offset, length).replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n")
    await connection.send(head)
    return connection, await _read_head(connection)


async def _final_response(connection: RawConnection, head: RawResponse) -> RawResponse:
    """``head`` completed with its body (Content-Length framed, as tusd-py's errors are)."""
    length = int(head.header("content-length") or 0)
    body = await connection.reader.readexactly(length) if length else b""
    return RawResponse(head.status, head.reason, head.headers, body)


async def racing_patch(port: int, path: str, payload: bytes) -> RawResponse:
    """PATCH all of ``payload`` at offset 0 with ``Expect: 100-continue``; the body is
    sent once the server says continue, in chunks, until it answers."""
    connection, head = await expect_continue_patch(port, path, 0, len(payload))
    try:
        if head.status != 100:
            return await _final_response(connection, head)

        async def send_body() -> None:
            with contextlib.suppress(ConnectionError):
                for start in range(0, len(payload), PATCH_CHUNK):
                    await connection.send(payload[start:start + PATCH_CHUNK])

        sender = asyncio.ensure_future(send_body())
        try:
            return await connection.read_response("PATCH")
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
    finally:
        connection.abort()


async def scenario_concurrent_patches(
    port_a: int, port_b: int, endpoint: str, bucket: str, length: int, seed: int
) -> list[RawResponse]:
    """Two clients PATCH the same upload at once with different bytes, one through
    each port. The lock lets one write at a time: the stored bytes are one client's,
    never a mix; the other client is told (409/423 with a message, or a 204 with a
    smaller offset after it was asked to release). Completing from HEAD's offset with
    the writer's bytes gives that client's sha256. Returns both responses."""
    payloads = [data_of(length, seed), data_of(length, seed + 1)]
    path = await create(port_a, length)
    responses = list(await asyncio.gather(
        racing_patch(port_a, path, payloads[0]), racing_patch(port_b, path, payloads[1])
    ))
    offset = await head_offset(port_b, path)
    for response in responses:
        assert response.status in (204, 409, 423), response
        if response.status == 204:
            assert int(response.header("upload-offset") or -1) <= offset, (response, offset)
        else:
            assert response.body.strip(), response  # a message says why
        if response.status == 409:
            assert response.header("upload-offset") == str(offset), (response, offset)
    told = [r for r in responses if r.status != 204 or int(r.header("upload-offset") or -1) < length]
    assert told, f"both clients were told that their whole upload was stored: {responses}"
    writers = [
        index for index, response in enumerate(responses)
        if response.status == 204 and int(response.header("upload-offset") or -1) == offset
    ]
    assert writers, f"no response accounts for the stored offset {offset}: {responses}"
    writer = payloads[writers[0]]
    if offset < length:
        response = await patch(port_a, path, offset, writer[offset:])
        assert response.status == 204, response
    stored = await object_bytes(endpoint, bucket, upload_id_of(path))
    assert sha256(stored) == sha256(writer), "stored bytes are not one client's bytes"
    return responses


async def scenario_takeover(port_a: int, port_b: int, endpoint: str, bucket: str, seed: int) -> None:
    """A client stalls mid-PATCH on A with its socket open and resumes on B: B's HEAD
    asks A (through the locker) to release; A stores every byte it received and
    answers; B reports that offset well within the acquire timeout; the resumed upload
    is complete and right."""
    length = 9 * MiB
    sent = 6 * MiB + 12_345  # past the first 5 MiB part boundary
    payload = data_of(length, seed)
    path = await create(port_a, length)
    stalled, head = await expect_continue_patch(port_a, path, 0, length)
    try:
        assert head.status == 100, head  # A holds the lock and reads the body
        await stalled.send(payload[:sent])
        loop = asyncio.get_running_loop()
        started = loop.time()
        offset = await head_offset(port_b, path)
        assert loop.time() - started < 10, "the HEAD waited for the acquire timeout"
        assert offset == sent
        answer = await stalled.read_response("PATCH")
        assert answer.status == 204, answer
        assert answer.header("upload-offset") == str(sent)
    finally:
        stalled.abort()
    response = await patch(port_b, path, offset, payload[offset:])
    assert response.status == 204 and response.header("upload-offset") == str(length), response
    assert sha256(await object_bytes(endpoint, bucket, upload_id_of(path))) == sha256(payload)


async def upload_with_interruptions(port: int, payload: bytes, rng: random.Random) -> tuple[str, int]:
    """Upload ``payload`` through ``port``, aborting the socket mid-PATCH at a random
    byte 0-2 times and resuming from HEAD's offset like a tus client. Returns the
    upload path and the number of interruptions."""
    path = await create(port, len(payload))
    interruptions = rng.randint(0, 2)
    done = 0
    offset = 0
    furthest_sent = 0
    while True:
        if done < interruptions:
            done += 1
            remaining = len(payload) - offset
            cut = rng.randrange(1, remaining)
            connection = await unbuffered_connection(port)
            await connection.send(patch_head(path, offset, remaining) + payload[offset:offset + cut])
            connection.abort()
            furthest_sent = max(furthest_sent, offset + cut)
            resumed = await head_offset(port, path)
            # Never a byte that was not sent. It may be more than this attempt sent:
            # an earlier aborted PATCH can still be in flight (nginx, the other
            # worker) and land after the HEAD that answered it; its bytes are the
            # same bytes of the same file, and the final sha256 checks them.
            assert offset <= resumed <= furthest_sent, (offset, cut, resumed, furthest_sent)
            offset = resumed
            continue
        response = await patch(port, path, offset, payload[offset:])
        assert response.status in (204, 409), response
        reported = int(response.header("upload-offset") or -1)
        if reported == len(payload) and response.status == 204:
            return path, done
        # An interrupted PATCH reached its server late (a proxy or another worker
        # still had it in flight): after our HEAD (409, the upload moved on), or
        # during this PATCH, which it asked to release (204, a smaller offset). Go on
        # from the offset the server reports, as tus clients do.
        assert offset < reported < len(payload) or (response.status == 204 and reported == offset), response
        offset = reported


async def scenario_interrupted_uploads(
    port: int, endpoint: str, bucket: str, count: int, seed: int, parallel: int = 4
) -> int:
    """``count`` uploads of 1-12 MiB (some cross 5 MiB part boundaries) through
    ``port`` with random interruptions and resumes (seeded), ``parallel`` at a time;
    every stored object has the right sha256. Returns the number of interruptions."""
    rng = random.Random(seed)
    sizes = [rng.randint(1 * MiB, 12 * MiB) for _ in range(count)]
    seeds = [rng.randrange(1 << 30) for _ in range(count)]
    slots = asyncio.Semaphore(parallel)

    async def one(size: int, upload_seed: int) -> int:
        async with slots:
            payload = data_of(size, upload_seed)
            path, interruptions = await upload_with_interruptions(port, payload, random.Random(upload_seed))
            stored = await object_bytes(endpoint, bucket, upload_id_of(path))
            assert len(stored) == size and sha256(stored) == sha256(payload), f"upload {path} is corrupt"
            return interruptions

    return sum(await asyncio.gather(*(one(size, s) for size, s in zip(sizes, seeds, strict=True))))
