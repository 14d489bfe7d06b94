"""The S3 objects behind the S3 store's uploads (the rules they follow are stated once,
in ``s3``'s module docstring).

``S3Objects`` is every S3 call the store makes on behalf of an upload: its ``.info``
document, the listings that the offset is derived from (``load``), parts, tail
segments (through the tail cache) and quiet cleanup. It owns what is shared by all
uploads of one store: the client, the process-wide bound on UploadPart calls, the
tail cache and the cache of multipart upload ids. ``S3Fields`` reads the store's
persistent fields out of ``UploadInfo.storage``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
from collections import OrderedDict
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from tusd_py.stores.base import (
    ObjectKeyTaken,
    StorageFields,
    StoreError,
    StoreUnavailable,
    UploadExists,
    UploadInfo,
    UploadNotFound,
    is_valid_upload_id,
)
from tusd_py.stores.s3_checksum import CHECKSUMS, DEFAULT_CHECKSUM, LEGACY_CHECKSUM, Checksum, checksum_named
from tusd_py.stores.s3_client import (
    BodyChecksum,
    ChunksBody,
    ObjectEntry,
    PartBody,
    PartEntry,
    S3Client,
    S3Error,
    S3NotFound,
    S3PreconditionFailed,
)
from tusd_py.stores.s3_keys import DEFAULT_TEMPLATE, ObjectKeyTemplate, check_key
from tusd_py.stores.s3_parts import Layout, Segment, TailCache, UploadKeys, resolve_layout
from tusd_py.stores.s3_spool import SpoolSlot

log = logging.getLogger("tusd_py.stores.s3")

T = TypeVar("T")

DELETE_BATCH_SIZE = 1000
"""S3's limit on keys per DeleteObjects request."""
MULTIPART_ID_CACHE_SIZE = 10_000
"""Upload id -> multipart upload id entries remembered (about 1 MB), so ``load`` can
run ListParts in parallel with reading ``.info`` instead of after it."""
HASH_IN_THREAD_SIZE = 1024 * 1024
"""Bodies at least this large are hashed in a worker thread (hashlib and awscrt release
the GIL), keeping the event loop free."""
STORAGE_TYPE = "s3store"
"""``storage["Type"]`` of an S3 upload (tusd's name)."""
STORAGE_KEY = "Key"
"""``storage["Key"]``: the final object's key in the bucket (tusd's name); a pre-create
hook may set it (relative to ``store.s3.prefix``) before the store does."""
_CONTENT_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")


@dataclass(frozen=True, slots=True)
class S3Fields:
    """The S3 store's persistent fields of one upload (``UploadInfo.storage``, under
    these names in ``.info``)."""

    multipart_upload_id: str | None
    """None for an upload that needs none (length 0)."""
    part_size: int
    """Fixed at creation: every part but the last has exactly this size."""
    max_length: int | None
    """The largest length the upload may reach (None in a document written before
    the field existed: the store's deferred-length ceiling applies)."""
    checksum: str = LEGACY_CHECKSUM
    """The part checksum its multipart upload was created for (``store.s3.checksum``
    then; md5 in a document written before the field existed)."""

    @classmethod
    def of(cls, storage: StorageFields) -> S3Fields:
        """The fields in ``storage``; raises ``ValueError`` when they are unusable."""
        multipart_id = storage.get("multipart_upload_id")
        part_size = storage.get("part_size")
        max_length = storage.get("max_length")
        checksum = str(storage.get("checksum", LEGACY_CHECKSUM))
        if part_size is None:
            raise ValueError("no part_size in the S3 storage fields")
        if checksum not in CHECKSUMS:
            raise ValueError(f"unknown checksum {checksum!r} in the S3 storage fields")
        return cls(
            multipart_upload_id=None if multipart_id is None else str(multipart_id),
            part_size=int(part_size),
            max_length=None if max_length is None else int(max_length),
            checksum=checksum,
        )

    def stored_in(self, info: UploadInfo, bucket: str, key: str) -> UploadInfo:
        """``info`` with these fields and where its object goes (tusd's ``Type``,
        ``Bucket``, ``Key``) in its ``storage`` (other fields kept)."""
        fields = {"multipart_upload_id": self.multipart_upload_id, "part_size": self.part_size,
                  "max_length": self.max_length, "checksum": self.checksum,
                  "Type": STORAGE_TYPE, "Bucket": bucket, STORAGE_KEY: key}
        return dataclasses.replace(info, storage={**info.storage, **fields})


@dataclass(frozen=True, slots=True)
class Listing:
    """What ListParts and ListObjectsV2 (tail segments) returned for one upload."""

    parts: list[PartEntry]
    objects: list[ObjectEntry]


@dataclass(frozen=True, slots=True)
class Loaded:
    """An upload as ``S3Objects.load`` found it."""

    info: UploadInfo
    """With the offset derived from the listings (a finished upload: the object's size)."""
    fields: S3Fields
    layout: Layout | None
    """What counts of the stored bytes; None for a finished upload."""
    listing: Listing | None
    """The listings behind ``layout`` (None for a finished upload)."""


@contextlib.contextmanager
def store_errors(upload_id: str) -> Iterator[None]:
    """Translate S3 errors at the store's boundary into the handler's store errors."""
    try:
        yield
    except S3NotFound as error:
        if error.code == "NoSuchBucket":
            raise StoreUnavailable(f"S3 bucket is gone: {error}") from error
        raise UploadNotFound(upload_id) from error
    except S3Error as error:
        raise StoreUnavailable(f"S3 request failed: {error}") from error


def content_type(info: UploadInfo) -> str | None:
    """The final object's Content-Type from the client's metadata, when it is sane."""
    for key in ("filetype", "contentType", "content-type", "type"):
        value = info.metadata_text(key) if key in info.metadata else None
        if value and _CONTENT_TYPE.fullmatch(value):
            return value
    return None


async def all_or_nothing(coroutines: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """Run ``coroutines`` concurrently; their results in order. When one fails, the
    others are cancelled and awaited before the error is raised (plain
    ``asyncio.gather`` would leave them running, unowned)."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    if not tasks:
        return []
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.wait(tasks)
    errors = [task.exception() for task in tasks if not task.cancelled()]  # every one retrieved
    for error in errors:
        if error is not None:
            raise error
    return [task.result() for task in tasks]


async def _checksum_of(checksum: Checksum, body: bytes | Sequence[bytes]) -> BodyChecksum | None:
    """The checksum of ``body`` (or of its chunks, in order), in a thread when large."""
    chunks = [body] if isinstance(body, bytes) else body
    if sum(len(chunk) for chunk in chunks) >= HASH_IN_THREAD_SIZE and checksum.hasher is not None:
        return await asyncio.to_thread(checksum.of_chunks, chunks)
    return checksum.of_chunks(chunks)


async def _nothing() -> None:
    return None


class S3Objects:
    """The S3 calls of one store's uploads, in bucket ``bucket``: final objects under
    ``prefix``, bookkeeping (``.info``, tail segments) under ``metadata_prefix``."""

    def __init__(
        self, client: S3Client, bucket: str, prefix: str, *, max_part_uploads: int, tail_cache_size: int,
        metadata_prefix: str | None = None, object_key: ObjectKeyTemplate | None = None,
        checksum: str = DEFAULT_CHECKSUM,
    ) -> None:
        self.client = client
        self.checksum = checksum_named(checksum)
        """Sent with new objects and the parts of new multipart uploads."""
        self.bucket = bucket
        self.prefix = prefix
        self.metadata_prefix = prefix if metadata_prefix is None else metadata_prefix
        self.object_key = object_key or ObjectKeyTemplate(DEFAULT_TEMPLATE)
        # One semaphore for the whole process: it bounds the UploadPart calls in
        # flight, and with them the part bodies held in memory for sending.
        self.part_uploads = asyncio.Semaphore(max_part_uploads)
        self._tail_cache = TailCache(tail_cache_size)
        self._multipart_ids: OrderedDict[str, tuple[str, str]] = OrderedDict()
        """Upload id -> (multipart upload id, final object key)."""

    def keys(self, upload_id: str, object_key: str | None = None) -> UploadKeys:
        """The keys of ``upload_id`` whose final object is ``object_key`` (None: the
        prefix and the id, the key of every upload before ``store.s3.object_key``)."""
        return UploadKeys.of(self.metadata_prefix, upload_id, object_key or f"{self.prefix}{upload_id}")

    def new_keys(self, info: UploadInfo) -> UploadKeys:
        """The keys of an upload about to be created: its object's key is the one a
        pre-create hook chose (``storage["Key"]``) or ``store.s3.object_key`` rendered,
        under the prefix. Raises ``InvalidObjectKey``."""
        requested = info.storage.get(STORAGE_KEY)
        if requested is not None:
            check_key(str(requested))
            return self.keys(info.id, f"{self.prefix}{requested}")
        if self.object_key.is_default:
            return self.keys(info.id)
        return self.keys(info.id, f"{self.prefix}{self.object_key.render(info)}")

    def is_named(self, keys: UploadKeys) -> bool:
        """The object's key is not the upload's own (prefix + id): other uploads may
        want it, so it is created only if absent and deleted only once finished."""
        return keys.object != f"{self.prefix}{keys.upload_id}"

    async def refuse_taken(self, keys: UploadKeys) -> None:
        """Raise ``ObjectKeyTaken`` when a named upload's object key is in use (a
        complete object there). Uploads in progress may share a key: the first to
        complete takes it (``complete_if_absent``)."""
        if not self.is_named(keys):
            return
        try:
            await self.client.head_object(self.bucket, keys.object)
        except S3NotFound:
            return
        raise ObjectKeyTaken(f"an object named {keys.object!r} already exists")

    async def complete(
        self, keys: UploadKeys, multipart_id: str, parts: Sequence[PartEntry], checksum: str = LEGACY_CHECKSUM
    ) -> None:
        """CompleteMultipartUpload of a multipart upload created for ``checksum``
        (only that algorithm's part checksums are named: S3 may list others); for a
        named object only if no object has the key (S3's ``If-None-Match: *``), so a
        completed upload is never overwritten by another that chose the same key
        (``ObjectKeyTaken``)."""
        named = checksum_named(checksum).names_parts
        completed = [
            part if named and part.checksum is not None and part.checksum.algorithm == checksum
            else dataclasses.replace(part, checksum=None)
            for part in parts
        ]
        try:
            await self.client.complete_multipart_upload(
                self.bucket, keys.object, multipart_id, completed, if_absent=self.is_named(keys),
            )
        except S3PreconditionFailed as error:
            raise ObjectKeyTaken(f"another upload completed an object named {keys.object!r} first") from error

    async def put_empty(self, keys: UploadKeys) -> None:
        """The object of a zero-length upload (only if absent, for a named one)."""
        if not self.is_named(keys):
            await self.client.put_object(self.bucket, keys.object, b"", self.checksum.of(b""))
            return
        try:
            await self.client.put_object_if(self.bucket, keys.object, b"", if_match=None)
        except S3PreconditionFailed as error:
            raise ObjectKeyTaken(f"another upload completed an object named {keys.object!r} first") from error

    def keys_of(self, info: UploadInfo) -> UploadKeys:
        """The keys of the upload ``info`` describes (its object key is in ``storage``)."""
        key = info.storage.get(STORAGE_KEY)
        return self.keys(info.id, None if key is None else str(key))

    # --- opening an upload -------------------------------------------------------------

    async def load(self, upload_id: str) -> Loaded:
        """Read ``.info``, list the parts and the tail segments (in parallel), and
        derive the offset by the rule of ``s3_parts``.

        ListParts needs the multipart upload id from ``.info``; when this instance has
        seen the upload before it knows that id and runs all three calls at once,
        otherwise ListParts follows the other two.

        An unfinished upload never reports ``offset == length`` (see
        ``resolve_layout``'s ``limit``); a finished one reports the final object's size.
        """
        if not is_valid_upload_id(upload_id):
            raise UploadNotFound(upload_id)
        known_multipart_id, known_key = self._multipart_ids.get(upload_id, (None, None))
        keys = self.keys(upload_id, known_key)
        with store_errors(upload_id):
            document, objects, parts = await asyncio.gather(
                self.client.get_object(self.bucket, keys.info),
                self.list_segments(keys),
                self._list_parts(keys, known_multipart_id) if known_multipart_id else _nothing(),
                return_exceptions=True,
            )
            if isinstance(document, S3NotFound):
                raise UploadNotFound(upload_id)
            if isinstance(document, BaseException):
                raise document
            if isinstance(objects, BaseException):
                raise objects
            info = self.parse_info(upload_id, document)
            fields = S3Fields.of(info.storage)
            keys = self.keys_of(info)
            if info.finished:
                return await self._finished(keys, info, fields, objects)
            multipart_id = fields.multipart_upload_id
            try:
                if multipart_id is None:
                    listed_parts: list[PartEntry] = []
                elif multipart_id != known_multipart_id or keys.object != known_key:
                    listed_parts = await self._list_parts(keys, multipart_id)
                elif isinstance(parts, BaseException):
                    raise parts
                else:
                    listed_parts = parts or []
            except S3NotFound:
                return await self._vanished_multipart_upload(keys, info, fields, objects)
            if multipart_id is not None:
                self.remember_multipart_id(upload_id, multipart_id, keys.object)
        limit = info.length - 1 if info.length else None
        layout = resolve_layout(keys, fields.part_size, info.length, listed_parts, objects, limit=limit)
        info = dataclasses.replace(info, offset=layout.offset)
        return Loaded(info, fields, layout, Listing(listed_parts, objects))

    async def _finished(
        self, keys: UploadKeys, info: UploadInfo, fields: S3Fields, segments: list[ObjectEntry]
    ) -> Loaded:
        head = await self.client.head_object(self.bucket, keys.object)
        if segments:  # left behind by a finish that crashed before its cleanup
            await self.delete_quietly([entry.key for entry in segments])
        return Loaded(dataclasses.replace(info, offset=head.size), fields, None, None)

    async def _vanished_multipart_upload(
        self, keys: UploadKeys, info: UploadInfo, fields: S3Fields, segments: list[ObjectEntry]
    ) -> Loaded:
        """The multipart upload no longer exists: either CompleteMultipartUpload
        succeeded and the crash came before ``.info`` said so (the object is there at
        full length: finish the bookkeeping), or it was aborted (a termination cut
        short, or a bucket lifecycle rule): the upload cannot continue and is gone."""
        try:
            head: ObjectEntry | None = await self.client.head_object(self.bucket, keys.object)
        except S3NotFound:
            head = None
        if head is not None and head.size == info.length:
            info = dataclasses.replace(info, finished=True)
            await self.put_info(keys, info)
            return await self._finished(keys, info, fields, segments)
        log.warning("upload %s: multipart upload is gone and no complete object exists; removing it", info.id)
        await self.delete_quietly([entry.key for entry in segments] + [keys.info])
        self.forget_multipart_id(info.id)
        raise UploadNotFound(info.id)

    def remember_multipart_id(self, upload_id: str, multipart_id: str, object_key: str) -> None:
        self._multipart_ids[upload_id] = (multipart_id, object_key)
        self._multipart_ids.move_to_end(upload_id)
        while len(self._multipart_ids) > MULTIPART_ID_CACHE_SIZE:
            self._multipart_ids.popitem(last=False)

    def forget_multipart_id(self, upload_id: str) -> None:
        self._multipart_ids.pop(upload_id, None)

    # --- .info -------------------------------------------------------------------------

    def parse_info(self, upload_id: str, document: bytes) -> UploadInfo:
        """The ``.info`` document of ``upload_id``; raises ``StoreUnavailable`` when
        it is unreadable or names another upload."""
        try:
            info = UploadInfo.from_json(json.loads(document))
            S3Fields.of(info.storage)
        except (ValueError, KeyError, TypeError) as error:
            raise StoreUnavailable(f"upload {upload_id}: unreadable .info: {error}") from error
        if info.id != upload_id:
            raise StoreUnavailable(f"upload {upload_id}: .info names another upload ({info.id})")
        return info

    async def refuse_existing(self, keys: UploadKeys, upload_id: str) -> None:
        """Raise ``UploadExists`` when ``.info`` exists: a pre-create hook chose the id
        of an upload in use, whose multipart upload and ``.info`` must stay as they are.
        (The caller holds the id's lock, so no other request creates it meanwhile.)"""
        try:
            await self.client.head_object(self.bucket, keys.info)
        except S3NotFound:
            return
        raise UploadExists(upload_id)

    async def put_info(self, keys: UploadKeys, info: UploadInfo) -> None:
        body = json.dumps(info.to_json(), separators=(",", ":")).encode()
        await self.client.put_object(self.bucket, keys.info, body, self.checksum.of(body))

    # --- listings ----------------------------------------------------------------------

    async def _list_parts(self, keys: UploadKeys, multipart_id: str) -> list[PartEntry]:
        parts: list[PartEntry] = []
        marker: int | None = None
        while True:
            page = await self.client.list_parts(self.bucket, keys.object, multipart_id, marker)
            parts.extend(page.parts)
            if page.next_marker is None:
                return parts
            marker = page.next_marker

    async def list_segments(self, keys: UploadKeys) -> list[ObjectEntry]:
        objects: list[ObjectEntry] = []
        token: str | None = None
        while True:
            page = await self.client.list_objects(self.bucket, keys.tail_prefix, token)
            objects.extend(page.objects)
            if page.next_token is None:
                return objects
            token = page.next_token

    # --- parts and tail segments -------------------------------------------------------

    async def read_segments(self, segments: Sequence[Segment]) -> list[bytes]:
        """The bytes of ``segments``: from the tail cache when it holds exactly the
        listed object (same key, size and ETag), else from S3, in parallel."""

        async def one(segment: Segment) -> bytes:
            cached = self._tail_cache.get(segment)
            if cached is not None:
                return cached
            data = await self.client.get_object(self.bucket, segment.key)
            if len(data) != segment.size:
                raise StoreError(f"tail segment {segment.key} changed while in use ({len(data)} != {segment.size})")
            return data

        return await all_or_nothing([one(segment) for segment in segments])

    async def put_segment(self, keys: UploadKeys, start: int, data: bytes) -> Segment:
        key = keys.segment(start)
        etag = await self.client.put_object(self.bucket, key, data, await _checksum_of(self.checksum, data))
        self._tail_cache.put(key, etag, data)
        return Segment(key, start, len(data), etag)

    async def upload_part(
        self, keys: UploadKeys, multipart_id: str, number: int, data: list[bytes], checksum: str,
        slot: SpoolSlot | None = None,
    ) -> PartEntry:
        """UploadPart of ``data`` followed by the bytes of ``slot``, with the
        ``checksum`` the multipart upload was created for (the slot's digest when it
        hashed its bytes with it while spooling). The slot is read (from its spool
        file) only inside the global semaphore, so the part bodies in memory are
        bounded by ``max_concurrent_part_uploads``; a whole part in a spool file goes
        as a ``StreamedBody``, which the client sends in pieces when it does not sign
        bodies (then a part in flight holds one piece in memory)."""
        algorithm = checksum_named(checksum)
        async with self.part_uploads:
            if slot is not None and not data:
                streamed = await slot.streamed()
                digest = slot.digest()
                if streamed is not None and (digest is not None or algorithm.hasher is None):
                    # The whole part is in the spool file and its checksum is known:
                    # it goes to S3 in pieces read from the file (``StreamedBody``).
                    sent = algorithm.of_digest(digest) if digest is not None else None
                    etag = await self.client.upload_part(self.bucket, keys.object, multipart_id, number, streamed, sent)
                    return PartEntry(number, len(streamed), etag, sent)
            digest = None
            if slot is not None:
                whole_part = not data
                data = data + await slot.read_chunks()
                if whole_part:
                    digest = slot.digest()  # hashed while it was spooled, if the slot did
            body: PartBody = data[0] if len(data) == 1 else ChunksBody(data)
            sent = algorithm.of_digest(digest) if digest is not None else await _checksum_of(algorithm, data)
            etag = await self.client.upload_part(self.bucket, keys.object, multipart_id, number, body, sent)
            return PartEntry(number, len(body), etag, sent)

    # --- deleting ----------------------------------------------------------------------

    async def delete_keys(self, keys: Sequence[str]) -> None:
        for key in keys:
            self._tail_cache.discard(key)
        for start in range(0, len(keys), DELETE_BATCH_SIZE):
            await self.client.delete_objects(self.bucket, keys[start:start + DELETE_BATCH_SIZE])

    async def delete_quietly(self, keys: Sequence[str]) -> None:
        """Delete garbage (objects that no longer count); a failure is only logged:
        the offset rule ignores them, and a later write or termination retries."""
        try:
            await self.delete_keys(keys)
        except S3Error as error:
            log.warning("could not delete %d leftover object(s): %s", len(keys), error)

    async def delete_tail_quietly(self, keys: UploadKeys) -> None:
        try:
            segments = await self.list_segments(keys)
        except S3Error as error:
            log.warning("could not list tail segments of %s: %s", keys.object, error)
            return
        await self.delete_quietly([entry.key for entry in segments])

    async def abort_quietly(self, keys: UploadKeys, multipart_id: str) -> None:
        try:
            await self.client.abort_multipart_upload(self.bucket, keys.object, multipart_id)
        except S3Error as error:
            log.warning("could not abort multipart upload of %s: %s", keys.object, error)


@dataclass(frozen=True, slots=True)
class UploadPartSink:
    """The ``s3_writer.PartSink`` of one upload: ``objects`` bound to its keys and
    multipart upload id."""

    objects: S3Objects
    keys: UploadKeys
    multipart_id: str
    checksum: str = LEGACY_CHECKSUM
    """The part checksum the multipart upload was created for."""

    async def upload_part(self, number: int, data: list[bytes], slot: SpoolSlot | None) -> PartEntry:
        return await self.objects.upload_part(self.keys, self.multipart_id, number, data, self.checksum, slot)

    async def put_segment(self, start: int, data: bytes) -> Segment:
        return await self.objects.put_segment(self.keys, start, data)

    async def read_segments(self, segments: Sequence[Segment]) -> list[bytes]:
        return await self.objects.read_segments(segments)

    async def delete_quietly(self, keys: Sequence[str]) -> None:
        await self.objects.delete_quietly(keys)
