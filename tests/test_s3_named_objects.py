"""Named S3 objects (``store.s3.object_key``, ``metadata_prefix``) against moto over HTTP."""

from __future__ import annotations

import base64
import time
from typing import Any

import pytest
from helpers import data_of, make_bucket, object_bytes
from test_s3_support import bucket_contents, open_store, s3_config, upload

from tusd_py.config import ConfigError, load_config
from tusd_py.stores.base import InvalidObjectKey, ObjectKeyTaken, UploadInfo, UploadNotFound, new_upload_id
from tusd_py.stores.s3 import S3Store


@pytest.fixture
async def bucket(fast_moto: str) -> str:
    return await make_bucket(fast_moto)


def _metadata(**values: str) -> dict[str, str]:
    return {key: base64.b64encode(value.encode()).decode() for key, value in values.items()}


async def _named_store(endpoint: str, bucket: str, **overrides: Any) -> S3Store:
    settings = {"prefix": "files/", "metadata_prefix": "meta/", "object_key": "{date:%Y/%m}/{metadata.filename}"}
    return await open_store(s3_config(endpoint, bucket, **{**settings, **overrides}))


async def _create(store: S3Store, length: int, filename: str, **kwargs: Any) -> UploadInfo:
    info = UploadInfo(id=new_upload_id(), length=length, metadata=_metadata(filename=filename), **kwargs)
    return (await store.create(info)).info


async def test_object_gets_the_templated_key_and_bookkeeping_stays_by_id(fast_moto: str, bucket: str) -> None:
    store = await _named_store(fast_moto, bucket)
    try:
        data = data_of(1500 * 1024)
        created = await _create(store, len(data), "résumé 1.pdf")
        month = time.strftime("%Y/%m", time.gmtime(created.created_at))
        key = f"files/{month}/résumé 1.pdf"
        assert created.storage["Type"] == "s3store"
        assert created.storage["Bucket"] == bucket and created.storage["Key"] == key
        finished = await upload(store, created, data, patch_size=700 * 1024)
        assert finished.storage["Key"] == key
        assert await object_bytes(fast_moto, bucket, key) == data
        keys, multipart = await bucket_contents(fast_moto, bucket)
        assert sorted(keys) == sorted([key, f"meta/{created.id}.info"]) and multipart == []
        opened = await store.get(created.id)  # HEAD/GET find it by id
        assert opened.info.finished and opened.info.offset == len(data)
        assert b"".join([chunk async for chunk in opened.read(0, len(data))]) == data
        await opened.terminate()
        assert await bucket_contents(fast_moto, bucket) == ([], [])
        with pytest.raises(UploadNotFound):
            await store.get(created.id)
    finally:
        await store.close()


@pytest.mark.parametrize("filename", ["..", ".", "a/../../b", "/etc/passwd", "a\\b", "tab\there", "x\x00", ""])
async def test_unsafe_metadata_values_are_refused(fast_moto: str, bucket: str, filename: str) -> None:
    store = await _named_store(fast_moto, bucket)
    try:
        with pytest.raises(InvalidObjectKey):
            await _create(store, 1, filename)
        with pytest.raises(InvalidObjectKey, match="required"):
            await store.create(UploadInfo(id=new_upload_id(), length=1))
        with pytest.raises(InvalidObjectKey, match="1024"):
            await _create(store, 1, "é" * 600)
        assert await bucket_contents(fast_moto, bucket) == ([], [])
    finally:
        await store.close()


async def test_a_hook_chosen_key_follows_the_same_rules(fast_moto: str, bucket: str) -> None:
    store = await _named_store(fast_moto, bucket)
    try:
        chosen = UploadInfo(id=new_upload_id(), length=0, storage={"Key": "invoices/42.pdf"})
        created = (await store.create(chosen)).info
        assert created.storage["Key"] == "files/invoices/42.pdf"
        await (await store.get(created.id)).finish()
        assert await object_bytes(fast_moto, bucket, "files/invoices/42.pdf") == b""
        with pytest.raises(InvalidObjectKey):
            await store.create(UploadInfo(id=new_upload_id(), length=1, storage={"Key": "../escape"}))
    finally:
        await store.close()


async def test_same_key_first_completion_wins_and_is_never_overwritten(fast_moto: str, bucket: str) -> None:
    store = await _named_store(fast_moto, bucket)
    try:
        first_data, second_data = data_of(1200 * 1024, seed=1), data_of(1200 * 1024, seed=2)
        first = await _create(store, len(first_data), "same.bin")
        second = await _create(store, len(second_data), "same.bin")  # both in progress: allowed
        await upload(store, first, first_data, patch_size=len(first_data))
        with pytest.raises(ObjectKeyTaken):
            await upload(store, second, second_data, patch_size=len(second_data))
        key = first.storage["Key"]
        assert await object_bytes(fast_moto, bucket, str(key)) == first_data
        # The loser is still there, unfinished; terminating it leaves the winner's object.
        loser = await store.get(second.id)
        assert not loser.info.finished
        await loser.terminate()
        assert await object_bytes(fast_moto, bucket, str(key)) == first_data
        # Once an object has the key, a new upload for it is refused at creation.
        with pytest.raises(ObjectKeyTaken):
            await _create(store, 1, "same.bin")
    finally:
        await store.close()


async def test_concatenation_builds_a_named_final_object(fast_moto: str, bucket: str) -> None:
    store = await _named_store(fast_moto, bucket)
    try:
        parts = [data_of(300 * 1024, seed=seed) for seed in (1, 2)]
        partials = []
        for data in parts:
            partial = await _create(store, len(data), f"part-{len(partials)}", is_partial=True)
            partials.append(await upload(store, partial, data, patch_size=len(data)))
        final = UploadInfo(id=new_upload_id(), length=sum(map(len, parts)), metadata=_metadata(filename="whole.bin"),
                           partial_ids=tuple(partial.id for partial in partials))
        done = await store.concatenate(final, partials)
        assert done.finished and str(done.storage["Key"]).endswith("/whole.bin")
        assert await object_bytes(fast_moto, bucket, str(done.storage["Key"])) == b"".join(parts)
        listed = [info.id async for info in store.list_uploads()]
        assert sorted(listed) == sorted([final.id, *(partial.id for partial in partials)])
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{date:%Y}", "needs {id}"),
        ("{name}", "unknown placeholder"),
        ("{id", "unmatched"),
        ("/{id}", "must not start"),
        ("{date:%s}", "the format"),
    ],
)
def test_bad_templates_stop_the_server_with_one_line(template: str, message: str) -> None:
    with pytest.raises(ConfigError, match="store.s3.object_key") as raised:
        load_config(environ={"TUSD_PY_STORE_S3_OBJECT_KEY": template})
    assert message in str(raised.value) and "\n" not in str(raised.value)
