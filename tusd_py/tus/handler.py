"""The tus 1.0.0 handler: core, creation, creation-with-upload, creation-defer-length,
termination (and expiration when the store supports it), plus GET downloads.

``TusHandler`` is the application the HTTP layer calls: ``await handler(request)``.
It validates every header before a store is called, holds the upload's lock around
every store call that reads or changes an upload, and answers every error through
``errors.error_response``.

Store call order (the contract stores, hooks and metrics can rely on), always under
the upload's lock:

- POST:   ``store.create`` -> [``write`` if creation-with-upload] -> [``finish`` if
  complete]
- HEAD:   ``store.get`` -> [``finish`` if complete but not finished]
- PATCH:  ``store.get`` -> [``declare_length``] -> [``finish`` if complete but not
  finished] -> ``write`` -> [``finish`` if now complete]
- DELETE: ``store.get`` -> ``terminate``
- GET:    ``store.get`` -> [``finish`` if complete but not finished]; the lock is then
  released and ``read`` streams the (complete, immutable) bytes.

``store.get`` and ``store.create`` open an ``Upload`` handle; every later call goes
to the handle, which returns a new ``UploadInfo`` snapshot for each change.

The "finish if complete but not finished" steps recover an upload whose ``finish``
failed after its last byte was stored (e.g. S3 unavailable): a client that sees
``Upload-Offset == Upload-Length`` on HEAD never sends another PATCH, so HEAD must
be able to complete it.

Requests of the IETF resumable-upload draft (``Upload-Draft-Interop-Version`` and no
``Tus-Resumable``) are answered by ``ietf.IetfHandler`` with the same store, locker
and upload rules (``core.UploadCore``); their responses carry no ``Tus-Resumable``.

GET serves only complete uploads; an unfinished one answers 404
(``ERR_UPLOAD_NOT_FINISHED``): a partial file served with 200 would look complete, and
only the file store could serve one at all.
"""

from __future__ import annotations

import email.utils
import logging
import re
import time
from collections.abc import Callable

from tusd_py.http.types import Headers, Request, Response
from tusd_py.lockers.base import Locker, no_release_request
from tusd_py.stores.base import (
    Store,
    SupportsConcatenation,
    SupportsExpiration,
    UploadInfo,
    new_upload_id,
)
from tusd_py.tus.body import GuardedBody
from tusd_py.tus.checksum import ALGORITHM_NAMES, parse_upload_checksum
from tusd_py.tus.concat import Concat, concat_header, create_final, parse_upload_concat
from tusd_py.tus.core import UploadCore
from tusd_py.tus.download import download_headers
from tusd_py.tus.errors import (
    ERR_INVALID_CONCAT,
    ERR_INVALID_DEFER_LENGTH,
    ERR_INVALID_HOST,
    ERR_INVALID_LENGTH,
    ERR_INVALID_METHOD_OVERRIDE,
    ERR_INVALID_OFFSET,
    ERR_LENGTH_AND_DEFER,
    ERR_MAX_SIZE_EXCEEDED,
    ERR_METHOD_NOT_ALLOWED,
    ERR_MISMATCHED_OFFSET,
    ERR_MODIFY_FINAL,
    ERR_NOT_FOUND,
    ERR_NOT_IMPLEMENTED,
    ERR_RANGE_NOT_SATISFIABLE,
    ERR_SHUTTING_DOWN,
    ERR_UNSUPPORTED_VERSION,
    ERR_UPLOAD_NOT_FINISHED,
    TusError,
    error_response,
)
from tusd_py.tus.events import READ, WRITE, UploadEvents, UploadHooks, UploadObserver
from tusd_py.tus.headers import (
    TUS_VERSION,
    RangeNotSatisfiable,
    is_offset_octet_stream,
    parse_defer_length,
    parse_range,
    parse_upload_length,
    parse_upload_offset,
    require_offset_octet_stream,
    single_value,
)
from tusd_py.tus.ietf import IetfHandler, is_ietf_request
from tusd_py.tus.metadata import format_metadata, parse_metadata
from tusd_py.tus.options import TusOptions
from tusd_py.tus.urls import Route, origin_of, route, upload_url

log = logging.getLogger("tusd_py.tus")

_METHOD_TOKEN = re.compile(r"[A-Za-z]{1,16}")



def _http_date(timestamp: float) -> str:
    return email.utils.formatdate(timestamp, usegmt=True)


class TusHandler:
    """The tus application: ``await handler(request) -> Response``."""

    def __init__(
        self,
        store: Store,
        locker: Locker,
        options: TusOptions,
        *,
        hooks: UploadHooks | None = None,
        metrics: UploadObserver | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``options`` are the settings (``cli.tus_options`` builds them from the
        configuration); ``hooks`` receive the upload events (pre-create may reject or shape a
        creation); ``metrics`` counts uploads created, finished and terminated;
        ``clock`` (Unix time) decides expiry."""
        self._store = store
        self._clock = clock
        self._locker = locker
        self._base_path = options.base_path
        self._behind_proxy = options.behind_proxy
        self._max_size = options.max_size
        self._cors = options.cors
        self._concatenator = store if isinstance(store, SupportsConcatenation) else None
        self._lifetime = options.lifetime if isinstance(store, SupportsExpiration) else 0.0
        # Every store offers creation-defer-length and termination (``stores.base``).
        extensions = ["creation", "creation-with-upload", "creation-defer-length", "termination"]
        if self._concatenator is not None:
            extensions.append("concatenation")
        # Verified by the handler (tus.checksum), so every store offers it.
        extensions.append("checksum")
        if self._lifetime:
            extensions.append("expiration")
        self.extensions: tuple[str, ...] = tuple(extensions)
        """The tus extensions offered (``Tus-Extension``), from the store's capabilities."""
        self._core = UploadCore(
            store,
            UploadEvents(hooks, metrics, behind_proxy=self._behind_proxy),
            max_size=self._max_size,
            checksum_max_buffered_size=options.checksum_max_buffered_size,
            checksum_spool_dir=options.checksum_spool_dir,
            clock=clock,
        )
        self.events = self._core.events
        """Hook events and upload counters (see ``tus.events`` for when each fires)."""
        self._ietf = IetfHandler(
            self._core,
            store,
            locker,
            base_path=self._base_path,
            behind_proxy=self._behind_proxy,
            max_size=self._max_size,
            lifetime=self._lifetime,
            interim_responses=options.interim_responses,
        )

    # --- entry points -------------------------------------------------------------

    async def __call__(self, request: Request) -> Response:
        """Answer one request. Never raises except on cancellation."""
        origin = self._cors.allowed_origin(request.headers)
        method = request.method
        # The IETF resumable-upload draft shares the endpoint and the stores; its
        # requests name a draft interop version instead of a tus version.
        ietf = is_ietf_request(request.headers)
        try:
            if origin is not None and self._cors.is_preflight(method, request.headers):
                if route(request.target, self._base_path) is None:
                    raise TusError(ERR_NOT_FOUND)
                response = Response(204, self._cors.preflight_headers(origin))
                origin = None  # the preflight headers already carry what it needs
            else:
                method = self._effective_method(request)
                if ietf:
                    response = await self._ietf(request, method)
                else:
                    response = await self._dispatch(request, method)
        except Exception as error:
            response = error_response(error, method, request.request_id)
        if not ietf:
            response.headers.append(("Tus-Resumable", TUS_VERSION))
        if origin is not None:
            response.headers.extend(self._cors.response_headers(origin))
        return response

    def release_all(self) -> None:
        """Graceful shutdown: every running PATCH stops reading its body, stores what
        it received and answers; new uploads of bytes get 503."""
        self._core.release_all()

    # --- routing ------------------------------------------------------------------

    @staticmethod
    def _effective_method(request: Request) -> str:
        # Honoured on every method, as the tus protocol says ("the actual method of
        # the request MUST be ignored") and tusd 1.x did: clients behind proxies that
        # block PATCH/DELETE send POST, some send GET. This grants nothing a client
        # could not do with the real method: a browser cannot put this header on a
        # plain link, form or image (only script can, and a cross-origin script needs
        # a CORS preflight that ``cors.allow_origins`` decides), and every overridden
        # request is checked exactly like a real one of that method.
        override = request.headers.get("x-http-method-override")
        if override is None:
            return request.method
        if _METHOD_TOKEN.fullmatch(override.strip()) is None:
            raise TusError(ERR_INVALID_METHOD_OVERRIDE)
        return override.strip().upper()

    def _allowed_methods(self, target: Route) -> list[str]:
        if target.upload_id is None:
            return ["POST", "OPTIONS"]
        return ["HEAD", "PATCH", "OPTIONS", "DELETE", "GET"]

    async def _dispatch(self, request: Request, method: str) -> Response:
        target = route(request.target, self._base_path)
        if target is None:
            raise TusError(ERR_NOT_FOUND)
        if method == "OPTIONS":
            return self._options()
        allowed = self._allowed_methods(target)
        if method not in allowed:
            raise TusError(ERR_METHOD_NOT_ALLOWED, headers=[("Allow", ", ".join(allowed))])
        # GET is a plain download (browsers, curl): it carries no tus version.
        if method != "GET" and request.headers.get("tus-resumable") != TUS_VERSION:
            raise TusError(ERR_UNSUPPORTED_VERSION, headers=[("Tus-Version", TUS_VERSION)])
        upload_id = target.upload_id
        if upload_id is None:
            return await self._post(request)
        if method == "HEAD":
            return await self._head(request, upload_id)
        if method == "PATCH":
            return await self._patch(request, upload_id)
        if method == "DELETE":
            return await self._delete(request, upload_id)
        return await self._get(request, upload_id)

    # --- verbs --------------------------------------------------------------------

    def _options(self) -> Response:
        headers = [
            ("Tus-Version", TUS_VERSION),
            ("Tus-Extension", ",".join(self.extensions)),
            ("Tus-Checksum-Algorithm", ALGORITHM_NAMES),
        ]
        if self._max_size > 0:
            headers.append(("Tus-Max-Size", str(self._max_size)))
        return Response(204, headers)

    async def _post(self, request: Request) -> Response:
        headers = request.headers
        concat = self._parse_concat(headers)
        if concat is not None and concat.is_final:
            return await self._post_final(request, concat)
        checksum = parse_upload_checksum(headers.get("upload-checksum"))
        defer = parse_defer_length(single_value(headers, "upload-defer-length", ERR_INVALID_DEFER_LENGTH))
        length: int | None
        if defer:
            if "upload-length" in headers:
                raise TusError(ERR_LENGTH_AND_DEFER)
            length = None
        else:
            length = parse_upload_length(single_value(headers, "upload-length", ERR_INVALID_LENGTH))
            self._check_max_size(length)
        metadata = parse_metadata(headers.get("upload-metadata"))
        origin = origin_of(headers, self._behind_proxy)
        if origin is None:
            raise TusError(ERR_INVALID_HOST)
        with_upload = is_offset_octet_stream(headers.get("content-type"))
        if with_upload and self._core.shutting_down:
            raise TusError(ERR_SHUTTING_DOWN)

        info = UploadInfo(
            id=new_upload_id(),
            length=length,
            metadata=metadata,
            expires_at=self._clock() + self._lifetime if self._lifetime else None,
            is_partial=concat is not None,
        )
        # Before the lock: the hook may choose the upload id, and the lock is per id.
        info = await self.events.pre_create(info, request)
        location = upload_url(*origin, self._base_path, info.id)
        body = GuardedBody(request.body) if with_upload else None
        async with self._locker.lock(info.id, body.stop if body is not None else no_release_request) as held:
            upload = await self._store.create(info, generation=held.generation)
            info = upload.info
            log.info("upload created", extra={"upload_id": info.id, "request_id": request.request_id})
            self.events.created(info, request)
            if body is not None:
                try:
                    info = await self._core.write_body(request, upload, body, held, checksum)
                except TusError as error:
                    # The upload exists (e.g. 460 for its first bytes): say where, so
                    # the client can resume it.
                    error.headers.append(("Location", location))
                    raise
            elif info.is_complete:
                info = await self._core.finish_if_complete(upload, request)

        response_headers = [("Location", location)]
        if with_upload:
            response_headers.append(("Upload-Offset", str(info.offset)))
        response_headers.extend(self._expires_header(info))
        return Response(201, response_headers)

    def _parse_concat(self, headers: Headers) -> Concat | None:
        value = headers.get("upload-concat")
        if value is None:
            return None
        if self._concatenator is None:
            raise TusError(ERR_NOT_IMPLEMENTED, "concatenation is not offered by this store")
        origin = origin_of(headers, self._behind_proxy)
        if origin is None:
            raise TusError(ERR_INVALID_HOST)
        return parse_upload_concat(value, self._base_path, origin[1])

    async def _post_final(self, request: Request, concat: Concat) -> Response:
        """Create a final upload from finished partial uploads (``tus.concat``)."""
        assert self._concatenator is not None and concat.partial_ids is not None
        headers = request.headers
        if "upload-length" in headers or "upload-defer-length" in headers:
            raise TusError(ERR_INVALID_CONCAT, "a final upload's length is its partials' total: send no Upload-Length")
        if is_offset_octet_stream(headers.get("content-type")) or "upload-checksum" in headers:
            raise TusError(ERR_INVALID_CONCAT, "a final upload is created without a body")
        metadata = parse_metadata(headers.get("upload-metadata"))
        origin = origin_of(headers, self._behind_proxy)
        assert origin is not None  # checked by _parse_concat
        info = UploadInfo(id=new_upload_id(), length=None, metadata=metadata, partial_ids=concat.partial_ids)
        info = await create_final(
            self._store,
            self._concatenator,
            self._locker,
            self.events,
            request,
            info,
            check_length=self._check_max_size,
            finish_if_complete=self._core.finish_if_complete,
            authorize=self._core.authorize,
        )
        log.info("final upload created from %d partial uploads", len(concat.partial_ids),
                 extra={"upload_id": info.id, "request_id": request.request_id})
        return Response(201, [("Location", upload_url(*origin, self._base_path, info.id))])

    async def _head(self, request: Request, upload_id: str) -> Response:
        await self._core.authorize(upload_id, READ, request)
        async with self._locker.lock(upload_id, no_release_request) as held:
            info = await self._core.finish_if_complete(await self._core.load(upload_id, held.generation), request)
        headers = [("Upload-Offset", str(info.offset)), ("Cache-Control", "no-store")]
        if info.length is None:
            headers.append(("Upload-Defer-Length", "1"))
        else:
            headers.append(("Upload-Length", str(info.length)))
        if info.metadata:
            headers.append(("Upload-Metadata", format_metadata(info.metadata)))
        headers.extend(concat_header(info, origin_of(request.headers, self._behind_proxy), self._base_path))
        headers.extend(self._expires_header(info))
        return Response(200, headers)

    async def _patch(self, request: Request, upload_id: str) -> Response:
        headers = request.headers
        require_offset_octet_stream(headers.get("content-type"))
        offset = parse_upload_offset(single_value(headers, "upload-offset", ERR_INVALID_OFFSET))
        length_value = single_value(headers, "upload-length", ERR_INVALID_LENGTH)
        declared_length = None if length_value is None else parse_upload_length(length_value)
        checksum = parse_upload_checksum(headers.get("upload-checksum"))
        if declared_length is not None:
            self._check_max_size(declared_length)
        if self._core.shutting_down:
            raise TusError(ERR_SHUTTING_DOWN)

        await self._core.authorize(upload_id, WRITE, request)
        body = GuardedBody(request.body)
        async with self._locker.lock(upload_id, body.stop) as held:
            upload = await self._core.load(upload_id, held.generation)
            info = upload.info
            if info.is_final:
                raise TusError(ERR_MODIFY_FINAL)
            if info.offset != offset:
                raise TusError(
                    ERR_MISMATCHED_OFFSET, f"upload is at {info.offset}", [("Upload-Offset", str(info.offset))]
                )
            if declared_length is not None:
                await self._core.declare_length(upload, declared_length)
            await self._core.finish_if_complete(upload, request)
            info = await self._core.write_body(request, upload, body, held, checksum)
        return Response(204, [("Upload-Offset", str(info.offset)), *self._expires_header(info)])

    async def _delete(self, request: Request, upload_id: str) -> Response:
        await self._core.authorize(upload_id, WRITE, request)
        async with self._locker.lock(upload_id, no_release_request):
            upload = await self._store.get(upload_id)
            # Under the lock: what the hook approves is what gets deleted.
            await self.events.pre_terminate(upload.info, request)
            await upload.terminate()
        info = upload.info
        log.info("upload terminated", extra={"upload_id": upload_id})
        self.events.terminated(info, request)
        return Response(204)

    async def _get(self, request: Request, upload_id: str) -> Response:
        await self._core.authorize(upload_id, READ, request)
        async with self._locker.lock(upload_id, no_release_request) as held:
            upload = await self._core.load(upload_id, held.generation)
            if not upload.info.is_complete:
                raise TusError(ERR_UPLOAD_NOT_FINISHED)
            info = await self._core.finish_if_complete(upload, request)
        size = info.offset
        try:
            byte_range = parse_range(request.headers.get("range"), size)
        except RangeNotSatisfiable:
            raise TusError(ERR_RANGE_NOT_SATISFIABLE, headers=[("Content-Range", f"bytes */{size}")]) from None
        headers = download_headers(info)
        headers.append(("Accept-Ranges", "bytes"))
        if byte_range is None:
            status, start, stop = 200, 0, size
        else:
            status, (start, stop) = 206, byte_range
            headers.append(("Content-Range", f"bytes {start}-{stop - 1}/{size}"))
        headers.append(("Content-Length", str(stop - start)))
        if stop == start:
            return Response(status, headers)
        return Response(status, headers, upload.read(start, stop))

    # --- helpers ------------------------------------------------------------------

    def _check_max_size(self, length: int) -> None:
        if self._max_size > 0 and length > self._max_size:
            raise TusError(ERR_MAX_SIZE_EXCEEDED, f"at most {self._max_size} bytes")

    def _expires_header(self, info: UploadInfo) -> list[tuple[str, str]]:
        if not self._lifetime or info.expires_at is None or info.is_complete:
            return []
        return [("Upload-Expires", _http_date(info.expires_at))]

