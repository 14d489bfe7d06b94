"""The S3 store: uploads built in Amazon S3 (or an S3-compatible service).

Per upload id ``U`` under the key prefix ``P`` (see DESIGN.md, "S3 store"):

- ``P U``: the final object, built by one multipart upload;
- ``P U.info``: the JSON upload info (``UploadInfo.to_json``; ``storage`` holds the
  multipart upload id, the part size and the largest length the upload may reach:
  ``s3_objects.S3Fields``);
- ``P U.tail/<start offset, zero padded>``: tail segments, bytes after the last full
  part that are not yet a part.

Invariants (every module of the S3 store keeps them; they are stated only here):

1. All parts but the last have exactly the upload's part size, fixed at creation, so
   bytes ``[k * part_size, (k + 1) * part_size)`` are part ``k + 1``.
2. The offset is derived from what S3 lists (``s3_parts.resolve_layout``): the
   contiguous run of parts 1..n plus the contiguous tail segments from the end of
   part n. Parts and segments that a crashed or failed write left behind (after a
   gap, of the wrong size, or covered by a part) do not count, and are deleted.
3. The old copy of a byte is removed only after its new copy is stored: tail segments
   are deleted only after the part that covers them was uploaded; stale segments are
   deleted before any new part or segment could line up behind them. With 2, this
   makes every crash point safe.
4. ``.info`` is written last at creation and deleted last at termination: an upload
   exists exactly while its ``.info`` does, and everything it names exists by then.
5. An unfinished upload never reports ``offset == length``: a crash between the last
   byte and CompleteMultipartUpload makes the client resend the last bytes, and that
   PATCH finishes the upload.
6. A write returns only once everything it counts is in S3; no local state is needed
   between requests, so any instance can serve the next request of an upload. (An
   instance may reuse the state its own last hold left, instead of reading it back,
   only when the lock vouches that nobody held the upload since: ``kept``.)
7. A stale writer (an instance that held the lock, stalled past its lease while
   another took over, and then goes on writing) cannot make the upload's bytes
   wrong; at worst it lowers the offset. Whatever it stores is bytes the client sent
   at those offsets, which are the same bytes the new holder receives (a tus client
   resumes with the same data). By 1, its part k covers exactly the new holder's part
   k, so replacing it changes nothing (same bytes, same ETag, so a Complete built from
   a listing stays valid). Its tail segments and segment deletions only add, shorten,
   or remove runs of such bytes, and by 2 only a contiguous run counts: the offset
   may drop (the client then gets 409, asks HEAD and resends), and no byte at a
   counted offset differs from the client's. After a Complete, its UploadPart finds
   no multipart upload and its segments are leftovers a finished upload ignores.
   Hence the lockers' ``held.lost`` (which stops the PATCH) is an optimisation here,
   not what keeps the upload intact. A hold that took over from a stale writer follows
   no clean release, so it reads S3 (``kept`` says why what the stale writer does
   later cannot make kept state count a wrong byte either).

Here: ``S3Store`` (creating and opening uploads) and ``S3Upload`` (one opened
upload). A PATCH is carried out by ``s3_writer``; the S3 calls are in ``s3_objects``,
the offset rule in ``s3_parts``, concatenation in ``s3_concat``, the expiry sweep in
``s3_sweep``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from tusd_py.config import S3StoreConfig
from tusd_py.lockers.base import LockGeneration
from tusd_py.stores.base import (
    StoreConfigError,
    StoreError,
    UploadBody,
    UploadInfo,
    UploadTooLarge,
)
from tusd_py.stores.kept import KeptStates
from tusd_py.stores.s3_botocore import AioS3Client
from tusd_py.stores.s3_checksum import checksum_named, signs_payload
from tusd_py.stores.s3_client import (
    Deadlines,
    S3Client,
    S3Error,
    S3NotFound,
    S3TransientError,
)
from tusd_py.stores.s3_concat import concatenate
from tusd_py.stores.s3_keys import ObjectKeyTemplate
from tusd_py.stores.s3_objects import (
    Listing,
    Loaded,
    S3Fields,
    S3Objects,
    UploadPartSink,
    content_type,
    store_errors,
)
from tusd_py.stores.s3_observed import ObservedS3Client, S3Observer
from tusd_py.stores.s3_parts import (
    MAX_OBJECT_SIZE,
    Layout,
    deferred_length_ceiling,
    part_size_for,
    resolve_layout,
)
from tusd_py.stores.s3_retry import RetryingS3Client, RetryPolicy
from tusd_py.stores.s3_spool import SpoolBudget, SpoolRing
from tusd_py.stores.s3_sweep import S3Sweep
from tusd_py.stores.s3_writer import PatchWriter

log = logging.getLogger("tusd_py.stores.s3")


BUCKET_CHECK_RETRIES = RetryPolicy(max_attempts=4, base_delay=0.25, max_delay=2.0)
"""Start-up checks of the bucket, on top of the client's own retries: a bodiless
answer (HEAD has none) may hide a transient error, e.g. a 400 that was RequestTimeout."""


class _BucketCheckFailed(Exception):
    def __init__(self, error: S3Error, tried: str) -> None:
        super().__init__(str(error))
        self.error = error
        self.tried = tried


async def _check_bucket(client: S3Client, bucket: str, policy: RetryPolicy = BUCKET_CHECK_RETRIES) -> None:
    """HeadBucket until it succeeds, fails for a reason S3 named, or ``policy`` runs
    out; raises ``_BucketCheckFailed`` saying what was tried. (Transient errors that
    S3 named are retried by the client already.)"""
    started = time.monotonic()
    attempt = 1
    while True:
        try:
            await client.head_bucket(bucket)
            return
        except S3Error as error:
            # Nameless (the code is just the status) and not an answer about access
            # or existence: perhaps transient, like the failures the client retries.
            nameless = error.code == str(error.status) and error.status not in (301, 401, 403, 404)
            if not nameless or attempt >= policy.max_attempts:
                times = f"{attempt} times" if attempt > 1 else "once"
                tried = f"HeadBucket tried {times} in {time.monotonic() - started:.1f} s"
                if isinstance(error, S3TransientError):
                    tried += ", with the client's retries"
                raise _BucketCheckFailed(error, tried) from error
            delay = policy.delay(attempt)
            log.warning("S3 bucket check failed (%s); trying again in %.1f s", error, delay)
            attempt += 1
            await asyncio.sleep(delay)


@dataclass(frozen=True, slots=True)
class _StoreContext:
    """What every upload of one ``S3Store`` shares."""

    objects: S3Objects
    config: S3StoreConfig
    spool_observer: Callable[[int], None] | None
    deferred_ceiling: int
    kept: KeptStates[Loaded]
    """What each upload's last hold (on this instance) left (``kept``)."""
    spool_budget: SpoolBudget


class S3Store:
    """Uploads in an S3 bucket; implements ``Store`` (its uploads are ``S3Upload``),
    ``SupportsConcatenation`` and ``SupportsExpiration``.

    Build it with ``S3Store.open(config)``; the constructor takes any ``S3Client``
    (tests wrap one to inject faults or count bytes).
    """

    def __init__(
        self, client: S3Client, config: S3StoreConfig, *, max_size: int = 0, observer: S3Observer | None = None
    ) -> None:
        """``observer`` (optional, the server's metrics) hears spool slot use; S3 call
        timings come from wrapping ``client`` (``open`` does that)."""
        self._client = client
        self._config = config
        self._objects = S3Objects(
            client, config.bucket, config.prefix,
            max_part_uploads=config.max_concurrent_part_uploads, tail_cache_size=config.tail_cache_size,
            metadata_prefix=config.metadata_prefix or None, object_key=ObjectKeyTemplate(config.object_key),
            checksum=config.checksum,
        )
        self._context = _StoreContext(
            self._objects, config, observer.spool_in_use if observer is not None else None,
            deferred_length_ceiling(config.deferred_length_ceiling, max_size, config.part_size), KeptStates(),
            SpoolBudget(config.spool_memory),
        )
        self._sweep = S3Sweep(self._objects)

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
                deadlines=Deadlines(config.request_timeout, config.part_size),
                on_timeout=observer.s3_timeout if observer is not None else None,
                sign_payload=signs_payload(config),
                ca_bundle=config.ca_bundle,
            )
        except S3Error as error:
            raise StoreConfigError(f"S3 store: {error}") from error
        client: S3Client = RetryingS3Client(raw, RetryPolicy())
        if observer is not None:
            client = ObservedS3Client(client, observer)
        try:
            await _check_bucket(client, config.bucket)
        except _BucketCheckFailed as failed:
            await client.close()
            cause, tried = failed.error, failed.tried
            if isinstance(cause, S3NotFound):
                message = f"S3 bucket {config.bucket!r} does not exist at {where}"
            elif cause.status in (401, 403) or cause.code in {"InvalidAccessKeyId", "SignatureDoesNotMatch"}:
                message = (
                    f"S3 refused access to bucket {config.bucket!r} at {where} ({cause.code}): check the "
                    "AWS credentials (environment, profile or instance role) and the bucket policy"
                )
            elif cause.code == "ConnectionError":
                message = f"cannot reach S3 at {where}: {cause} ({tried})"
            elif cause.code == str(cause.status):  # a HEAD answer has no body to name the error
                message = (
                    f"cannot use S3 bucket {config.bucket!r} at {where}: HeadBucket answered {cause.status} "
                    f"without an error code ({tried}); a 400 may be a wrong store.s3.region or endpoint_url"
                )
            else:
                message = f"cannot use S3 bucket {config.bucket!r} at {where}: {cause} ({tried})"
            raise StoreConfigError(message) from cause
        except BaseException:
            await client.close()
            raise
        return cls(client, config, max_size=max_size, observer=observer)

    @property
    def client(self) -> S3Client:
        """The store's S3 client (with its retries and metrics), which the S3 locker
        shares."""
        return self._client

    async def close(self) -> None:
        """Close the S3 client."""
        await self._client.close()

    # --- Store -------------------------------------------------------------------------

    async def create(self, info: UploadInfo, *, generation: LockGeneration | None = None) -> S3Upload:
        """Check that no ``.info`` has this id, start the multipart upload, then
        write ``.info`` (invariant 4: a crash in between leaves a multipart upload
        nobody points to, which S3 lifecycle rules or ``remove_orphans`` clean up).
        ``generation``: the lock's, under which the new upload's state is kept."""
        if info.length is not None and info.length > MAX_OBJECT_SIZE:
            raise UploadTooLarge(f"upload length {info.length} exceeds S3's largest object ({MAX_OBJECT_SIZE} bytes)")
        objects = self._objects
        max_length = info.length if info.length is not None else self._context.deferred_ceiling
        part_size = part_size_for(max_length, self._config.part_size)
        keys = objects.new_keys(info)
        with store_errors(info.id):
            await objects.refuse_existing(keys, info.id)
            await objects.refuse_taken(keys)
            # A zero-length upload needs no multipart upload: finish writes an empty object.
            multipart_id = None
            if info.length != 0:
                multipart_id = await objects.client.create_multipart_upload(
                    objects.bucket, keys.object, content_type(info), objects.checksum.name
                )
            fields = S3Fields(multipart_id, part_size, max_length, objects.checksum.name)
            created = fields.stored_in(dataclasses.replace(info, offset=0), objects.bucket, keys.object)
            try:
                await objects.put_info(keys, created)
            except BaseException:
                if multipart_id is not None:
                    await objects.abort_quietly(keys, multipart_id)
                raise
        if multipart_id is not None:
            objects.remember_multipart_id(info.id, multipart_id, keys.object)
        upload = S3Upload(self._context, Loaded(created, fields, Layout(part_size), Listing([], [])), generation)
        upload.keep()
        return upload

    async def get(self, upload_id: str, *, generation: LockGeneration | None = None) -> S3Upload:
        """Open the upload: the state this instance's last hold of it left, when the
        lock's ``generation`` vouches that nobody held it since (``kept``); else
        its ``.info`` and what S3 lists of its bytes (``S3Objects.load``). Raises
        ``UploadNotFound``."""
        loaded = self._context.kept.take(upload_id, generation)
        if loaded is None:
            loaded = await self._objects.load(upload_id)
        upload = S3Upload(self._context, loaded, generation)
        if generation is not None:  # a look without the lock leaves the last hold's state
            upload.keep()
        return upload

    # --- SupportsConcatenation -----------------------------------------------------------

    async def concatenate(self, final: UploadInfo, partials: Sequence[UploadInfo]) -> UploadInfo:
        """Build the final upload (``s3_concat.concatenate``)."""
        return await concatenate(self._objects, final, partials)

    # --- SupportsExpiration --------------------------------------------------------------

    def list_uploads(self) -> AsyncIterator[UploadInfo]:
        """Every upload's ``.info`` under the prefix (``s3_sweep``)."""
        return self._sweep.list_uploads()

    async def remove_orphans(self, created_before: float) -> int:
        """Multipart uploads and tail segments without ``.info`` (``s3_sweep``)."""
        return await self._sweep.remove_orphans(created_before)


class S3Upload:
    """One upload of an ``S3Store``, opened for one request (``Upload``).

    It keeps what opening it (or its last call) learned: the persistent fields, the
    layout of the stored bytes, and the listings behind that layout while nothing
    changed them, so a write or finish after ``get`` lists nothing again. When a call
    ends in a way that leaves the stored bytes unknown (a cancelled write), the next
    call lists them again.

    After every call it leaves its state with the store under the lock ``generation``
    it was opened with (``keep``), or drops it when the call failed (``kept``).
    """

    def __init__(self, context: _StoreContext, loaded: Loaded, generation: LockGeneration | None = None) -> None:
        self._context = context
        self._objects = context.objects
        self._keys = context.objects.keys_of(loaded.info)
        self._generation = generation
        self._adopt(loaded)

    def keep(self) -> None:
        """Leave the current state for the next hold of the lock (when the stored
        bytes are known; else drop what was kept)."""
        if self._layout is None and not self._info.finished:
            self._context.kept.forget(self._info.id)
            return
        self._context.kept.keep(
            self._info.id, self._generation, Loaded(self._info, self._fields, self._layout, self._listing)
        )

    def _adopt(self, loaded: Loaded) -> None:
        self._info = loaded.info
        self._fields = loaded.fields
        self._layout: Layout | None = loaded.layout
        """What counts of the stored bytes; None when finished, or unknown."""
        self._listing: Listing | None = loaded.listing
        """The listings behind ``_layout``; None once a write changed it."""

    @property
    def info(self) -> UploadInfo:
        """The snapshot after the last call (after a cancelled write: the offset
        before it, whose bytes are all still stored)."""
        return self._info

    async def write(self, offset: int, body: UploadBody) -> UploadInfo:
        """Append ``body`` at ``offset`` (``s3_writer.PatchWriter``); the new snapshot,
        counting only bytes that are in S3.

        When ``body`` ends early or raises, everything it yielded is stored (complete
        parts as parts, the rest as one tail segment) before ``write`` returns or
        re-raises. When an UploadPart fails for good, the bytes of that part are kept
        as a tail segment if S3 still accepts that, ``info`` says what is stored, and
        ``StoreUnavailable`` is raised. A deferred-length upload that would grow past
        its ceiling stores what fits and raises ``UploadTooLarge``.
        """
        info = self._info
        if info.finished:
            return await self._write_nothing(offset, body)
        config = self._context.config
        with self._context.kept.keeping(self._info.id, self.keep), store_errors(info.id):
            base = await self._current_layout()
            if offset != base.offset:
                raise StoreError(f"upload {info.id}: stored offset is {base.offset}, not {offset}")
            info = self._info
            ring = SpoolRing(
                config.max_buffered_parts, config.spool, config.spool_dir, self._context.spool_observer,
                hasher=checksum_named(self._fields.checksum).hasher, payload_sha256=signs_payload(config),
                budget=self._context.spool_budget, slot_size=self._fields.part_size,
            )
            sink = UploadPartSink(
                self._objects, self._keys, self._fields.multipart_upload_id or "", self._fields.checksum
            )
            writer = PatchWriter(
                sink, ring, base, upload_id=info.id, length=info.length, limit=self._max_length()
            )
            # Unknown until the writer says what it stored (it does not when cancelled).
            self._layout, self._listing = None, None
            outcome = await writer.run(body)
            self._layout = outcome.layout
            self._info = dataclasses.replace(info, offset=outcome.layout.offset)
            if outcome.error is not None:
                raise outcome.error
        return self._info

    async def _write_nothing(self, offset: int, body: UploadBody) -> UploadInfo:
        """A write to a finished upload: the handler bounds its body to nothing (an
        empty PATCH repeated after the last one, or the PATCH that declared a length
        of 0 and so finished the upload before writing); anything else is an error."""
        info = self._info
        if offset != info.offset:
            raise StoreError(f"upload {info.id}: stored offset is {info.offset}, not {offset}")
        async for chunk in body:
            if chunk:
                raise StoreError(f"upload {info.id} is already finished")
        return info

    async def finish(self) -> UploadInfo:
        """Complete the multipart upload (the tail, if any, becomes the last part),
        then record ``finished`` in ``.info``, then delete leftovers. Idempotent.

        Each step is safe to crash after: before CompleteMultipartUpload nothing
        changed for the client; after it, ``S3Store.get`` sees the multipart upload
        gone and the object present at full length, and finishes the bookkeeping.
        """
        if self._info.finished:
            return self._info
        length = self._info.length
        if length is None:
            raise StoreError(f"upload {self._info.id}: cannot finish before its length is known")
        objects, keys = self._objects, self._keys
        with self._context.kept.keeping(self._info.id, self.keep), store_errors(self._info.id):
            layout = await self._complete_layout()
            if layout is None:  # finished meanwhile (a retried finish after a crash)
                return self._info
            info = self._info
            multipart_id = self._fields.multipart_upload_id
            if length == 0:
                # S3 (and moto) accept one empty part, but not every S3-compatible
                # service does; an empty PutObject works everywhere.
                await objects.put_empty(keys)
            else:
                assert multipart_id is not None
                parts = list(layout.parts)
                if layout.segments:
                    data = await objects.read_segments(layout.segments)
                    parts.append(
                        await objects.upload_part(keys, multipart_id, len(parts) + 1, data, self._fields.checksum)
                    )
                try:
                    await objects.complete(keys, multipart_id, parts, self._fields.checksum)
                except S3NotFound:
                    # A retried Complete whose first response was lost: fine if the
                    # object is there at full length.
                    head = await objects.client.head_object(objects.bucket, keys.object)
                    if head.size != length:
                        raise
            finished = dataclasses.replace(info, finished=True)
            await objects.put_info(keys, finished)
            self._info = finished
        # Leftovers are garbage from here on; failing to delete them loses nothing.
        await objects.delete_tail_quietly(keys)
        if length == 0 and multipart_id is not None:
            await objects.abort_quietly(keys, multipart_id)
        objects.forget_multipart_id(info.id)
        self._info = dataclasses.replace(finished, offset=length)
        self._layout, self._listing = None, None
        self.keep()
        return self._info

    async def declare_length(self, length: int) -> UploadInfo:
        """Record the now-known length in ``.info``. Raises ``UploadTooLarge`` above
        the upload's ceiling (fixed at creation, it set the part size)."""
        info = self._info
        if info.length is not None:
            if info.length == length:
                return info
            raise StoreError(f"upload {info.id}: length already declared as {info.length}")
        if length < info.offset:
            raise StoreError(f"upload {info.id}: declared length {length} is below the offset {info.offset}")
        max_length = self._max_length()
        if length > max_length:
            raise UploadTooLarge(
                f"declared length {length} exceeds the {max_length} bytes a deferred-length upload may reach "
                "(store.s3.deferred_length_ceiling)"
            )
        declared = dataclasses.replace(info, length=length)
        with self._context.kept.keeping(self._info.id, self.keep), store_errors(info.id):
            await self._objects.put_info(self._keys, declared)
            self._info = declared
        return declared

    async def terminate(self) -> None:
        """Abort the multipart upload, delete the tail segments and the final object,
        and delete ``.info`` last (invariant 4), so that a termination cut short by a
        crash can be repeated: until ``.info`` is gone, the upload is still found."""
        objects, keys, info = self._objects, self._keys, self._info
        multipart_id = self._fields.multipart_upload_id
        self._context.kept.forget(info.id)
        with store_errors(info.id):
            if multipart_id is not None and not info.finished:
                with contextlib.suppress(S3NotFound):
                    await objects.client.abort_multipart_upload(objects.bucket, keys.object, multipart_id)
            segments = await objects.list_segments(keys)
            # A named object that is not this upload's yet may be another upload's.
            owned = [keys.object] if info.finished or not objects.is_named(keys) else []
            await objects.delete_keys([entry.key for entry in segments] + owned)
            await objects.delete_keys([keys.info])
        objects.forget_multipart_id(info.id)

    async def read(self, start: int, stop: int) -> AsyncIterator[bytes]:
        """Stream bytes ``[start, stop)`` of a finished upload (ranged GET; a broken
        stream is resumed where it broke)."""
        if not self._info.finished:
            raise StoreError(f"upload {self._info.id} is not finished")
        objects = self._objects
        with store_errors(self._info.id):
            stream = objects.client.stream_object(objects.bucket, self._keys.object, start, stop)
            async with contextlib.aclosing(stream) as body:
                async for chunk in body:
                    yield chunk

    def _max_length(self) -> int:
        """The bytes this upload may reach: fixed at creation (it set the part size)."""
        if self._fields.max_length is not None:
            return self._fields.max_length
        return self._context.deferred_ceiling

    async def _current_layout(self) -> Layout:
        """The layout of the stored bytes, listed again when it is unknown."""
        if self._layout is None:
            self._adopt(await self._objects.load(self._info.id))
            if self._layout is None:
                raise StoreError(f"upload {self._info.id} is already finished")
        return self._layout

    async def _complete_layout(self) -> Layout | None:
        """The layout covering all ``length`` bytes, or None if the upload turned out
        to be finished already. Raises ``StoreError`` when bytes are missing."""
        if self._listing is None:
            if self._layout is not None and self._layout.offset == self._info.length:
                return self._layout  # what a write just stored
            self._adopt(await self._objects.load(self._info.id))
            if self._info.finished:
                return None
        assert self._listing is not None and self._layout is not None
        # Re-resolve the listings without ``load``'s "never report offset == length"
        # limit (invariant 5): here the whole upload must be present.
        length = self._info.length
        layout = resolve_layout(
            self._keys, self._fields.part_size, length, self._listing.parts, self._listing.objects
        )
        if layout.offset != length:
            raise StoreError(f"upload {self._info.id}: cannot finish, {layout.offset} of {length} bytes stored")
        return layout
