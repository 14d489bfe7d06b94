"""The S3 store: uploads built in Amazon S3 (or an S3-compatible service).

Per upload id ``U`` under the key prefix ``P`` (see DESIGN.md, "S3 store"):

- ``P U``: the final object, built by one multipart upload;
- ``P U.info``: the JSON upload info (``UploadInfo.to_json``; ``storage`` holds the
  multipart upload id, the part size and the largest length the upload may reach);
- ``P U.tail/<start offset, zero padded>``: tail segments, bytes after the last full
  part that are not yet a part.

All parts but the last have exactly the upload's part size, so bytes
``[k * part_size, (k + 1) * part_size)`` are part ``k + 1``, and the offset is derived
from what S3 lists (``s3_parts.resolve_layout``): parts and segments that a crashed or
failed write left behind do not count. That, plus doing every write in an order where
the old copy of a byte is removed only after the new copy is stored, makes every
crash point safe. No local state is needed between requests: any instance can serve
the next request of an upload.

A PATCH (``S3Store.write``) cuts its body into part-sized pieces, spools each in a slot
of a bounded ring and uploads completed parts concurrently while the body keeps
arriving; what is left below the next part boundary when the body ends becomes one new
tail segment. ``write`` returns only once everything it counts is in S3.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tusd_py.config import S3StoreConfig
from tusd_py.stores.base import (
    StoreConfigError,
    StoreError,
    StoreUnavailable,
    UploadExists,
    UploadInfo,
    UploadNotFound,
    UploadTooLarge,
    is_valid_upload_id,
)
from tusd_py.stores.s3_client import (
    AioS3Client,
    ObjectEntry,
    PartEntry,
    RetryingS3Client,
    RetryPolicy,
    S3Client,
    S3Error,
    S3NotFound,
    content_md5,
)
from tusd_py.stores.s3_concat import MIN_PART_SIZE, PlannedPart, SourceRange, plan_parts
from tusd_py.stores.s3_observed import ObservedS3Client, S3Observer
from tusd_py.stores.s3_parts import (
    MAX_OBJECT_SIZE,
    MAX_PARTS,
    Layout,
    Segment,
    TailCache,
    UploadKeys,
    deferred_length_ceiling,
    final_part_number,
    part_size_for,
    resolve_layout,
)
from tusd_py.stores.s3_spool import Hasher, SpoolRing, SpoolSlot

log = logging.getLogger("tusd_py.stores.s3")

T = TypeVar("T")

DELETE_BATCH_SIZE = 1000
"""S3's limit on keys per DeleteObjects request."""
MULTIPART_ID_CACHE_SIZE = 10_000
"""Upload id -> multipart upload id entries remembered (about 1 MB), so get_info can
run ListParts in parallel with reading ``.info`` instead of after it."""
MD5_IN_THREAD_SIZE = 1024 * 1024
"""Bodies at least this large are hashed in a worker thread (hashlib releases the GIL),
keeping the event loop free."""
CONCAT_PARTS_IN_FLIGHT = 4
"""Parts of a final upload being built at once (copies or download + upload); with the
global UploadPart semaphore this bounds the memory of a concatenation (5 MiB each)."""
ASSEMBLY_DEADLINE_SECONDS = 3600.0
"""A final upload being assembled has an ``.info`` (so a crash leaves nothing
unreferenced) whose expiry is this far ahead; finishing clears it. After a crash the
half-built upload expires and a sweep aborts its multipart upload."""
_CONTENT_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")


@dataclass(slots=True)
class _UploadState:
    """What ``get_info`` (or ``write``) learned about an upload's stored bytes, passed
    on to the next call in the same request through ``UploadInfo.state``."""

    upload_id: str
    layout: Layout
    listed_parts: list[PartEntry] | None = None
    """The raw listings behind ``layout`` (None when ``layout`` came from a write)."""
    listed_objects: list[ObjectEntry] | None = None


@dataclass(eq=False, slots=True)
class _PartJob:
    """One part being uploaded by a PATCH."""

    number: int
    start: int
    prefix: list[Segment]
    """Existing tail segments that form the beginning of this part."""
    slot: SpoolSlot | None
    """The part's new bytes (None when the prefix alone fills the part)."""
    task: asyncio.Task[PartEntry] | None = None
    holds_ring_slot: bool = False

    @property
    def prefix_size(self) -> int:
        return sum(segment.size for segment in self.prefix)


@contextlib.contextmanager
def _store_errors(upload_id: str) -> Iterator[None]:
    """Translate S3 errors at the store's boundary into the handler's store errors."""
    try:
        yield
    except S3NotFound as error:
        if error.code == "NoSuchBucket":
            raise StoreUnavailable(f"S3 bucket is gone: {error}") from error
        raise UploadNotFound(upload_id) from error
    except S3Error as error:
        raise StoreUnavailable(f"S3 request failed: {error}") from error


def _content_type(info: UploadInfo) -> str | None:
    """The final object's Content-Type from the client's metadata, when it is sane."""
    for key in ("filetype", "contentType", "content-type", "type"):
        value = info.metadata_text(key) if key in info.metadata else None
        if value and _CONTENT_TYPE.fullmatch(value):
            return value
    return None


class S3Store:
    """Uploads in an S3 bucket; implements ``Store``, ``SupportsTermination``,
    ``SupportsDeferredLength``, ``SupportsDownload``, ``SupportsConcatenation`` and
    ``SupportsExpiration``.

    Build it with ``S3Store.open(config)``; the constructor takes any ``S3Client``
    (tests wrap one to inject faults or count bytes).
    """

    def __init__(
        self, client: S3Client, config: S3StoreConfig, *, max_size: int = 0, observer: S3Observer | None = None
    ) -> None:
        """``observer`` (optional, the server's metrics) hears spool slot use; S3 call
        timings come from wrapping ``client`` (``open`` does that)."""
        self._client = client
        self._spool_observer = observer.spool_in_use if observer is not None else None
        self._config = config
        self._bucket = config.bucket
        self._prefix = config.prefix
        self._deferred_ceiling = deferred_length_ceiling(config.deferred_length_ceiling, max_size, config.part_size)
        # One semaphore for the whole process: it bounds the UploadPart calls in
        # flight, and with them the part bodies held in memory for sending.
        self._part_uploads = asyncio.Semaphore(config.max_concurrent_part_uploads)
        self._tail_cache = TailCache(config.tail_cache_size)
        self._multipart_ids: OrderedDict[str, str] = OrderedDict()

    @classmethod
    async def open(cls, config: S3StoreConfig, *, max_size: int = 0, observer: S3Observer | None = None) -> S3Store:
        """Connect with credentials from the standard AWS chain and check the bucket
        (HeadBucket), so that a missing bucket or bad credentials stop the server at
        start-up with a clear ``StoreConfigError`` instead of failing the first upload.
        ``observer`` (optional, the server's metrics) hears every S3 call and spool use."""
        if not config.bucket:
            raise StoreConfigError("store.s3.bucket is not set")
        where = config.endpoint_url or "AWS S3"
        try:
            raw = await AioS3Client.connect(
                endpoint_url=config.endpoint_url,
                region=config.region,
                max_pool_connections=config.max_concurrent_part_uploads * 2 + 8,
            )
        except S3Error as error:
            raise StoreConfigError(f"S3 store: {error}") from error
        client: S3Client = RetryingS3Client(raw, RetryPolicy())
        if observer is not None:
            client = ObservedS3Client(client, observer)
        try:
            await client.head_bucket(config.bucket)
        except S3Error as error:
            await client.close()
            if isinstance(error, S3NotFound):
                message = f"S3 bucket {config.bucket!r} does not exist at {where}"
            elif error.status in (401, 403) or error.code in {"InvalidAccessKeyId", "SignatureDoesNotMatch"}:
                message = (
                    f"S3 refused access to bucket {config.bucket!r} at {where} ({error.code}): check the "
                    "AWS credentials (environment, profile or instance role) and the bucket policy"
                )
            elif error.code == "ConnectionError":
                message = f"cannot reach S3 at {where}: {error}"
            else:
                message = f"cannot use S3 bucket {config.bucket!r} at {where}: {error}"
            raise StoreConfigError(message) from error
        except BaseException:
            await client.close()
            raise
        return cls(client, config, max_size=max_size, observer=observer)

    async def close(self) -> None:
        """Close the S3 client."""
        await self._client.close()

    # --- Store -------------------------------------------------------------------------

    async def create(self, info: UploadInfo) -> UploadInfo:
        """Check that no ``.info`` has this id, start the multipart upload, then
        write ``.info``.

        ``.info`` goes last: an upload exists once its ``.info`` does, and everything
        it names exists by then. (A crash in between leaves a multipart upload nobody
        points to, which S3 lifecycle rules or ``remove_orphans`` clean up.)
        """
        if info.length is not None and info.length > MAX_OBJECT_SIZE:
            raise UploadTooLarge(f"upload length {info.length} exceeds S3's largest object ({MAX_OBJECT_SIZE} bytes)")
        max_length = info.length if info.length is not None else self._deferred_ceiling
        part_size = part_size_for(max_length, self._config.part_size)
        keys = self._keys(info.id)
        with _store_errors(info.id):
            await self._refuse_existing(keys, info.id)
            # A zero-length upload needs no multipart upload: finish writes an empty object.
            upload_id = None
            if info.length != 0:
                upload_id = await self._client.create_multipart_upload(
                    self._bucket, keys.object, _content_type(info)
                )
            info.storage.update({"multipart_upload_id": upload_id, "part_size": part_size, "max_length": max_length})
            try:
                await self._put_info(keys, info)
            except BaseException:
                if upload_id is not None:
                    await self._abort_quietly(keys, upload_id)
                raise
        if upload_id is not None:
            self._remember_multipart_id(info.id, upload_id)
        info.offset = 0
        info.state = _UploadState(info.id, Layout(part_size), [], [])
        return info

    async def get_info(self, upload_id: str) -> UploadInfo:
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
        keys = self._keys(upload_id)
        known_multipart_id = self._multipart_ids.get(upload_id)
        with _store_errors(upload_id):
            document, objects, parts = await asyncio.gather(
                self._client.get_object(self._bucket, keys.info),
                self._list_segments(keys),
                self._list_parts(keys, known_multipart_id) if known_multipart_id else _nothing(),
                return_exceptions=True,
            )
            if isinstance(document, S3NotFound):
                raise UploadNotFound(upload_id)
            if isinstance(document, BaseException):
                raise document
            if isinstance(objects, BaseException):
                raise objects
            info = self._parse_info(upload_id, document)
            if info.finished:
                return await self._finished_info(keys, info, objects)
            multipart_id = info.storage.get("multipart_upload_id")
            try:
                if multipart_id is None:
                    listed_parts: list[PartEntry] = []
                elif multipart_id != known_multipart_id:
                    listed_parts = await self._list_parts(keys, str(multipart_id))
                elif isinstance(parts, BaseException):
                    raise parts
                else:
                    listed_parts = parts or []
            except S3NotFound:
                return await self._vanished_multipart_upload(keys, info, objects)
            if multipart_id is not None:
                self._remember_multipart_id(upload_id, str(multipart_id))
        part_size = int(info.storage["part_size"])
        limit = info.length - 1 if info.length else None
        layout = resolve_layout(keys, part_size, info.length, listed_parts, objects, limit=limit)
        info.offset = layout.offset
        info.state = _UploadState(upload_id, layout, listed_parts, objects)
        return info

    async def write(self, info: UploadInfo, chunks: AsyncIterable[bytes]) -> int:
        """Append ``chunks`` at ``info.offset``; returns the new offset, counting only
        bytes that are in S3.

        When ``chunks`` ends early or raises, everything it yielded is stored (complete
        parts as parts, the rest as one tail segment) before ``write`` returns or
        re-raises. When an UploadPart fails for good, the bytes of that part are kept
        as a tail segment if S3 still accepts that, ``info.offset`` is set to what is
        stored, and ``StoreUnavailable`` is raised. A deferred-length upload that would
        grow past its ceiling stores what fits and raises ``UploadTooLarge``.
        """
        if info.finished:
            raise StoreError(f"upload {info.id} is already finished")
        with _store_errors(info.id):
            state = await self._state_for(info)
            limit = info.length
            if limit is None:
                limit = int(info.storage.get("max_length", self._deferred_ceiling))
            writer = _PatchWriter(self, info, state.layout, limit)
            return await writer.run(chunks)

    async def finish(self, info: UploadInfo) -> UploadInfo:
        """Complete the multipart upload (the tail, if any, becomes the last part),
        then record ``finished`` in ``.info``, then delete leftovers. Idempotent.

        Each step is safe to crash after: before CompleteMultipartUpload nothing
        changed for the client; after it, ``get_info`` sees the multipart upload gone
        and the object present at full length, and finishes the bookkeeping itself.
        """
        if info.finished:
            return info
        if info.length is None:
            raise StoreError(f"upload {info.id}: cannot finish before its length is known")
        keys = self._keys(info.id)
        with _store_errors(info.id):
            layout = await self._complete_layout(info)
            if layout is None:  # finished meanwhile (a retried finish after a crash)
                return info
            upload_id = info.storage.get("multipart_upload_id")
            if info.length == 0:
                # S3 (and moto) accept one empty part, but not every S3-compatible
                # service does; an empty PutObject works everywhere.
                await self._client.put_object(self._bucket, keys.object, b"", content_md5(b""))
            else:
                assert upload_id is not None
                parts = list(layout.parts)
                if layout.segments:
                    data = await self._read_segments(layout.segments)
                    parts.append(await self._upload_part(keys, str(upload_id), len(parts) + 1, data))
                try:
                    await self._client.complete_multipart_upload(
                        self._bucket, keys.object, str(upload_id), [(part.number, part.etag) for part in parts]
                    )
                except S3NotFound:
                    # A retried Complete whose first response was lost: fine if the
                    # object is there at full length.
                    head = await self._client.head_object(self._bucket, keys.object)
                    if head.size != info.length:
                        raise
            info.finished = True
            await self._put_info(keys, info)
        # Leftovers are garbage from here on; failing to delete them loses nothing.
        await self._delete_tail_quietly(keys)
        if info.length == 0 and upload_id is not None:
            await self._abort_quietly(keys, str(upload_id))
        self._multipart_ids.pop(info.id, None)
        info.offset = info.length
        info.state = None
        return info

    # --- SupportsDeferredLength ----------------------------------------------------------

    async def declare_length(self, info: UploadInfo, length: int) -> UploadInfo:
        """Record the now-known length in ``.info``. Raises ``UploadTooLarge`` above
        the upload's ceiling (fixed at creation, it set the part size)."""
        if info.length is not None:
            if info.length == length:
                return info
            raise StoreError(f"upload {info.id}: length already declared as {info.length}")
        if length < info.offset:
            raise StoreError(f"upload {info.id}: declared length {length} is below the offset {info.offset}")
        max_length = int(info.storage.get("max_length", self._deferred_ceiling))
        if length > max_length:
            raise UploadTooLarge(
                f"declared length {length} exceeds the {max_length} bytes a deferred-length upload may reach "
                "(store.s3.deferred_length_ceiling)"
            )
        info.length = length
        with _store_errors(info.id):
            await self._put_info(self._keys(info.id), info)
        return info

    # --- SupportsTermination ---------------------------------------------------------------

    async def terminate(self, info: UploadInfo) -> None:
        """Abort the multipart upload, delete the tail segments and the final object,
        and delete ``.info`` last, so that a termination cut short by a crash can be
        repeated: until ``.info`` is gone, the upload is still found."""
        keys = self._keys(info.id)
        upload_id = info.storage.get("multipart_upload_id")
        with _store_errors(info.id):
            if upload_id is not None and not info.finished:
                try:
                    await self._client.abort_multipart_upload(self._bucket, keys.object, str(upload_id))
                except S3NotFound:
                    pass
            segments = await self._list_segments(keys)
            await self._delete_keys([entry.key for entry in segments] + [keys.object])
            await self._delete_keys([keys.info])
        for entry in segments:
            self._tail_cache.discard(entry.key)
        self._multipart_ids.pop(info.id, None)

    # --- SupportsDownload ------------------------------------------------------------------

    async def read(self, info: UploadInfo, start: int, stop: int) -> AsyncIterator[bytes]:
        """Stream bytes ``[start, stop)`` of a finished upload (ranged GET; a broken
        stream is resumed where it broke)."""
        if not info.finished:
            raise StoreError(f"upload {info.id} is not finished")
        keys = self._keys(info.id)
        with _store_errors(info.id):
            async with contextlib.aclosing(self._client.stream_object(self._bucket, keys.object, start, stop)) as body:
                async for chunk in body:
                    yield chunk

    # --- SupportsConcatenation ------------------------------------------------------------

    async def concatenate(self, final: UploadInfo, partials: list[UploadInfo]) -> UploadInfo:
        """Build the final object with one multipart upload planned by
        ``s3_concat.plan_parts``: UploadPartCopy where a partial has 5 MiB or more
        left, combined download + upload parts for smaller pieces.

        Order: CreateMultipartUpload, ``.info`` (unfinished, expiring after
        ``ASSEMBLY_DEADLINE_SECONDS``), the parts, CompleteMultipartUpload, ``.info``
        finished. A failure aborts the multipart upload and deletes ``.info``; a crash
        leaves either an expiring unfinished upload (swept like any other) or a
        complete object that ``get_info`` recognises as finished.
        """
        assert final.length is not None
        if final.length > MAX_OBJECT_SIZE:
            raise UploadTooLarge(f"final length {final.length} exceeds S3's largest object ({MAX_OBJECT_SIZE} bytes)")
        keys = self._keys(final.id)
        plan = plan_parts([(self._keys(partial.id).object, partial.offset) for partial in partials])
        if len(plan) > MAX_PARTS:
            raise UploadTooLarge(f"the partial uploads would need {len(plan)} parts; S3 allows {MAX_PARTS}")
        final.storage.update({"multipart_upload_id": None, "part_size": MIN_PART_SIZE, "max_length": final.length})
        with _store_errors(final.id):
            await self._refuse_existing(keys, final.id)
            if final.length == 0:
                await self._client.put_object(self._bucket, keys.object, b"", content_md5(b""))
            else:
                multipart_id = await self._client.create_multipart_upload(
                    self._bucket, keys.object, _content_type(final)
                )
                final.storage["multipart_upload_id"] = multipart_id
                assembling = dataclasses.replace(final, expires_at=time.time() + ASSEMBLY_DEADLINE_SECONDS)
                try:
                    await self._put_info(keys, assembling)
                    gate = asyncio.Semaphore(CONCAT_PARTS_IN_FLIGHT)
                    parts = await _all_or_nothing([
                        self._build_part(keys, multipart_id, number, part, gate)
                        for number, part in enumerate(plan, 1)
                    ])
                    await self._client.complete_multipart_upload(
                        self._bucket, keys.object, multipart_id, [(part.number, part.etag) for part in parts]
                    )
                except BaseException:
                    await self._abort_quietly(keys, multipart_id)
                    await self._delete_quietly([keys.info])
                    raise
            final.finished = True
            await self._put_info(keys, final)
        final.offset = final.length
        final.state = None
        return final

    async def _build_part(
        self, keys: UploadKeys, multipart_id: str, number: int, part: PlannedPart, gate: asyncio.Semaphore
    ) -> PartEntry:
        async with gate:
            if part.copy:
                (piece,) = part.ranges
                async with self._part_uploads:
                    etag = await self._client.upload_part_copy(
                        self._bucket, keys.object, multipart_id, number, piece.key, piece.start, piece.stop
                    )
                return PartEntry(number, piece.size, etag)
            data = [await self._download(piece) for piece in part.ranges]
            return await self._upload_part(keys, multipart_id, number, data)

    async def _download(self, piece: SourceRange) -> bytes:
        chunks: list[bytes] = []
        async with contextlib.aclosing(
            self._client.stream_object(self._bucket, piece.key, piece.start, piece.stop)
        ) as stream:
            async for chunk in stream:
                chunks.append(chunk)
        data = b"".join(chunks)
        if len(data) != piece.size:
            raise StoreError(f"{piece.key} is shorter than its upload's length ({len(data)} != {piece.size})")
        return data

    # --- SupportsExpiration ------------------------------------------------------------------

    async def list_uploads(self) -> AsyncIterator[UploadInfo]:
        """Every upload's ``.info`` under the prefix (offsets not filled in; an
        unreadable document is logged and skipped)."""
        token: str | None = None
        while True:
            with _store_errors(""):
                page = await self._client.list_objects(self._bucket, self._prefix, token)
            for entry in page.objects:
                upload_id = self._owner_of(entry.key, ".info")
                if upload_id is None:
                    continue
                try:
                    with _store_errors(upload_id):
                        document = await self._client.get_object(self._bucket, entry.key)
                except UploadNotFound:
                    continue  # terminated meanwhile
                try:
                    info = self._parse_info(upload_id, document)
                except StoreUnavailable as error:  # a corrupt document must not stop a sweep
                    log.warning("skipping upload %s: %s", upload_id, error)
                    continue
                yield info
            if page.next_token is None:
                return
            token = page.next_token

    async def remove_orphans(self, created_before: float) -> int:
        """Abort multipart uploads and delete tail segments under the prefix whose
        upload has no ``.info`` and that were created before ``created_before``.
        Objects without ``.info`` are left alone: a complete object may be a finished
        upload whose ``.info`` its consumer removed on purpose."""
        with _store_errors(""):
            objects: list[ObjectEntry] = []
            token: str | None = None
            while True:
                page = await self._client.list_objects(self._bucket, self._prefix, token)
                objects.extend(page.objects)
                if page.next_token is None:
                    break
                token = page.next_token
            with_info = {owner for entry in objects if (owner := self._owner_of(entry.key, ".info")) is not None}
            segments = [
                entry.key
                for entry in objects
                if (owner := self._owner_of(entry.key, ".tail/", exact=False)) is not None
                and owner not in with_info
                and entry.last_modified is not None
                and entry.last_modified < created_before
            ]
            removed = len(segments)
            if segments:
                await self._delete_quietly(segments)
            marker: tuple[str, str] | None = None
            while True:
                multipart_page = await self._client.list_multipart_uploads(self._bucket, self._prefix, marker)
                for upload in multipart_page.uploads:
                    owner = self._owner_of(upload.key, "")
                    if owner is None or owner in with_info or upload.initiated >= created_before:
                        continue
                    try:
                        await self._client.abort_multipart_upload(self._bucket, upload.key, upload.upload_id)
                    except S3NotFound:
                        continue
                    log.info("aborted orphan multipart upload of %s", upload.key)
                    removed += 1
                if multipart_page.next_marker is None:
                    break
                marker = multipart_page.next_marker
        return removed

    def _owner_of(self, key: str, suffix: str, exact: bool = True) -> str | None:
        """The upload id of ``<prefix><id><suffix>`` (``exact``: nothing after the
        suffix; else anything may follow it), or None for a foreign key."""
        if not key.startswith(self._prefix):
            return None
        rest = key[len(self._prefix):]
        if suffix:
            upload_id, found, after = rest.partition(suffix)
            if not found or (exact and after):
                return None
        else:
            upload_id = rest
        return upload_id if is_valid_upload_id(upload_id) else None

    # --- helpers ---------------------------------------------------------------------------

    def _keys(self, upload_id: str) -> UploadKeys:
        return UploadKeys.of(self._prefix, upload_id)

    def _remember_multipart_id(self, upload_id: str, multipart_id: str) -> None:
        self._multipart_ids[upload_id] = multipart_id
        self._multipart_ids.move_to_end(upload_id)
        while len(self._multipart_ids) > MULTIPART_ID_CACHE_SIZE:
            self._multipart_ids.popitem(last=False)

    def _parse_info(self, upload_id: str, document: bytes) -> UploadInfo:
        try:
            info = UploadInfo.from_json(json.loads(document))
            int(info.storage["part_size"])
        except (ValueError, KeyError, TypeError) as error:
            raise StoreUnavailable(f"upload {upload_id}: unreadable .info: {error}") from error
        if info.id != upload_id:
            raise StoreUnavailable(f"upload {upload_id}: .info names another upload ({info.id})")
        return info

    async def _refuse_existing(self, keys: UploadKeys, upload_id: str) -> None:
        """Raise ``UploadExists`` when ``.info`` exists: a pre-create hook chose the id
        of an upload in use, whose multipart upload and ``.info`` must stay as they are.
        (The caller holds the id's lock, so no other request creates it meanwhile.)"""
        try:
            await self._client.head_object(self._bucket, keys.info)
        except S3NotFound:
            return
        raise UploadExists(upload_id)

    async def _put_info(self, keys: UploadKeys, info: UploadInfo) -> None:
        body = json.dumps(info.to_json(), separators=(",", ":")).encode()
        await self._client.put_object(self._bucket, keys.info, body, content_md5(body))

    async def _list_parts(self, keys: UploadKeys, multipart_id: str) -> list[PartEntry]:
        parts: list[PartEntry] = []
        marker: int | None = None
        while True:
            page = await self._client.list_parts(self._bucket, keys.object, multipart_id, marker)
            parts.extend(page.parts)
            if page.next_marker is None:
                return parts
            marker = page.next_marker

    async def _list_segments(self, keys: UploadKeys) -> list[ObjectEntry]:
        objects: list[ObjectEntry] = []
        token: str | None = None
        while True:
            page = await self._client.list_objects(self._bucket, keys.tail_prefix, token)
            objects.extend(page.objects)
            if page.next_token is None:
                return objects
            token = page.next_token

    async def _finished_info(self, keys: UploadKeys, info: UploadInfo, segments: list[ObjectEntry]) -> UploadInfo:
        head = await self._client.head_object(self._bucket, keys.object)
        if segments:  # left behind by a finish that crashed before its cleanup
            await self._delete_quietly([entry.key for entry in segments])
        info.offset = head.size
        info.state = None
        return info

    async def _vanished_multipart_upload(
        self, keys: UploadKeys, info: UploadInfo, segments: list[ObjectEntry]
    ) -> UploadInfo:
        """The multipart upload no longer exists: either CompleteMultipartUpload
        succeeded and the crash came before ``.info`` said so (the object is there at
        full length: finish the bookkeeping), or it was aborted (a termination cut
        short, or a bucket lifecycle rule): the upload cannot continue and is gone."""
        try:
            head: ObjectEntry | None = await self._client.head_object(self._bucket, keys.object)
        except S3NotFound:
            head = None
        if head is not None and head.size == info.length:
            info.finished = True
            await self._put_info(keys, info)
            return await self._finished_info(keys, info, segments)
        log.warning("upload %s: multipart upload is gone and no complete object exists; removing it", info.id)
        await self._delete_quietly([entry.key for entry in segments] + [keys.info])
        self._multipart_ids.pop(info.id, None)
        raise UploadNotFound(info.id)

    async def _state_for(self, info: UploadInfo) -> _UploadState:
        state = info.state
        if isinstance(state, _UploadState) and state.upload_id == info.id and state.layout.offset == info.offset:
            return state
        fresh = await self.get_info(info.id)
        state = fresh.state
        if not isinstance(state, _UploadState) or fresh.offset != info.offset:
            raise StoreError(f"upload {info.id}: stored offset is {fresh.offset}, not {info.offset}")
        return state

    async def _complete_layout(self, info: UploadInfo) -> Layout | None:
        """The layout covering all ``info.length`` bytes, or None if the upload turned
        out to be finished already. Raises ``StoreError`` when bytes are missing."""
        assert info.length is not None
        state = info.state
        if not (isinstance(state, _UploadState) and state.upload_id == info.id and state.listed_parts is not None):
            if isinstance(state, _UploadState) and state.layout.offset == info.length:
                return state.layout
            fresh = await self.get_info(info.id)
            if fresh.finished:
                info.finished, info.offset, info.state = True, fresh.offset, None
                return None
            state = fresh.state
            assert isinstance(state, _UploadState)
        # Re-resolve the listings without get_info's "never report offset == length"
        # limit: here the whole upload must be present.
        assert state.listed_parts is not None and state.listed_objects is not None
        layout = resolve_layout(
            self._keys(info.id), state.layout.part_size, info.length, state.listed_parts, state.listed_objects
        )
        if layout.offset != info.length:
            raise StoreError(f"upload {info.id}: cannot finish, {layout.offset} of {info.length} bytes stored")
        return layout

    async def _read_segments(self, segments: Sequence[Segment]) -> list[bytes]:
        """The bytes of ``segments``: from the tail cache when it holds exactly the
        listed object (same key, size and ETag), else from S3, in parallel."""

        async def one(segment: Segment) -> bytes:
            cached = self._tail_cache.get(segment)
            if cached is not None:
                return cached
            data = await self._client.get_object(self._bucket, segment.key)
            if len(data) != segment.size:
                raise StoreError(f"tail segment {segment.key} changed while in use ({len(data)} != {segment.size})")
            return data

        return await _all_or_nothing([one(segment) for segment in segments])

    async def _put_segment(self, keys: UploadKeys, start: int, data: bytes) -> Segment:
        key = keys.segment(start)
        etag = await self._client.put_object(self._bucket, key, data, await _md5(data))
        self._tail_cache.put(key, etag, data)
        return Segment(key, start, len(data), etag)

    async def _upload_part(
        self, keys: UploadKeys, upload_id: str, number: int, data: list[bytes], slot: SpoolSlot | None = None
    ) -> PartEntry:
        """UploadPart of ``data`` followed by the bytes of ``slot``. The slot is read
        (from its spool file) only inside the global semaphore, so the part bodies in
        memory are bounded by ``max_concurrent_part_uploads``."""
        async with self._part_uploads:
            digest = None
            if slot is not None:
                whole_part = not data
                data = data + await slot.read_chunks()
                if whole_part:
                    digest = slot.digest()  # hashed while it was spooled, if the slot did
            body = data[0] if len(data) == 1 else b"".join(data)
            checksum = _b64(digest) if digest is not None else await _md5(body)
            etag = await self._client.upload_part(self._bucket, keys.object, upload_id, number, body, checksum)
            return PartEntry(number, len(body), etag)

    async def _delete_keys(self, keys: Sequence[str]) -> None:
        for start in range(0, len(keys), DELETE_BATCH_SIZE):
            await self._client.delete_objects(self._bucket, keys[start:start + DELETE_BATCH_SIZE])

    async def _delete_quietly(self, keys: Sequence[str]) -> None:
        """Delete garbage (objects that no longer count); a failure is only logged:
        the offset rule ignores them, and a later write or termination retries."""
        for key in keys:
            self._tail_cache.discard(key)
        try:
            await self._delete_keys(keys)
        except S3Error as error:
            log.warning("could not delete %d leftover object(s): %s", len(keys), error)

    async def _delete_tail_quietly(self, keys: UploadKeys) -> None:
        try:
            segments = await self._list_segments(keys)
        except S3Error as error:
            log.warning("could not list tail segments of %s: %s", keys.object, error)
            return
        await self._delete_quietly([entry.key for entry in segments])

    async def _abort_quietly(self, keys: UploadKeys, upload_id: str) -> None:
        try:
            await self._client.abort_multipart_upload(self._bucket, keys.object, upload_id)
        except S3Error as error:
            log.warning("could not abort multipart upload of %s: %s", keys.object, error)


async def _all_or_nothing(coroutines: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
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


def _retrieve_exception(task: asyncio.Task[Any]) -> None:
    """Mark a task's exception as seen (it is re-raised where the task is awaited;
    this only keeps asyncio from logging "exception was never retrieved")."""
    if not task.cancelled():
        task.exception()


async def _nothing() -> None:
    return None


def _md5_hasher() -> Hasher:
    return hashlib.md5(usedforsecurity=False)


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


async def _md5(body: bytes) -> str:
    if len(body) >= MD5_IN_THREAD_SIZE:
        return await asyncio.to_thread(content_md5, body)
    return content_md5(body)


@dataclass(eq=False)
class _PatchWriter:
    """The body of one PATCH on its way into S3 (``S3Store.write``)."""

    store: S3Store
    info: UploadInfo
    base: Layout
    limit: int
    """Bytes the upload may reach: its length, or its deferred-length ceiling."""
    jobs: list[_PartJob] = field(default_factory=list)
    failed: bool = False
    """Set as soon as a part upload fails: stop reading the body."""

    def __post_init__(self) -> None:
        config = self.store._config
        self.keys = self.store._keys(self.info.id)
        self.part_size = self.base.part_size
        self.upload_id = str(self.info.storage.get("multipart_upload_id"))
        self.ring = SpoolRing(
            config.max_buffered_parts, config.spool, config.spool_dir, self.store._spool_observer, hasher=_md5_hasher
        )
        # The part being received: its number, first byte, the existing tail segments
        # it starts with, and the slot with its new bytes.
        self.part_number = len(self.base.parts) + 1
        self.part_start = self.base.parts_end
        self.prefix = list(self.base.segments)
        self.fill = self.base.tail_size
        self.slot: SpoolSlot | None = None
        self.position = self.base.offset
        self.stale_cleanup: asyncio.Task[None] | None = None
        self.leftover: asyncio.Task[Segment] | None = None

    def _target(self) -> int:
        """Size of the part being received (the last part of a known length is short)."""
        if self.info.length is not None and self.part_number == final_part_number(self.info.length, self.part_size):
            return self.info.length - self.part_start
        return self.part_size

    async def run(self, chunks: AsyncIterable[bytes]) -> int:
        body_error: Exception | None = None
        too_large = False
        try:
            if self.base.stale_segments:
                # Stale segments go before any new segment is written, so that none
                # of them can ever line up behind new bytes and be counted.
                self.stale_cleanup = asyncio.create_task(
                    self.store._delete_quietly([segment.key for segment in self.base.stale_segments])
                )
                self.stale_cleanup.add_done_callback(_retrieve_exception)
            if 0 < self.fill == self._target():  # the tail alone fills a part (left by a failed write)
                self._dispatch()
            try:
                async for chunk in chunks:
                    room = self.limit - self.position
                    if len(chunk) > room:
                        chunk, too_large = chunk[:room], True
                    if chunk and not await self._feed(chunk):
                        break
                    if too_large:
                        break
            except Exception as error:  # the body broke off: store what arrived, then re-raise
                body_error = error
            layout, store_error = await self._settle()
        finally:
            await self._release()
        self.info.offset = layout.offset
        self.info.state = _UploadState(self.info.id, layout)
        if body_error is not None:
            raise body_error
        if store_error is not None:
            raise store_error
        if too_large:
            raise UploadTooLarge(
                f"upload {self.info.id} may not exceed {self.limit} bytes"
                + (" (store.s3.deferred_length_ceiling)" if self.info.length is None else "")
            )
        return layout.offset

    async def _feed(self, data: bytes) -> bool:
        """Add received bytes; False once a part upload failed (stop reading)."""
        while data:
            if self.failed:
                return False
            if self.slot is None:
                self.slot = await self.ring.acquire()  # waits while the ring is full
                if self.failed:
                    self.ring.release()
                    await self.slot.close()
                    self.slot = None
                    return False
            room = self._target() - self.fill
            piece, data = (data, b"") if len(data) <= room else (data[:room], data[room:])
            await self.slot.append(piece)
            self.fill += len(piece)
            self.position += len(piece)
            if self.fill == self._target():
                self._dispatch()
        return True

    def _dispatch(self) -> None:
        """Start uploading the part just completed; the next bytes begin a new part."""
        job = _PartJob(self.part_number, self.part_start, self.prefix, self.slot, holds_ring_slot=self.slot is not None)
        job.task = asyncio.create_task(self._upload(job))
        job.task.add_done_callback(self._on_part_done)
        self.jobs.append(job)
        self.part_number += 1
        self.part_start += self.part_size
        self.prefix = []
        self.fill = 0
        self.slot = None

    def _on_part_done(self, task: asyncio.Task[PartEntry]) -> None:
        if task.cancelled() or task.exception() is not None:
            self.failed = True

    async def _upload(self, job: _PartJob) -> PartEntry:
        try:
            if self.stale_cleanup is not None:
                # A new part moves the end of the parts forward; a stale segment that
                # starts there must be gone first, or it would start to count.
                await self.stale_cleanup
            data = await self.store._read_segments(job.prefix) if job.prefix else []
            part = await self.store._upload_part(self.keys, self.upload_id, job.number, data, job.slot)
            # The segments this part covers are deleted only now: until UploadPart
            # succeeded they were the only copy of their bytes. A crash before this
            # delete leaves segments covered by a part, which do not count.
            if job.prefix:
                await self.store._delete_quietly([segment.key for segment in job.prefix])
            if job.slot is not None:
                slot, job.slot = job.slot, None
                await slot.close()
            return part
        finally:
            # Free the ring place (also on failure, so a reader waiting for a slot
            # wakes up and sees ``failed``); a failed part's slot stays open for
            # ``_settle`` to save as a segment.
            if job.holds_ring_slot:
                job.holds_ring_slot = False
                self.ring.release()

    async def _store_segment(self, slot: SpoolSlot, start: int) -> Segment:
        if self.stale_cleanup is not None:
            await self.stale_cleanup  # never let a stale delete race the new segment
        data = await slot.read_chunks()
        return await self.store._put_segment(self.keys, start, data[0] if len(data) == 1 else b"".join(data))

    async def _settle(self) -> tuple[Layout, StoreError | None]:
        """Wait for the part uploads and store the leftover; the layout of what is
        now stored, and the error to raise if not everything received could be."""
        if not self.failed and self.slot is not None and self.slot.size > 0:
            # Stored concurrently with the parts still in flight: should one of them
            # fail, this segment lies beyond the gap and does not count.
            self.leftover = asyncio.create_task(self._store_segment(self.slot, self.position - self.slot.size))
            self.leftover.add_done_callback(_retrieve_exception)
        new_parts: list[PartEntry] = []
        failed_job: _PartJob | None = None
        failure: BaseException | None = None
        for job in self.jobs:
            assert job.task is not None
            await asyncio.wait([job.task])
            if job.task.cancelled():
                failed_job, failure = job, StoreError("part upload cancelled")
            elif job.task.exception() is not None:
                failed_job, failure = job, job.task.exception()
            else:
                new_parts.append(job.task.result())
                continue
            break
        parts = self.base.parts + new_parts
        if failed_job is None:
            segments = list(self.prefix)  # the original tail, if no part was completed
            if self.leftover is not None:
                await asyncio.wait([self.leftover])
                leftover_error = self.leftover.exception()
                if leftover_error is None:
                    segments.append(self.leftover.result())
                else:
                    layout = Layout(self.part_size, parts, segments)
                    return layout, self._unavailable("storing the tail segment", leftover_error, layout.offset)
            if self.stale_cleanup is not None:
                await self.stale_cleanup
            return Layout(self.part_size, parts, segments), None
        # A part failed for good. Parts after it are useless now (beyond a gap): stop
        # them. Its own bytes can still become a tail segment after its prefix (which
        # is intact: segments are deleted only after their part is stored), unless it
        # is the final part (a tail never reaches the length: finish makes that part).
        for job in self.jobs:
            if job.task is not None and not job.task.done():
                job.task.cancel()
        if self.leftover is not None and not self.leftover.done():
            self.leftover.cancel()
        segments = list(failed_job.prefix)
        is_final = self.info.length is not None and failed_job.number == final_part_number(
            self.info.length, self.part_size
        )
        if failed_job.slot is not None and failed_job.slot.size > 0 and not is_final:
            try:
                segments.append(await self._store_segment(failed_job.slot, failed_job.start + failed_job.prefix_size))
            except S3Error as error:
                log.warning("upload %s: could not save part %d as a tail segment: %s",
                            self.info.id, failed_job.number, error)
        layout = Layout(self.part_size, parts, segments)
        assert failure is not None
        return layout, self._unavailable(f"uploading part {failed_job.number}", failure, layout.offset)

    def _unavailable(self, what: str, error: BaseException, offset: int) -> StoreError:
        if isinstance(error, StoreError):
            return error
        if isinstance(error, S3NotFound) and error.code == "NoSuchUpload":
            return UploadNotFound(self.info.id)
        failure = StoreUnavailable(f"upload {self.info.id}: {what} failed ({error}); {offset} bytes are stored")
        failure.__cause__ = error
        return failure

    async def _release(self) -> None:
        """Stop whatever is still running (only after an error or cancellation) and
        free every slot."""
        tasks: list[asyncio.Task[PartEntry] | asyncio.Task[Segment] | asyncio.Task[None]] = [
            job.task for job in self.jobs if job.task is not None and not job.task.done()
        ]
        for extra in (self.leftover, self.stale_cleanup):
            if extra is not None and not extra.done():
                tasks.append(extra)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        slots = [job.slot for job in self.jobs if job.slot is not None] + ([self.slot] if self.slot else [])
        for slot in slots:
            await slot.close()
