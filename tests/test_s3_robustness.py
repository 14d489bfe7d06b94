"""Operator robustness of the S3 store (issue 15): a stalled S3 endpoint, leaked
multipart uploads, zero-length deferred uploads, the start-up bucket check and a
schemeless endpoint URL."""

from __future__ import annotations

import asyncio
import http.server
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.session import get_session
from helpers import data_of, make_bucket, object_bytes
from tcp_proxy import FreezingProxy
from test_s3_extensions import Tus
from test_s3_support import SeamWrapper, open_store, s3_config
from tus_fakes import BASE, Harness, StaticBody, header, make_request

from tusd_py import cli
from tusd_py.config import ConfigError, load_config
from tusd_py.metrics import Metrics
from tusd_py.stores.base import StoreConfigError
from tusd_py.stores.s3 import S3Store
from tusd_py.stores.s3_client import S3Client, S3TransientError
from tusd_py.stores.s3_objects import S3Fields

KiB = 1024
MiB = 1024 * KiB
MOTO_INITIATED = 1262304000.0
"""2010-01-01T00:00:00Z, about when moto says every multipart upload began."""


# --- zero-length upload with deferred length -------------------------------------------


async def _create_deferred(handler: Tus | Harness) -> str:
    response = await handler.handler(make_request("POST", BASE, {"Upload-Defer-Length": "1"}))
    assert response.status == 201, response.status
    return (header(response, "Location") or "").rsplit("/", 1)[-1]


async def _empty_patch(handler: Tus | Harness, upload_id: str, offset: int) -> None:
    headers = {"Content-Type": "application/offset+octet-stream", "Upload-Offset": str(offset)}
    response = await handler.handler(make_request("PATCH", BASE + upload_id, headers, StaticBody()))
    assert response.status == 204, (response.status, response.body)
    assert header(response, "Upload-Offset") == str(offset)


async def _declare_zero(handler: Tus | Harness, upload_id: str) -> None:
    headers = {"Content-Type": "application/offset+octet-stream", "Upload-Offset": "0", "Upload-Length": "0"}
    response = await handler.handler(make_request("PATCH", BASE + upload_id, headers, StaticBody()))
    assert response.status == 204, (response.status, response.body)
    assert header(response, "Upload-Offset") == "0"
    head = await handler.handler(make_request("HEAD", BASE + upload_id))
    assert head.status == 200
    assert (header(head, "Upload-Offset"), header(head, "Upload-Length")) == ("0", "0")
    await _empty_patch(handler, upload_id, 0)  # repeated (the answer was lost): same answer


async def test_zero_length_deferred_upload_on_the_file_store(tus: Harness) -> None:
    upload_id = await _create_deferred(tus)
    await _declare_zero(tus, upload_id)
    assert tus.data(upload_id) == b""


async def test_zero_length_deferred_upload_on_s3(fast_moto: str) -> None:
    bucket = await make_bucket(fast_moto)
    store = await open_store(s3_config(fast_moto, bucket))
    try:
        tus = Tus(store)
        upload_id = await _create_deferred(tus)
        await _declare_zero(tus, upload_id)
        assert await object_bytes(fast_moto, bucket, upload_id) == b""
    finally:
        await store.close()


async def test_empty_patch_to_a_finished_upload_on_s3(fast_moto: str) -> None:
    """The last PATCH repeated without bytes (its answer was lost) is answered like on
    the file store."""
    store = await open_store(s3_config(fast_moto, await make_bucket(fast_moto)))
    try:
        tus = Tus(store)
        upload_id = await tus.create(10)
        assert (await tus.patch(upload_id, 0, b"0123456789")).status == 204
        await _empty_patch(tus, upload_id, 10)
    finally:
        await store.close()


# --- a stalled S3 endpoint ----------------------------------------------------------------


@pytest.fixture
def proxy(fast_moto: str) -> Iterator[FreezingProxy]:
    """A freezable TCP proxy in front of ``fast_moto``."""
    upstream = urllib.parse.urlsplit(fast_moto).port
    assert upstream is not None
    frozen = FreezingProxy(upstream)
    yield frozen
    frozen.close()


async def test_stalled_s3_answers_503_with_the_stored_offset(
    fast_moto: str, proxy: FreezingProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """S3 stops answering in the middle of an UploadPart's body: each request is cut
    off after store.s3.request_timeout and retried, then the PATCH answers 503 with the
    offset that is stored, having logged each timed-out request and counted it, and
    the upload's lock is free (a HEAD answers at once)."""
    bucket = await make_bucket(fast_moto)
    config = s3_config(proxy.url, bucket, request_timeout=1.0)
    metrics = Metrics(process_metrics=False)
    store = await S3Store.open(config, observer=metrics)  # 5 attempts per call
    try:
        tus = Tus(store)
        data = data_of(3 * MiB)
        upload_id = await tus.create(len(data))
        first = MiB + 300 * KiB  # part 1 and a tail segment
        assert (await tus.patch(upload_id, 0, data[:first])).status == 204

        proxy.freeze_after(256 * KiB)  # inside the body of part 2
        started = time.monotonic()
        async with asyncio.timeout(30):  # without a deadline: minutes
            response = await tus.patch(upload_id, first, data[first:])
        elapsed = time.monotonic() - started
        assert proxy.frozen.is_set()
        assert response.status == 503, response.status
        assert header(response, "Upload-Offset") == str(first)
        # 5 attempts x 1 s plus at most 3 s of backoff, plus slack for a loaded host.
        assert elapsed < 12, elapsed

        timeouts = [record.getMessage() for record in caplog.records if "timed out after" in record.getMessage()]
        assert len(timeouts) >= 5, timeouts
        assert f"S3 UploadPart of {bucket}/{upload_id} timed out after 1.0 s" in timeouts
        counted = metrics.registry.get_sample_value("tusd_py_s3_request_timeouts_total", {"operation": "UploadPart"})
        assert counted is not None and counted >= 5

        # What S3 holds while it is still frozen (read past the proxy): the 503's offset.
        direct = await open_store(s3_config(fast_moto, bucket))
        try:
            assert (await direct.get(upload_id)).info.offset == first
        finally:
            await direct.close()

        # Thawed, the requests held in the proxy reach S3 late (as after a stopped
        # process resumes) and may add parts: the client resumes from HEAD's offset.
        proxy.thaw()
        offset = await _offset(tus, upload_id)  # at once: the lock is free
        assert first <= offset < len(data)
        assert (await tus.patch(upload_id, offset, data[offset:])).status == 204
        assert await object_bytes(fast_moto, bucket, upload_id) == data
    finally:
        proxy.thaw()
        await store.close()


async def _offset(tus: Tus, upload_id: str) -> int:
    response = await tus.handler(make_request("HEAD", BASE + upload_id))
    assert response.status == 200, response.status
    return int(header(response, "Upload-Offset") or "-1")


# --- multipart uploads left by a retried CreateMultipartUpload --------------------------


class CreatedThen500(SeamWrapper):
    """CreateMultipartUpload reaches S3, which creates the multipart upload but
    answers 500 (the first ``failures`` times)."""

    def __init__(self, inner: S3Client, failures: int = 1) -> None:
        super().__init__(inner)
        self.failures = failures

    async def _call(self, operation: str, call: Callable[[], Any], sent: int = 0) -> Any:
        result = await call()
        if operation == "CreateMultipartUpload" and self.failures > 0:
            self.failures -= 1
            raise S3TransientError(operation, "InternalError", 500, "created, then failed")
        return result


async def _multipart_ids(endpoint: str, bucket: str, key: str) -> list[str]:
    async with get_session().create_client("s3", endpoint_url=endpoint, region_name="us-east-1") as client:
        listing = await client.list_multipart_uploads(Bucket=bucket, Prefix=key)
    return [item["UploadId"] for item in listing.get("Uploads", []) if item["Key"] == key]


async def test_retried_create_leaves_one_multipart_upload(fast_moto: str) -> None:
    bucket = await make_bucket(fast_moto)
    store = await open_store(s3_config(fast_moto, bucket), inner_wrap=lambda inner: CreatedThen500(inner, 2))
    try:
        tus = Tus(store)
        data = data_of(MiB + 10)
        upload_id = await tus.create(len(data))
        named = S3Fields.of((await store.get(upload_id)).info.storage).multipart_upload_id
        assert await _multipart_ids(fast_moto, bucket, upload_id) == [named]
        assert (await tus.patch(upload_id, 0, data)).status == 204
        assert await _multipart_ids(fast_moto, bucket, upload_id) == []
        assert await object_bytes(fast_moto, bucket, upload_id) == data
    finally:
        await store.close()


async def test_sweep_aborts_multipart_uploads_no_info_names(fast_moto: str) -> None:
    """A multipart upload of a key whose ``.info`` names another one (left by a
    failed attempt before the fix, or by a crash) is aborted after the grace period;
    the named one is kept."""
    bucket = await make_bucket(fast_moto)
    store = await open_store(s3_config(fast_moto, bucket))
    try:
        tus = Tus(store)
        data = data_of(MiB + 10)
        upload_id = await tus.create(len(data))
        async with get_session().create_client("s3", endpoint_url=fast_moto, region_name="us-east-1") as client:
            leaked = (await client.create_multipart_upload(Bucket=bucket, Key=upload_id))["UploadId"]
        named = S3Fields.of((await store.get(upload_id)).info.storage).multipart_upload_id
        assert sorted(await _multipart_ids(fast_moto, bucket, upload_id)) == sorted([named, leaked])

        # Within the grace period: kept. (moto reports a fixed 2010 "Initiated" for
        # every multipart upload, so "younger" means younger than 2009 here.)
        assert await store.remove_orphans(created_before=MOTO_INITIATED - 86400) == 0
        assert len(await _multipart_ids(fast_moto, bucket, upload_id)) == 2
        assert await store.remove_orphans(created_before=time.time() + 60) == 1
        assert await _multipart_ids(fast_moto, bucket, upload_id) == [named]

        assert (await tus.patch(upload_id, 0, data)).status == 204
        assert await object_bytes(fast_moto, bucket, upload_id) == data
    finally:
        await store.close()


# --- the start-up bucket check -----------------------------------------------------------


class _BucketEndpoint(http.server.BaseHTTPRequestHandler):
    """An "S3" that answers HeadBucket with a bodiless 400 (as S3 answers a HEAD that
    timed out: RequestTimeout, with no body to say so) ``failures`` times, then 200."""

    protocol_version = "HTTP/1.1"

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        server = self.server
        assert isinstance(server, _BucketServer)
        server.heads += 1
        self.send_response(400 if server.heads <= server.failures else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass


class _BucketServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, failures: int) -> None:
        super().__init__(("127.0.0.1", 0), _BucketEndpoint)
        self.failures = failures
        self.heads = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def bucket_server(request: pytest.FixtureRequest) -> Iterator[_BucketServer]:
    server = _BucketServer(request.param)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.mark.parametrize("bucket_server", [2], indirect=True)
async def test_bucket_check_retries_a_bodiless_400(bucket_server: _BucketServer) -> None:
    store = await S3Store.open(s3_config(bucket_server.url, "uploads"))
    await store.close()
    assert bucket_server.heads == 3


@pytest.mark.parametrize("bucket_server", [1000], indirect=True)
async def test_bucket_check_says_what_it_tried(bucket_server: _BucketServer) -> None:
    with pytest.raises(StoreConfigError) as raised:
        await S3Store.open(s3_config(bucket_server.url, "uploads"))
    message = str(raised.value)
    assert "\n" not in message
    expected = f"cannot use S3 bucket 'uploads' at {bucket_server.url}: HeadBucket answered 400 without an error code"
    assert expected in message
    assert "HeadBucket tried 4 times in" in message
    assert bucket_server.heads == 4


# --- configuration --------------------------------------------------------------------


@pytest.mark.parametrize("url", ["localhost:9000", "127.0.0.1:9000", "ftp://host", "http://", "minio"])
def test_endpoint_url_without_a_scheme_is_a_one_line_error(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tusd-py.toml"
    path.write_text(f'[store]\nbackend = "s3"\n[store.s3]\nbucket = "uploads"\nendpoint_url = "{url}"\n')
    with pytest.raises(ConfigError, match="store.s3.endpoint_url must be a URL starting with http://"):
        load_config(path, environ={})
    assert cli.main(["--config", str(path)]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "store.s3.endpoint_url" in error and url in error


def test_request_timeout_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="store.s3.request_timeout must be positive"):
        load_config(environ={"TUSD_PY_STORE_S3_REQUEST_TIMEOUT": "0"})
