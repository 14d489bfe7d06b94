"""Every error the tus handler answers with, defined once, and the one function that
turns any exception into a response.

An ``ErrorKind`` is a row of the table: a stable code (for logs and clients), an HTTP
status and a short message. Handler code raises ``TusError(KIND)``; store and locker
exceptions are mapped to a kind here, so there is exactly one place that decides what a
client sees. Anything unexpected becomes 500 and is logged with its traceback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tusd_py.http.types import Response
from tusd_py.lockers.base import LockTimeout, LockUnavailable
from tusd_py.stores.base import (
    InvalidObjectKey,
    ObjectKeyTaken,
    StoreUnavailable,
    UploadExists,
    UploadNotFound,
    UploadTooLarge,
)

log = logging.getLogger("tusd_py.tus")


@dataclass(frozen=True, slots=True)
class ErrorKind:
    """One row of the error table."""

    code: str
    status: int
    message: str
    reason: str = ""
    """The status line's reason phrase when the status is not a standard HTTP one
    (tus's 460); empty: the standard phrase."""


# --- the table -----------------------------------------------------------------------

ERR_UNSUPPORTED_VERSION = ErrorKind(
    "ERR_UNSUPPORTED_VERSION", 412, "missing, invalid or unsupported Tus-Resumable header"
)
ERR_MAX_SIZE_EXCEEDED = ErrorKind("ERR_MAX_SIZE_EXCEEDED", 413, "upload length exceeds the maximum size")
ERR_UPLOAD_SIZE_EXCEEDED = ErrorKind(
    "ERR_UPLOAD_SIZE_EXCEEDED", 413, "request body exceeds the upload length; bytes up to the length were stored"
)
ERR_STORE_SIZE_EXCEEDED = ErrorKind(
    "ERR_STORE_SIZE_EXCEEDED", 413, "upload exceeds what the storage backend can hold for it"
)
ERR_INVALID_CONTENT_TYPE = ErrorKind(
    "ERR_INVALID_CONTENT_TYPE", 415, "missing or invalid Content-Type header (expected application/offset+octet-stream)"
)
ERR_INVALID_OFFSET = ErrorKind("ERR_INVALID_OFFSET", 400, "missing or invalid Upload-Offset header")
ERR_MISMATCHED_OFFSET = ErrorKind("ERR_MISMATCHED_OFFSET", 409, "Upload-Offset does not match the upload's offset")
ERR_INVALID_LENGTH = ErrorKind("ERR_INVALID_LENGTH", 400, "missing or invalid Upload-Length header")
ERR_INVALID_DEFER_LENGTH = ErrorKind("ERR_INVALID_DEFER_LENGTH", 400, "invalid Upload-Defer-Length header")
ERR_LENGTH_AND_DEFER = ErrorKind(
    "ERR_LENGTH_AND_DEFER", 400, "Upload-Length and Upload-Defer-Length must not be sent together"
)
ERR_LENGTH_ALREADY_SET = ErrorKind("ERR_LENGTH_ALREADY_SET", 400, "the upload length is already set and cannot change")
ERR_LENGTH_BELOW_OFFSET = ErrorKind("ERR_LENGTH_BELOW_OFFSET", 400, "Upload-Length is smaller than the stored offset")
ERR_INVALID_METADATA = ErrorKind("ERR_INVALID_METADATA", 400, "invalid Upload-Metadata header")
ERR_CHECKSUM_NOT_SUPPORTED = ErrorKind(
    "ERR_CHECKSUM_NOT_SUPPORTED", 400, "unsupported Upload-Checksum algorithm (supported: md5, sha1, sha256)"
)
ERR_INVALID_CHECKSUM = ErrorKind(
    "ERR_INVALID_CHECKSUM", 400, "invalid Upload-Checksum header (expected '<algorithm> <base64 digest>')"
)
ERR_CHECKSUM_MISMATCH = ErrorKind(
    "ERR_CHECKSUM_MISMATCH",
    460,
    "checksum mismatch: nothing of this request was stored; resend it",
    reason="Checksum Mismatch",
)
ERR_CHECKSUM_BODY_TOO_LARGE = ErrorKind(
    "ERR_CHECKSUM_BODY_TOO_LARGE",
    413,
    "a request with Upload-Checksum is held until verified and may carry at most checksum.max_buffered_size bytes;"
    " send smaller chunks",
)
ERR_INVALID_CONCAT = ErrorKind(
    "ERR_INVALID_CONCAT",
    400,
    "invalid Upload-Concat header (expected 'partial' or 'final;<upload URL> <upload URL> ...')",
)
ERR_PARTIAL_NOT_FOUND = ErrorKind(
    "ERR_PARTIAL_NOT_FOUND", 400, "a partial upload named in Upload-Concat does not exist"
)
ERR_NOT_PARTIAL = ErrorKind("ERR_NOT_PARTIAL", 400, "an upload named in Upload-Concat is not a partial upload")
ERR_PARTIAL_NOT_FINISHED = ErrorKind(
    "ERR_PARTIAL_NOT_FINISHED", 400, "a partial upload named in Upload-Concat is not finished yet"
)
ERR_MODIFY_FINAL = ErrorKind("ERR_MODIFY_FINAL", 403, "a final (concatenated) upload cannot be modified")
ERR_UPLOAD_EXPIRED = ErrorKind("ERR_UPLOAD_EXPIRED", 410, "upload expired")
ERR_INVALID_HOST = ErrorKind("ERR_INVALID_HOST", 400, "missing or invalid Host header")
ERR_INVALID_METHOD_OVERRIDE = ErrorKind("ERR_INVALID_METHOD_OVERRIDE", 400, "invalid X-HTTP-Method-Override header")
ERR_NOT_FOUND = ErrorKind("ERR_NOT_FOUND", 404, "not found")
ERR_UPLOAD_NOT_FOUND = ErrorKind("ERR_UPLOAD_NOT_FOUND", 404, "upload not found")
ERR_UPLOAD_EXISTS = ErrorKind(
    "ERR_UPLOAD_EXISTS", 409, "an upload with the id chosen by the pre-create hook already exists"
)
ERR_INVALID_OBJECT_KEY = ErrorKind("ERR_INVALID_OBJECT_KEY", 400, "the upload's metadata cannot name its object")
ERR_OBJECT_KEY_TAKEN = ErrorKind("ERR_OBJECT_KEY_TAKEN", 409, "an object with this upload's key already exists")
ERR_UPLOAD_NOT_FINISHED = ErrorKind(
    "ERR_UPLOAD_NOT_FINISHED", 404, "upload is not finished; only complete uploads can be downloaded"
)
ERR_METHOD_NOT_ALLOWED = ErrorKind("ERR_METHOD_NOT_ALLOWED", 405, "method not allowed")
ERR_RANGE_NOT_SATISFIABLE = ErrorKind("ERR_RANGE_NOT_SATISFIABLE", 416, "requested range not satisfiable")
ERR_UPLOAD_LOCKED = ErrorKind(
    "ERR_UPLOAD_LOCKED",
    423,
    "upload is locked: another request holds it and did not release it in time; retry later",
)
ERR_NOT_IMPLEMENTED = ErrorKind("ERR_NOT_IMPLEMENTED", 501, "feature not implemented by this server")
ERR_LOCK_UNAVAILABLE = ErrorKind("ERR_LOCK_UNAVAILABLE", 503, "the lock service is unavailable; retry later")
ERR_LOCK_LOST = ErrorKind(
    "ERR_LOCK_LOST", 503, "the upload lock was lost while writing; check the offset with HEAD and resume"
)
ERR_STORE_UNAVAILABLE = ErrorKind("ERR_STORE_UNAVAILABLE", 503, "the storage backend is unavailable; retry later")
ERR_SHUTTING_DOWN = ErrorKind("ERR_SHUTTING_DOWN", 503, "server is shutting down; retry later")
ERR_HOOK_REJECTED = ErrorKind("ERR_HOOK_REJECTED", 403, "upload rejected by the server's pre-create hook")
"""Template: a rejection answers the hook's own 4xx status and message with this code."""
ERR_HOOK_UNAVAILABLE = ErrorKind(
    "ERR_HOOK_UNAVAILABLE", 503, "the upload could not be checked (pre-create hook unavailable); retry later"
)
ERR_HOOK_FAILED = ErrorKind("ERR_HOOK_FAILED", 500, "the pre-create hook gave an invalid answer")
ERR_FINISH_REJECTED = ErrorKind("ERR_HOOK_REJECTED", 403, "upload rejected by the server's pre-finish hook")
"""Template, as ERR_HOOK_REJECTED; the upload stays complete (stored and finished)."""
ERR_FINISH_HOOK_FAILED = ErrorKind(
    "ERR_HOOK_FAILED", 500, "the upload is complete, but the server's pre-finish hook failed"
)
"""Not 503: the pre-finish hook is asked once, by the request that completed the upload;
a retry would find it complete and not ask again."""
ERR_TERMINATION_REJECTED = ErrorKind(
    "ERR_UPLOAD_TERMINATION_REJECTED", 403, "upload termination rejected by the server's pre-terminate hook"
)
"""Template: a rejection answers the hook's own 4xx status and message with this code."""
ERR_TERMINATION_HOOK_UNAVAILABLE = ErrorKind(
    "ERR_HOOK_UNAVAILABLE", 503, "the termination could not be checked (pre-terminate hook unavailable); retry later"
)
ERR_TERMINATION_HOOK_FAILED = ErrorKind(
    "ERR_HOOK_FAILED", 500, "the pre-terminate hook gave an invalid answer; nothing was deleted"
)
ERR_ACCESS_DENIED = ErrorKind("ERR_ACCESS_DENIED", 403, "access to the upload denied by the server's pre-access hook")
"""Template: a rejection answers the hook's own 4xx status and message with this code."""
ERR_ACCESS_HOOK_UNAVAILABLE = ErrorKind(
    "ERR_HOOK_UNAVAILABLE", 503, "access to the upload could not be checked (pre-access hook failed); retry later"
)
"""Fail closed: an unreachable receiver or an invalid answer grants nothing."""
ERR_INTERNAL = ErrorKind("ERR_INTERNAL", 500, "internal server error")


class TusError(Exception):
    """An error the handler answers with ``kind``.

    ``detail`` refines the table's message for this occurrence (never secrets or raw
    client input beyond what is safe to echo); ``headers`` are added to the response
    (e.g. ``Allow`` for 405, ``Content-Range`` for 416).
    """

    def __init__(self, kind: ErrorKind, detail: str | None = None, headers: list[tuple[str, str]] | None = None):
        super().__init__(kind.code if detail is None else f"{kind.code}: {detail}")
        self.kind = kind
        self.detail = detail
        self.headers = headers or []

    @property
    def message(self) -> str:
        """The text sent to the client."""
        return self.kind.message if self.detail is None else f"{self.kind.message}: {self.detail}"


def classify(error: BaseException) -> TusError:
    """The ``TusError`` a client sees for ``error`` (unknown errors become 500)."""
    if isinstance(error, TusError):
        return error
    if isinstance(error, UploadNotFound):
        return TusError(ERR_UPLOAD_NOT_FOUND)
    if isinstance(error, LockTimeout):
        return TusError(ERR_UPLOAD_LOCKED, str(error) or None)
    if isinstance(error, LockUnavailable):
        return TusError(ERR_LOCK_UNAVAILABLE)
    if isinstance(error, UploadExists):
        return TusError(ERR_UPLOAD_EXISTS)
    if isinstance(error, InvalidObjectKey):
        return TusError(ERR_INVALID_OBJECT_KEY, str(error) or None)
    if isinstance(error, ObjectKeyTaken):
        return TusError(ERR_OBJECT_KEY_TAKEN, str(error) or None)
    if isinstance(error, UploadTooLarge):
        return TusError(ERR_STORE_SIZE_EXCEEDED)
    if isinstance(error, StoreUnavailable):
        return TusError(ERR_STORE_UNAVAILABLE)
    return TusError(ERR_INTERNAL)


def error_response(error: BaseException, method: str, request_id: str = "") -> Response:
    """Turn any exception into a response: a short ``text/plain`` message (none for
    HEAD), the kind's status and extra headers. Unexpected errors are logged with their
    traceback; unavailable backends are logged as warnings without one."""
    tus_error = classify(error)
    kind = tus_error.kind
    if kind is ERR_INTERNAL:
        log.error(
            "unexpected error handling %s request", method, exc_info=error, extra={"request_id": request_id}
        )
    elif kind.status == 503:
        # A TusError's own text is its code; what went wrong is its cause (a hook's
        # connection error), else its message.
        reason = error.__cause__ or tus_error.message if isinstance(error, TusError) else error
        log.warning("%s: %s", kind.code, reason, extra={"request_id": request_id})
    headers = list(tus_error.headers)
    body = b""
    if method != "HEAD":
        body = (tus_error.message + "\n").encode("utf-8")
        headers.append(("Content-Type", "text/plain; charset=utf-8"))
    return Response(kind.status, headers, body, reason=kind.reason)
