"""Problem details (RFC 9457) of the IETF resumable-upload draft (``tus.ietf``): the
draft's problem types, and every error of a draft request as a problem document."""

from __future__ import annotations

import http
import json
from dataclasses import dataclass

from tusd_py.http.types import Response
from tusd_py.tus.errors import classify, error_response
from tusd_py.tus.structured_fields import serialize_boolean

PROBLEM_JSON = "application/problem+json"

_PROBLEM_TYPES = "https://iana.org/assignments/http-problem-types#"


@dataclass(frozen=True, slots=True)
class ProblemType:
    """A problem type of the draft: its URI, status and title."""

    uri: str
    status: int
    title: str


MISMATCHING_OFFSET = ProblemType(
    _PROBLEM_TYPES + "mismatching-upload-offset", 409, "offset from request does not match offset of resource"
)
"""Draft section "Mismatching Offset"."""
INCONSISTENT_LENGTH = ProblemType(
    _PROBLEM_TYPES + "inconsistent-upload-length", 400, "inconsistent length values for upload"
)
"""Draft section "Inconsistent Length"."""
COMPLETED_UPLOAD = ProblemType(_PROBLEM_TYPES + "completed-upload", 400, "upload is already completed")
"""Drafts -04 to -08 defined this type for appends to a completed upload; the current
draft dropped it but still requires rejecting such appends (section "Completeness")."""


class UploadProblem(Exception):
    """A draft-defined problem: answered as ``application/problem+json`` with
    ``Upload-Complete: ?0``, the given extension members and headers."""

    def __init__(
        self,
        problem: ProblemType,
        detail: str | None = None,
        members: dict[str, int] | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(problem.title if detail is None else f"{problem.title}: {detail}")
        self.problem = problem
        self.detail = detail
        self.members = members or {}
        self.headers = headers or []


def problem_response(
    error: BaseException, method: str, request_id: str, extra_headers: list[tuple[str, str]] | None = None
) -> Response:
    """Any exception as an RFC 9457 problem document (no body for HEAD).

    Draft problems keep their type; everything else goes through the tus error table
    (``errors.error_response`` decides status, extra headers and logging, so both
    protocols answer a store or lock failure the same way) and becomes an
    ``about:blank`` problem whose ``code`` is the table's code.
    """
    # Draft section "Completeness": Upload-Complete can be false in a response to an
    # invalid operation, and must be for a mismatching offset.
    headers = [("Upload-Complete", serialize_boolean(False))]
    document: dict[str, object]
    if isinstance(error, UploadProblem):
        status = error.problem.status
        document = {"type": error.problem.uri, "title": error.problem.title}
        if error.detail is not None:
            document["detail"] = error.detail
        document.update(error.members)
        headers.extend(error.headers)
    else:
        plain = error_response(error, method, request_id)
        tus_error = classify(error)
        status = plain.status
        document = {
            "title": http.HTTPStatus(status).phrase,
            "status": status,
            "detail": tus_error.message,
            "code": tus_error.kind.code,
        }
        headers.extend(header for header in plain.headers if header[0].lower() != "content-type")
    headers.extend(extra_headers or [])
    if method == "HEAD":
        return Response(status, headers)
    headers.append(("Content-Type", PROBLEM_JSON))
    return Response(status, headers, json.dumps(document).encode("utf-8"))
