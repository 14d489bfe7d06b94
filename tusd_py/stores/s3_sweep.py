"""The S3 store's part of the expiry sweep (``SupportsExpiration``): listing every
upload under the prefix, and removing what no upload owns any more."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from tusd_py.stores.base import StoreUnavailable, UploadInfo, UploadNotFound, is_valid_upload_id
from tusd_py.stores.s3_client import ObjectEntry, S3NotFound
from tusd_py.stores.s3_objects import S3Fields, S3Objects, store_errors

log = logging.getLogger("tusd_py.stores.s3")


class S3Sweep:
    """``list_uploads`` and ``remove_orphans`` over ``objects``' bucket and prefix."""

    def __init__(self, objects: S3Objects) -> None:
        self._objects = objects

    async def list_uploads(self) -> AsyncIterator[UploadInfo]:
        """Every upload's ``.info`` under the prefix (offsets not filled in; an
        unreadable document is logged and skipped)."""
        objects = self._objects
        token: str | None = None
        while True:
            with store_errors(""):
                page = await objects.client.list_objects(objects.bucket, objects.metadata_prefix, token)
            for entry in page.objects:
                upload_id = self._owner_of(entry.key, ".info")
                if upload_id is None:
                    continue
                try:
                    with store_errors(upload_id):
                        document = await objects.client.get_object(objects.bucket, entry.key)
                except UploadNotFound:
                    continue  # terminated meanwhile
                try:
                    info = objects.parse_info(upload_id, document)
                except StoreUnavailable as error:  # a corrupt document must not stop a sweep
                    log.warning("skipping upload %s: %s", upload_id, error)
                    continue
                yield info
            if page.next_token is None:
                return
            token = page.next_token

    async def remove_orphans(self, created_before: float) -> int:
        """Abort multipart uploads and delete tail segments under the prefix whose
        upload has no ``.info`` and that were created before ``created_before``; also
        abort multipart uploads of a key whose ``.info`` names another one (left by a
        failed attempt at creation). Objects without ``.info`` are left alone: a
        complete object may be a finished upload whose ``.info`` its consumer removed
        on purpose."""
        objects = self._objects
        with store_errors(""):
            listed: list[ObjectEntry] = []
            token: str | None = None
            while True:
                page = await objects.client.list_objects(objects.bucket, objects.metadata_prefix, token)
                listed.extend(page.objects)
                if page.next_token is None:
                    break
                token = page.next_token
            with_info = {owner for entry in listed if (owner := self._owner_of(entry.key, ".info")) is not None}
            segments = [
                entry.key
                for entry in listed
                if (owner := self._owner_of(entry.key, ".tail/", exact=False)) is not None
                and owner not in with_info
                and entry.last_modified is not None
                and entry.last_modified < created_before
            ]
            removed = len(segments)
            if segments:
                await objects.delete_quietly(segments)
            removed += await self._abort_unreferenced(with_info, created_before)
        return removed

    async def _abort_unreferenced(self, with_info: set[str], created_before: float) -> int:
        """Abort the multipart uploads created before ``created_before`` that no
        ``.info`` names: of uploads without one (``with_info``: those with one), and
        of uploads whose ``.info`` names another."""
        objects = self._objects
        named: dict[str, str | None] = {}
        """Upload id -> the multipart upload id its ``.info`` names (read once)."""
        removed = 0
        marker: tuple[str, str] | None = None
        while True:
            page = await objects.client.list_multipart_uploads(objects.bucket, objects.prefix, marker)
            for upload in page.uploads:
                # A named object's key does not say its upload: such multipart uploads
                # are left to the bucket's lifecycle rule (see the README).
                owner = self._owner_of(upload.key, "", self._objects.prefix)
                if owner is None or upload.initiated >= created_before:
                    continue
                if owner not in with_info and not objects.object_key.is_default:
                    continue  # a named key may merely look like an id
                if owner in with_info:
                    if owner not in named:
                        named[owner] = await self._named_multipart_id(owner)
                    if named[owner] in (None, upload.upload_id):  # unknown, or the upload's own
                        continue
                try:
                    await objects.client.abort_multipart_upload(objects.bucket, upload.key, upload.upload_id)
                except S3NotFound:
                    continue
                log.info("aborted multipart upload %s of %s: no upload names it", upload.upload_id, upload.key)
                removed += 1
            if page.next_marker is None:
                return removed
            marker = page.next_marker

    async def _named_multipart_id(self, upload_id: str) -> str | None:
        """The multipart upload id in the upload's ``.info``; None when that cannot be
        read (gone meanwhile, unreadable: then nothing of it is touched)."""
        objects = self._objects
        try:
            with store_errors(upload_id):
                document = await objects.client.get_object(objects.bucket, objects.keys(upload_id).info)
            info = objects.parse_info(upload_id, document)
            return S3Fields.of(info.storage).multipart_upload_id
        except (UploadNotFound, StoreUnavailable, ValueError) as error:
            log.warning("not sweeping multipart uploads of %s: %s", upload_id, error)
            return None

    def _owner_of(self, key: str, suffix: str, prefix: str | None = None, exact: bool = True) -> str | None:
        """The upload id of ``<prefix><id><suffix>`` (``exact``: nothing after the
        suffix; else anything may follow it), or None for a foreign key. ``prefix``:
        the metadata prefix unless given."""
        prefix = self._objects.metadata_prefix if prefix is None else prefix
        if not key.startswith(prefix):
            return None
        rest = key[len(prefix):]
        if suffix:
            upload_id, found, after = rest.partition(suffix)
            if not found or (exact and after):
                return None
        else:
            upload_id = rest
        return upload_id if is_valid_upload_id(upload_id) else None
