"""tus ``concatenation``: partial uploads and the final upload built from them.

``Upload-Concat: partial`` marks an upload as a partial one (otherwise an ordinary
upload). ``Upload-Concat: final;<url> <url> ...`` creates a final upload from finished
partial uploads, in order; it has no body and no Upload-Length (its length is the sum
of the partials' lengths) and it can never be patched.

The partial URLs are parsed strictly: each must be an upload URL of this server,
either a path under our base path (``/files/a``) or an absolute http(s) URL whose host
is the host the request reached (``https://host/files/a``), with no query, fragment or
user info. The id is validated exactly like a request target's (never decoded), so a
URL can only ever name one of our uploads, never a path or another server's object.

``concatenation-unfinished`` (a final upload created before its partials are done) is
not offered: the final upload would have to grow while other requests, holding other
locks, patch its partials, and on S3 a partial's bytes can be copied only once its
object is complete. Finished partials make the final upload a single, locked,
immutable operation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tusd_py.http.types import Request
from tusd_py.lockers.base import Locker, no_release_request
from tusd_py.stores.base import (
    Store,
    SupportsConcatenation,
    Upload,
    UploadExists,
    UploadInfo,
    UploadNotFound,
    is_valid_upload_id,
)
from tusd_py.tus.errors import (
    ERR_INVALID_CONCAT,
    ERR_NOT_PARTIAL,
    ERR_PARTIAL_NOT_FINISHED,
    ERR_PARTIAL_NOT_FOUND,
    TusError,
)
from tusd_py.tus.events import READ, UploadEvents
from tusd_py.tus.urls import upload_url

MAX_PARTIALS = 1000
"""Partial uploads one final upload may name. The header size limit (16 KiB by
default) allows about 400 URLs anyway; the bound keeps a bigger limit from turning one
request into thousands of lock acquisitions."""


@dataclass(frozen=True, slots=True)
class Concat:
    """A parsed ``Upload-Concat`` header."""

    partial_ids: tuple[str, ...] | None
    """None for ``partial``; the partial uploads' ids, in order, for ``final``."""

    @property
    def is_final(self) -> bool:
        return self.partial_ids is not None


PARTIAL = Concat(None)


def parse_upload_concat(value: str, base_path: str, host: str) -> Concat:
    """Parse ``Upload-Concat``; ``host`` is the host the request reached (from
    ``urls.origin_of``). 400 (``ERR_INVALID_CONCAT``) for anything malformed."""
    value = value.strip()
    if value == "partial":
        return PARTIAL
    kind, separator, urls = value.partition(";")
    if kind.strip() != "final" or not separator:
        raise TusError(ERR_INVALID_CONCAT)
    items = urls.split()
    if not items:
        raise TusError(ERR_INVALID_CONCAT, "a final upload needs at least one partial upload URL")
    if len(items) > MAX_PARTIALS:
        raise TusError(ERR_INVALID_CONCAT, f"at most {MAX_PARTIALS} partial uploads")
    return Concat(tuple(_upload_id_of(item, base_path, host) for item in items))


def _upload_id_of(url: str, base_path: str, host: str) -> str:
    if url.startswith("/"):
        path = url
        if "?" in path or "#" in path:
            raise TusError(ERR_INVALID_CONCAT, "partial upload URLs take no query or fragment")
    else:
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port  # validates the port
        except ValueError:
            raise TusError(ERR_INVALID_CONCAT, "malformed partial upload URL") from None
        if parts.scheme not in ("http", "https") or parts.query or parts.fragment or "#" in url or "?" in url:
            raise TusError(ERR_INVALID_CONCAT, "partial upload URLs must be http(s) URLs of this server")
        if parts.username is not None or parts.password is not None:
            raise TusError(ERR_INVALID_CONCAT, "partial upload URLs must not carry user info")
        netloc = parts.hostname if port is None else f"{parts.hostname}:{port}"
        if parts.hostname is None or (netloc or "").lower() != _bracketless(host).lower():
            raise TusError(ERR_INVALID_CONCAT, "partial upload URLs must name this server's host")
        path = parts.path
    if not path.startswith(base_path):
        raise TusError(ERR_INVALID_CONCAT, f"partial upload URLs must be under {base_path}")
    upload_id = path[len(base_path) :]
    if not is_valid_upload_id(upload_id):
        raise TusError(ERR_INVALID_CONCAT, "a partial upload URL does not name an upload")
    return upload_id


def _bracketless(host: str) -> str:
    # urlsplit().hostname drops the brackets of an IPv6 literal; Host keeps them.
    if host.startswith("["):
        address, _, port = host[1:].partition("]")
        return address + port
    return host


def concat_header(info: UploadInfo, origin: tuple[str, str] | None, base_path: str) -> list[tuple[str, str]]:
    """``Upload-Concat`` for HEAD: ``partial``, or ``final;`` and the partials' URLs
    (absolute when the request's origin is known)."""
    if info.is_partial:
        return [("Upload-Concat", "partial")]
    if info.partial_ids is None:
        return []
    urls = [upload_url(*origin, base_path, upload_id) if origin else base_path + upload_id
            for upload_id in info.partial_ids]
    return [("Upload-Concat", "final;" + " ".join(urls))]


async def create_final(
    store: Store,
    concatenator: SupportsConcatenation,
    locker: Locker,
    events: UploadEvents,
    request: Request,
    final: UploadInfo,
    *,
    check_length: Callable[[int], None],
    finish_if_complete: Callable[[Upload, Request], Awaitable[UploadInfo]],
    authorize: Callable[[str, str, Request], Awaitable[None]],
) -> UploadInfo:
    """Create the final upload ``final`` (metadata set, ``partial_ids`` set, length
    unset) from its partial uploads and return it, finished.

    Every partial upload is locked (in id order, so two concatenations of the same
    partials cannot deadlock) for the whole operation: none can be terminated or
    changed while its bytes are copied. ``check_length`` sees the summed length
    before the pre-create hook and the store run. ``authorize`` (the pre-access
    check, mode read) is asked for each partial before any lock is taken.
    """
    assert final.partial_ids is not None
    for upload_id in dict.fromkeys(final.partial_ids):
        try:
            await authorize(upload_id, READ, request)
        except UploadNotFound:
            raise TusError(ERR_PARTIAL_NOT_FOUND, f"no upload {upload_id}") from None
    async with contextlib.AsyncExitStack() as locks:
        for upload_id in sorted(set(final.partial_ids)):
            await locks.enter_async_context(locker.lock(upload_id, no_release_request))
        known: dict[str, UploadInfo] = {}
        for upload_id in final.partial_ids:
            if upload_id not in known:
                known[upload_id] = await _finished_partial(store, upload_id, request, finish_if_complete)
        partials = [known[upload_id] for upload_id in final.partial_ids]
        length = sum(partial.offset for partial in partials)
        check_length(length)
        final = dataclasses.replace(final, length=length)
        final = await events.pre_create(final, request)
        if final.id in known:
            # A hook chose a partial's id: its lock is ours already, and it exists.
            raise UploadExists(final.id)
        async with locker.lock(final.id, no_release_request):
            final = await concatenator.concatenate(final, partials)
            events.created(final, request)
            await events.finished(final, request)
    return final


async def _finished_partial(
    store: Store,
    upload_id: str,
    request: Request,
    finish_if_complete: Callable[[Upload, Request], Awaitable[UploadInfo]],
) -> UploadInfo:
    try:
        upload = await store.get(upload_id)
    except UploadNotFound:
        raise TusError(ERR_PARTIAL_NOT_FOUND, f"no upload {upload_id}") from None
    info = upload.info
    if not info.is_partial:
        raise TusError(ERR_NOT_PARTIAL, f"upload {upload_id} was not created with Upload-Concat: partial")
    if not info.is_complete:
        raise TusError(
            ERR_PARTIAL_NOT_FINISHED,
            f"upload {upload_id} has {info.offset} of {'?' if info.length is None else info.length} bytes",
        )
    return await finish_if_complete(upload, request)

