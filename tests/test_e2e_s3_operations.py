"""Operations on the S3 store, end to end: S3 call metrics and spool use after a real
tuspy upload through the composed server (moto over HTTP), and no S3 credential in
the logs."""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import make_bucket, tuspy_upload
from prometheus_client.parser import text_string_to_metric_families

from tests.rawhttp import request
from tusd_py.cli import serving
from tusd_py.config import MiB, load_config
from tusd_py.stores.base import IteratedBody, UploadInfo, new_upload_id
from tusd_py.stores.s3 import S3Store

SECRET_KEY = "s3-secret-access-key-value"


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _count(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, operation: str) -> float:
    return samples.get((name, frozenset({("operation", operation)})), 0.0)


async def test_s3_metrics_and_no_credentials_in_logs(
    moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, captured_logs: io.StringIO
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)  # moto accepts any key
    bucket = await make_bucket(moto_endpoint)
    config = load_config(
        environ={},
        overrides={
            "server.port": 0,
            "store.backend": "s3",
            "store.s3.bucket": bucket,
            "store.s3.endpoint_url": moto_endpoint,
            "store.s3.part_size": "5MiB",
            "store.s3.spool_dir": str(tmp_path),
        },
    )
    size = 12 * MiB + 3
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(size))

    async with serving(config) as server:

        await asyncio.to_thread(tuspy_upload, f"{server.url}/files/", source, 5 * MiB)
        missing = await request(server.port, "HEAD", f"/files/{new_upload_id()}")
        assert missing.status == 404
        samples = _samples((await request(server.port, "GET", "/metrics")).body.decode())

    duration = "tusd_py_s3_call_duration_seconds_count"
    errors = "tusd_py_s3_call_errors_total"
    assert _count(samples, duration, "HeadBucket") == 1
    assert _count(samples, duration, "CreateMultipartUpload") == 1
    assert _count(samples, duration, "UploadPart") == 3  # 5 + 5 + 2 MiB
    assert _count(samples, duration, "CompleteMultipartUpload") == 1
    assert not [key for key, value in samples.items() if key[0] == errors and value], "no S3 call failed"
    assert samples[("tusd_py_spool_slots_in_use", frozenset())] == 0  # all freed again
    assert samples[("tusd_py_received_bytes_total", frozenset())] == size
    assert SECRET_KEY not in captured_logs.getvalue()
    assert "tusd_py.access" in captured_logs.getvalue()


class SpoolRecorder:
    def __init__(self) -> None:
        self.in_use = 0
        self.most = 0
        self.calls: list[str] = []

    def s3_call(self, operation: str, seconds: float, error: bool) -> None:
        self.calls.append(operation)

    def spool_in_use(self, delta: int) -> None:
        self.in_use += delta
        self.most = max(self.most, self.in_use)

    def s3_timeout(self, operation: str) -> None:
        self.calls.append(f"{operation} timed out")


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def test_spool_slots_are_reported_taken_and_freed(moto_endpoint: str, tmp_path: Path) -> None:
    bucket = await make_bucket(moto_endpoint)
    config = load_config(
        environ={},
        overrides={
            "store.backend": "s3",
            "store.s3.bucket": bucket,
            "store.s3.endpoint_url": moto_endpoint,
            "store.s3.part_size": "5MiB",
            "store.s3.spool_dir": str(tmp_path),
        },
    )
    recorder = SpoolRecorder()
    store = await S3Store.open(config.store.s3, observer=recorder)
    try:
        upload = await store.create(UploadInfo(id=new_upload_id(), length=12 * MiB))
        # Two whole parts and 1 MiB more that stays a tail segment (a PutObject).
        offset = (await upload.write(0, IteratedBody(_chunks(os.urandom(11 * MiB), 256 * 1024)))).offset
    finally:
        await store.close()
    assert offset == 11 * MiB
    assert recorder.most >= 1 and recorder.in_use == 0
    assert recorder.calls.count("UploadPart") == 2
    assert recorder.calls.count("PutObject") == 2  # the .info document and the tail segment
