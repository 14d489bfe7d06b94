"""The IETF "Resumable Uploads for HTTP" draft (draft-ietf-httpbis-resumable-upload),
served next to tus 1.0 on the same endpoint and the same stores.

A request belongs to the draft when it carries ``Upload-Draft-Interop-Version`` and no
``Tus-Resumable`` (``is_ietf_request``). Interop versions:

- **8** (drafts -09 up to the editor's copy in ``/work/shared/reference``): the
  reference. Appends must be ``application/partial-upload``.
- **6** (drafts -04 and -05; tus-js-client 4.x ``protocol: 'ietf-draft-05'``): same
  fields; appends must be ``application/partial-upload`` (introduced in -04).
- **5** (draft -03; tus-js-client 4.x ``protocol: 'ietf-draft-03'``): appends carry no
  particular media type, and ``Upload-Limit`` did not exist yet, so it is not sent.

All three use ``Upload-Complete: ?0/?1`` (only interop 3, draft -01, had
``Upload-Incomplete``) and the ``104 (Upload Resumption Supported)`` interim response.
A request naming any other interop version is served with the interop-8 rules, but
without 104 responses: the draft's "Draft Version Identification" appendix forbids a
104 when the client's interop version does not match ours. No 104 is sent either when
``server.interim_responses`` says a proxy in front may not understand it (by default
with ``server.behind_proxy``): the 104 only lets a client resume a creation that was
cut off before its 201, and a client without it resumes by creating anew.

Mapping onto the stores (``stores/base.py`` only): an upload resource is a store
upload; "complete" is ``UploadInfo.is_complete`` (length known and reached: the store
finishes it). A length comes from ``Upload-Length`` or from ``Upload-Complete: ?1``
with a ``Content-Length`` (draft section "Length"); without either the upload is
created with a deferred length, and a request that ends it with ``Upload-Complete: ?1``
stores its body first and only then declares the length as the final offset
(``declare_length`` + ``finish``), so the final tail is never lost.

The body, lock and release-request rules are shared with tus (``tus.core.UploadCore``):
a HEAD, append or DELETE that arrives while an append is running asks it to stop,
store what it received and answer, which is the draft's recommended concurrency
handling (section "Concurrency").
"""

from __future__ import annotations

import base64
import logging
import re
from dataclasses import dataclass
from email.message import Message

from tusd_py.http.types import Headers, Request, Response
from tusd_py.lockers.base import HeldLock, Locker, no_release_request
from tusd_py.stores.base import (
    Store,
    Upload,
    UploadInfo,
    new_upload_id,
)
from tusd_py.tus.body import EndReason, GuardedBody
from tusd_py.tus.core import UploadCore
from tusd_py.tus.errors import (
    ERR_INVALID_HOST,
    ERR_MAX_SIZE_EXCEEDED,
    ERR_METHOD_NOT_ALLOWED,
    ERR_NOT_FOUND,
    ERR_SHUTTING_DOWN,
    ERR_UPLOAD_SIZE_EXCEEDED,
    ErrorKind,
    TusError,
)
from tusd_py.tus.events import READ, WRITE
from tusd_py.tus.headers import OFFSET_OCTET_STREAM, media_type
from tusd_py.tus.ietf_problems import (
    COMPLETED_UPLOAD,
    INCONSISTENT_LENGTH,
    MISMATCHING_OFFSET,
    UploadProblem,
    problem_response,
)
from tusd_py.tus.metadata import parse_metadata
from tusd_py.tus.structured_fields import (
    StructuredFieldError,
    parse_boolean,
    parse_integer,
    parse_non_negative_integer,
    serialize_boolean,
    serialize_integer_dictionary,
)
from tusd_py.tus.urls import origin_of, route, upload_url

log = logging.getLogger("tusd_py.tus")

INTEROP_HEADER = "Upload-Draft-Interop-Version"
PARTIAL_UPLOAD = "application/partial-upload"

# A media type is two RFC 9110 tokens; anything else is not stored as metadata.
_MEDIA_TYPE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,127}/[!#$%&'*+.^_`|~0-9A-Za-z-]{1,127}")
_MAX_FILENAME_BYTES = 1024


@dataclass(frozen=True, slots=True)
class Draft:
    """What differs between the interop versions this server speaks."""

    interop_version: int
    drafts: str
    """The draft revisions that use this interop version."""
    append_media_type: str | None
    """The Content-Type an append must carry (None: any; it was introduced in -04)."""
    has_upload_limit: bool
    """Whether the Upload-Limit field exists (introduced in -04)."""


LATEST = Draft(8, "-09 and later", PARTIAL_UPLOAD, True)
SUPPORTED_DRAFTS: dict[int, Draft] = {
    5: Draft(5, "-03", None, False),
    6: Draft(6, "-04, -05", PARTIAL_UPLOAD, True),
    8: LATEST,
}
"""Interop versions answered with their own rules and with 104 responses."""


def is_ietf_request(headers: Headers) -> bool:
    """True for a request of the IETF draft rather than tus 1.0: it names a draft
    interop version and no tus version (a request naming both is tus)."""
    return INTEROP_HEADER.lower() in headers and "tus-resumable" not in headers


# --- header parsing ------------------------------------------------------------------

# Request errors of the draft that tus has no row for (the tus table stays tus's).
_INVALID_FIELD = ErrorKind("ERR_INVALID_UPLOAD_FIELD", 400, "invalid resumable-upload header field")
_MISSING_COMPLETE = ErrorKind("ERR_MISSING_UPLOAD_COMPLETE", 400, "Upload-Complete is required")
_MISSING_OFFSET = ErrorKind("ERR_MISSING_UPLOAD_OFFSET", 400, "Upload-Offset is required")
_INVALID_MEDIA_TYPE = ErrorKind("ERR_INVALID_CONTENT_TYPE", 415, f"appending requires Content-Type: {PARTIAL_UPLOAD}")


def _field_values(headers: Headers, name: str) -> list[str] | None:
    values = headers.get_all(name)
    return values or None


def _boolean(headers: Headers, name: str) -> bool | None:
    values = _field_values(headers, name)
    if values is None:
        return None
    try:
        return parse_boolean(values)
    except StructuredFieldError:
        # The draft says an invalid value makes the field ignored; a client that sent
        # one has a bug, and telling it beats guessing whether it meant "complete".
        raise TusError(_INVALID_FIELD, f"{name} must be a structured-field Boolean (?0 or ?1)") from None


def _non_negative_integer(headers: Headers, name: str) -> int | None:
    values = _field_values(headers, name)
    if values is None:
        return None
    try:
        return parse_non_negative_integer(values)
    except StructuredFieldError:
        raise TusError(_INVALID_FIELD, f"{name} must be a non-negative structured-field Integer") from None


def _interop_version(headers: Headers) -> int:
    values = _field_values(headers, INTEROP_HEADER)
    assert values is not None  # is_ietf_request checked it
    try:
        return parse_integer(values)
    except StructuredFieldError:
        raise TusError(_INVALID_FIELD, f"{INTEROP_HEADER} must be a structured-field Integer") from None


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _creation_metadata(headers: Headers) -> dict[str, str]:
    """Metadata of a new upload, in the store's base64 form.

    tus-js-client sends tus's ``Upload-Metadata`` in its IETF modes too. The draft's
    own channel is representation metadata (section "Upload Creation"): the media type
    from ``Content-Type`` and a file name from ``Content-Disposition``; they fill
    ``filetype`` and ``filename`` when ``Upload-Metadata`` does not. Downloads treat
    both as untrusted (``download.py``).
    """
    metadata = parse_metadata(headers.get("upload-metadata"))
    content_type = media_type(headers.get("content-type"))
    if (
        content_type is not None
        and content_type not in (PARTIAL_UPLOAD, OFFSET_OCTET_STREAM)
        and _MEDIA_TYPE.fullmatch(content_type)
    ):
        metadata.setdefault("filetype", _b64(content_type))
    disposition = headers.get("content-disposition")
    if disposition is not None and "filename" not in metadata:
        parsed = Message()
        parsed["Content-Disposition"] = disposition
        filename = parsed.get_filename()
        if filename and len(filename.encode("utf-8", "replace")) <= _MAX_FILENAME_BYTES:
            metadata["filename"] = _b64(filename)
    return metadata


# --- the handler -----------------------------------------------------------------------


class IetfHandler:
    """Answers requests of the IETF draft: ``await ietf(request, method)``."""

    CREATION_METHODS = ("POST", "PUT", "PATCH")
    """Draft section "Upload Creation": any method that carries content can create."""

    def __init__(
        self,
        core: UploadCore,
        store: Store,
        locker: Locker,
        *,
        base_path: str,
        behind_proxy: bool,
        max_size: int,
        lifetime: float,
        interim_responses: bool,
    ) -> None:
        self._core = core
        self._store = store
        self._locker = locker
        self._base_path = base_path
        self._behind_proxy = behind_proxy
        self._max_size = max_size
        self._lifetime = lifetime
        """Seconds an unfinished upload lives (0: forever, or the store cannot expire
        uploads); announced as ``max-age``."""
        self._interim_responses = interim_responses
        """Whether a 104 may be sent: a proxy in front that does not know 104 takes
        it for the final response (``server.interim_responses``)."""

    async def __call__(self, request: Request, method: str) -> Response:
        """Answer one draft request (``method`` after any override). Never raises
        except on cancellation."""
        rules = LATEST
        try:
            draft = SUPPORTED_DRAFTS.get(_interop_version(request.headers))
            rules = draft or LATEST
            announce = draft is not None and self._interim_responses
            return await self._dispatch(request, method, rules, announce=announce)
        except Exception as error:
            # Section "Limits": a 413 caused by our limits should name them.
            extra = self._limit_headers(rules, None) if _is_too_large(error) else []
            return problem_response(error, method, request.request_id, extra)

    # --- routing ------------------------------------------------------------------

    async def _dispatch(self, request: Request, method: str, rules: Draft, announce: bool) -> Response:
        target = route(request.target, self._base_path)
        if target is None:
            raise TusError(ERR_NOT_FOUND)
        if target.upload_id is None:
            if method == "OPTIONS":
                return Response(204, self._limit_headers(rules, None))
            if method in self.CREATION_METHODS:
                return await self._create(request, rules, announce)
            raise TusError(ERR_METHOD_NOT_ALLOWED, headers=[("Allow", ", ".join((*self.CREATION_METHODS, "OPTIONS")))])
        upload_id = target.upload_id
        if method in ("HEAD", "GET"):
            # Section "Offset Retrieval": GET works like HEAD; content is not expected.
            return await self._retrieve_offset(request, upload_id, rules)
        if method == "PATCH":
            return await self._append(request, upload_id, rules)
        if method == "DELETE":
            return await self._cancel(request, upload_id)
        if method == "OPTIONS":
            return Response(204, self._limit_headers(rules, None))
        allowed = ["HEAD", "GET", "PATCH", "OPTIONS", "DELETE"]
        raise TusError(ERR_METHOD_NOT_ALLOWED, headers=[("Allow", ", ".join(allowed))])

    # --- creation -----------------------------------------------------------------

    async def _create(self, request: Request, draft: Draft, announce: bool) -> Response:
        headers = request.headers
        complete = _boolean(headers, "upload-complete")
        if complete is None:
            raise TusError(_MISSING_COMPLETE)
        length = _length_of_request(
            offset=0,
            complete=complete,
            declared=_non_negative_integer(headers, "upload-length"),
            content_length=request.body.length,
            known=None,
        )
        if length is not None:
            self._check_max_size(length)
        metadata = _creation_metadata(headers)
        origin = origin_of(headers, self._behind_proxy)
        if origin is None:
            raise TusError(ERR_INVALID_HOST)
        if self._core.shutting_down:
            raise TusError(ERR_SHUTTING_DOWN)

        info = UploadInfo(
            id=new_upload_id(),
            length=length,
            metadata=metadata,
            expires_at=self._core.now() + self._lifetime if self._lifetime else None,
        )
        # Before the lock: the hook may choose the upload id, and the lock is per id.
        info = await self._core.events.pre_create(info, request)
        location = upload_url(*origin, self._base_path, info.id)
        body = GuardedBody(request.body)
        async with self._locker.lock(info.id, body.stop) as held:
            upload = await self._store.create(info, generation=held.generation)
            log.info(
                "upload created (IETF draft interop %d)",
                draft.interop_version,
                extra={"upload_id": info.id, "request_id": request.request_id},
            )
            self._core.events.created(upload.info, request)
            if announce:
                await self._announce(request, draft, location, upload.info)
            info = await self._store_body(request, upload, body, held, complete)
        # Section "Upload Creation": 201 with Location; the same Location as the 104.
        return Response(201, [("Location", location), *self._state_headers(info, draft)])

    async def _announce(self, request: Request, draft: Draft, location: str, info: UploadInfo) -> None:
        """Send ``104 (Upload Resumption Supported)`` with the upload's Location, so
        the client can resume even if this request is cut off (section "Upload
        Creation", appendix "Draft Version Identification")."""
        headers = [("Location", location), (INTEROP_HEADER, str(draft.interop_version))]
        headers.extend(self._limit_headers(draft, info))
        try:
            await request.send_informational(104, headers)
        except Exception as error:
            # The 104 is advisory; if the connection is gone, reading the body will
            # say so and what arrived is still stored.
            log.info("could not send 104: %s", error, extra={"request_id": request.request_id})

    # --- offset retrieval, append, cancellation -----------------------------------

    async def _retrieve_offset(self, request: Request, upload_id: str, draft: Draft) -> Response:
        await self._core.authorize(upload_id, READ, request)
        async with self._locker.lock(upload_id, no_release_request) as held:
            info = await self._core.finish_if_complete(await self._core.load(upload_id, held.generation), request)
        # Section "Offset Retrieval": Upload-Offset, Upload-Complete, Upload-Length when
        # known, Upload-Limit, and no-store so that no cache serves a stale offset.
        headers = self._state_headers(info, draft)
        if info.length is not None:
            headers.append(("Upload-Length", str(info.length)))
        headers.append(("Cache-Control", "no-store"))
        return Response(204, headers)

    async def _append(self, request: Request, upload_id: str, draft: Draft) -> Response:
        headers = request.headers
        if draft.append_media_type is not None and media_type(headers.get("content-type")) != draft.append_media_type:
            raise TusError(_INVALID_MEDIA_TYPE)
        offset = _non_negative_integer(headers, "upload-offset")
        if offset is None:
            raise TusError(_MISSING_OFFSET)
        complete = _boolean(headers, "upload-complete")
        if complete is None:
            raise TusError(_MISSING_COMPLETE)
        declared = _non_negative_integer(headers, "upload-length")
        if self._core.shutting_down:
            raise TusError(ERR_SHUTTING_DOWN)
        content_length = request.body.length

        await self._core.authorize(upload_id, WRITE, request)
        body = GuardedBody(request.body)
        async with self._locker.lock(upload_id, body.stop) as held:
            upload = await self._core.load(upload_id, held.generation)
            info = upload.info
            if info.is_complete:
                return await self._append_to_completed(request, upload, offset, complete, draft)
            if offset != info.offset:
                raise UploadProblem(
                    MISMATCHING_OFFSET,
                    members={"expected-offset": info.offset, "provided-offset": offset},
                    headers=[("Upload-Offset", str(info.offset))],
                )
            length = _length_of_request(
                offset=offset, complete=complete, declared=declared, content_length=content_length, known=info.length
            )
            if length is not None and info.length is None:
                self._check_max_size(length)
                await self._core.declare_length(upload, length)
            info = await self._store_body(request, upload, body, held, complete)
        if info.is_complete:
            return Response(200, self._state_headers(info, draft))
        return Response(204, self._state_headers(info, draft))

    async def _append_to_completed(
        self, request: Request, upload: Upload, offset: int, complete: bool, draft: Draft
    ) -> Response:
        """An append to a completed upload. Section "Upload Append": the final response
        may have been lost, so a valid repeat of the completing request (same offset,
        ``Upload-Complete: ?1``, no content) gets the final response again; anything
        else would change a completed upload and is rejected."""
        info = upload.info
        if offset == info.offset and complete and request.body.length == 0:
            info = await self._core.finish_if_complete(upload, request)
            return Response(200, self._state_headers(info, draft))
        raise UploadProblem(COMPLETED_UPLOAD, headers=[("Upload-Offset", str(info.offset))])

    async def _cancel(self, request: Request, upload_id: str) -> Response:
        # Section "Upload Cancellation": in-flight requests are stopped first; taking
        # the lock asks a running append to stop, store what it has and answer.
        await self._core.authorize(upload_id, WRITE, request)
        async with self._locker.lock(upload_id, no_release_request):
            upload = await self._store.get(upload_id)
            # Under the lock: what the hook approves is what gets deleted.
            await self._core.events.pre_terminate(upload.info, request)
            await upload.terminate()
        info = upload.info
        log.info("upload cancelled (IETF draft)", extra={"upload_id": upload_id})
        self._core.events.terminated(info, request)
        return Response(204)

    # --- helpers ------------------------------------------------------------------

    async def _store_body(
        self, request: Request, upload: Upload, body: GuardedBody, held: HeldLock, complete: bool
    ) -> UploadInfo:
        """Store the request content and, when the client marked it complete and all
        of it arrived, complete the upload.

        A deferred length is declared only after the body is stored (as the final
        offset): declaring it first would make a chunked final request lose its tail,
        and declaring it for an interrupted request would mark an upload complete
        that is not (section "Upload Creation", last paragraph).
        """
        info = upload.info
        if request.body.length != 0:
            try:
                info = await self._core.write_body(request, upload, body, held)
            except TusError as error:
                if error.kind is not ERR_UPLOAD_SIZE_EXCEEDED:
                    raise
                # Chunked content ran past the known length: stored up to the length
                # (section "Upload Append": the offset must not exceed the length).
                raise UploadProblem(
                    INCONSISTENT_LENGTH,
                    f"the content runs past the upload length {info.length}",
                    headers=[("Upload-Offset", str(info.offset))],
                ) from None
        received_all = request.body.length == 0 or body.reason is EndReason.COMPLETE
        if complete and received_all and not info.is_complete:
            if info.length is not None:
                # Chunked content that ended before the known length although the
                # client said it completes the upload. What arrived is kept.
                raise UploadProblem(
                    INCONSISTENT_LENGTH,
                    f"the upload length is {info.length} but the content ended at {info.offset}",
                    headers=[("Upload-Offset", str(info.offset))],
                )
            await self._core.declare_length(upload, info.offset)
        # Also when no content was written: an empty request can complete an upload
        # whose length it just declared.
        return await self._core.finish_if_complete(upload, request)

    def _check_max_size(self, length: int) -> None:
        if self._max_size > 0 and length > self._max_size:
            raise TusError(ERR_MAX_SIZE_EXCEEDED, f"at most {self._max_size} bytes")

    def _state_headers(self, info: UploadInfo, draft: Draft) -> list[tuple[str, str]]:
        return [
            ("Upload-Offset", str(info.offset)),
            ("Upload-Complete", serialize_boolean(info.is_complete)),
            *self._limit_headers(draft, info),
        ]

    def _limit_headers(self, draft: Draft, info: UploadInfo | None) -> list[tuple[str, str]]:
        """``Upload-Limit`` (section "Limits"): ``max-size`` and the remaining
        ``max-age``; ``min-size=0`` when there is no limit, since an empty value is
        not allowed."""
        if not draft.has_upload_limit:
            return []
        members: list[tuple[str, int]] = []
        if self._max_size > 0:
            members.append(("max-size", self._max_size))
        if self._lifetime:
            if info is None:
                members.append(("max-age", int(self._lifetime)))
            elif info.expires_at is not None and not info.is_complete:
                members.append(("max-age", max(0, int(info.expires_at - self._core.now()))))
        if not members:
            members.append(("min-size", 0))
        return [("Upload-Limit", serialize_integer_dictionary(members))]


def _length_of_request(
    *, offset: int, complete: bool, declared: int | None, content_length: int | None, known: int | None
) -> int | None:
    """The upload length a request indicates (section "Length"), or None.

    Indicator 1: ``Upload-Complete: ?1`` with a Content-Length says the length is the
    offset plus the content length; indicator 2 is ``Upload-Length``. Both must agree
    with each other and with a length recorded earlier, and content may not run past
    a known length; otherwise the inconsistent-length problem (400).
    """
    indicated = [value for value in (declared, known) if value is not None]
    if complete and content_length is not None:
        indicated.append(offset + content_length)
    if len(set(indicated)) > 1:
        raise UploadProblem(INCONSISTENT_LENGTH, "Upload-Length, Content-Length and the upload disagree")
    length = indicated[0] if indicated else None
    if length is not None:
        if length < offset:
            raise UploadProblem(INCONSISTENT_LENGTH, f"the length {length} is below the offset {offset}")
        if content_length is not None and offset + content_length > length:
            raise UploadProblem(
                INCONSISTENT_LENGTH, f"{content_length} bytes at offset {offset} run past the length {length}"
            )
    return length


def _is_too_large(error: BaseException) -> bool:
    return isinstance(error, TusError) and error.kind is ERR_MAX_SIZE_EXCEEDED
