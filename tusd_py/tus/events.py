"""What the tus handler tells the outside world about uploads: hook events (an
``UploadHooks``, e.g. ``tusd_py.hooks.Hooks``) and upload counters (an
``UploadObserver``, e.g. the server's ``Metrics``). Kept here so the handler calls one
method per event and knows neither hook delivery (nor its HTTP client) nor a metrics
library: the hooks' vocabulary (``RequestContext``, ``PreCreateResult``,
``HookError``, the event names) is defined here and ``tusd_py.hooks`` implements it.

When each event fires (all after the store call succeeded):

- ``pre_create``: before ``store.create``, outside the lock (the hook may change the
  upload id, and the lock is per id). A rejection or an unusable hook becomes a
  ``TusError``.
- ``created``: after ``store.create``.
- ``receiving``: around ``store.write``; a timer (no per-chunk work) offers a
  post-receive event with the bytes received so far every ``hooks.progress_interval``;
  ``received`` after ``store.write`` returned sends the final one with the stored offset.
- ``finished``: after ``store.finish``, under the lock, before the response: asks the
  pre-finish hook (blocking), then sends post-finish only when it accepted. A rejection
  or an unusable hook becomes a ``TusError``; the upload stays finished.
- ``pre_terminate``: under the lock, before ``terminate``. A rejection or an unusable
  hook becomes a ``TusError`` and nothing is deleted.
- ``terminated``: after ``terminate``.
- ``pre_access``: before a request touches an existing upload (HEAD, PATCH, GET,
  DELETE, the partials of a concatenation; ``tus.core.UploadCore.authorize``), outside
  the lock, so that a refused client cannot even make a running PATCH let go. A
  rejection becomes a ``TusError`` with the hook's status and message; an unusable hook
  503 (fail closed). ``access_cached`` lets a cached allow skip the store read.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Final, Protocol

from tusd_py.http.types import Request
from tusd_py.stores.base import UploadInfo
from tusd_py.tus.body import GuardedBody
from tusd_py.tus.errors import (
    ERR_ACCESS_DENIED,
    ERR_ACCESS_HOOK_UNAVAILABLE,
    ERR_FINISH_HOOK_FAILED,
    ERR_FINISH_REJECTED,
    ERR_HOOK_FAILED,
    ERR_HOOK_REJECTED,
    ERR_HOOK_UNAVAILABLE,
    ERR_TERMINATION_HOOK_FAILED,
    ERR_TERMINATION_HOOK_UNAVAILABLE,
    ERR_TERMINATION_REJECTED,
    ErrorKind,
    TusError,
)
from tusd_py.tus.urls import client_view

PRE_CREATE: Final = "pre-create"
POST_CREATE: Final = "post-create"
POST_RECEIVE: Final = "post-receive"
PRE_FINISH: Final = "pre-finish"
POST_FINISH: Final = "post-finish"
PRE_TERMINATE: Final = "pre-terminate"
POST_TERMINATE: Final = "post-terminate"
PRE_ACCESS: Final = "pre-access"

READ: Final = "read"
"""pre-access mode of HEAD, GET and a concatenation's partials."""
WRITE: Final = "write"
"""pre-access mode of PATCH and DELETE."""

# The progress timer never ticks faster than this, even with progress_interval = 0
# ("as often as possible"): a zero-delay timer would spin the event loop.
_MIN_PROGRESS_TICK_SECONDS = 0.05


class HookError(Exception):
    """A blocking hook (pre-create, pre-finish, pre-terminate, pre-access) could not be
    consulted or gave an invalid answer.

    The handler answers ``status`` with a generic message (the details are logged, not
    sent to the client): 503 when the receiver was unreachable, timed out or failed
    after the retries (clients retry later), 500 when its answer was invalid.
    """

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What a hook receiver is told about the HTTP request behind an event."""

    method: str
    uri: str
    """The request target (path and query) as sent."""
    remote_addr: str
    """The client's address; behind a trusted proxy, the last X-Forwarded-For entry."""
    headers: tuple[tuple[str, str], ...] = ()
    """Lower-case names, in arrival order; all of them, credentials included (the
    webhook drops ``hooks.strip_headers`` when it sends them)."""
    request_id: str = ""

    @classmethod
    def from_request(cls, request: Request, *, behind_proxy: bool = False) -> RequestContext:
        """Build the context of an HTTP request. ``behind_proxy``: trust the
        X-Forwarded-For header the proxy appended (``server.behind_proxy``; see
        ``urls.client_view``)."""
        remote_addr = client_view(request.headers, request.client, behind_proxy).remote_addr
        return cls(request.method, request.target, remote_addr, tuple(request.headers), request.request_id)

    def to_json(self, strip_headers: frozenset[str] = frozenset()) -> dict[str, Any]:
        """The JSON form: headers as ``{name: [values]}`` (like Go's http.Header),
        without those named (lower-case) in ``strip_headers``."""
        headers: dict[str, list[str]] = {}
        for name, value in self.headers:
            if name.lower() not in strip_headers:
                headers.setdefault(name.lower(), []).append(value)
        return {
            "method": self.method,
            "uri": self.uri,
            "remote_addr": self.remote_addr,
            "request_id": self.request_id,
            "headers": headers,
        }


@dataclass(frozen=True, slots=True)
class Rejection:
    """A blocking hook refused: answer ``status`` (4xx) with ``message``. A pre-finish
    or pre-terminate callable returns one to refuse (``None`` accepts)."""

    status: int
    message: str


@dataclass(frozen=True, slots=True)
class PreCreateResult:
    """Outcome of ``UploadHooks.pre_create``: the upload to create (possibly with
    another id or metadata), or a rejection to answer instead."""

    info: UploadInfo
    rejection: Rejection | None = None


class UploadHooks(Protocol):
    """What the tus handler needs from hooks (``tusd_py.hooks.Hooks`` is one). The
    protocol layer depends on this, not on hook delivery (HTTP client, queues)."""

    @property
    def progress_interval(self) -> float:
        """Minimum seconds between two post-receive events of one upload."""
        ...

    def wants(self, event: str) -> bool:
        """True when something receives ``event`` (lets callers skip building it)."""
        ...

    async def pre_create(self, info: UploadInfo, request: RequestContext | None = None) -> PreCreateResult:
        """Whether to create ``info`` and how (id, metadata); raises ``HookError`` when
        that cannot be decided (the upload is then not created)."""
        ...

    def post_create(self, info: UploadInfo, request: RequestContext | None = None) -> None:
        """The upload was created. Never blocks, never raises."""
        ...

    async def pre_finish(self, info: UploadInfo, request: RequestContext | None = None) -> Rejection | None:
        """Whether the finished upload ``info`` is accepted (``None``); raises
        ``HookError`` when that cannot be decided."""
        ...

    async def pre_terminate(self, info: UploadInfo, request: RequestContext | None = None) -> Rejection | None:
        """Whether ``info`` may be deleted (``None``); raises ``HookError`` when that
        cannot be decided (the upload is then not deleted)."""
        ...

    def access_allowed(self, upload_id: str, mode: str, request: RequestContext) -> bool:
        """True when a pre-access "allow" for this upload, mode and credentials is
        still cached: the request may proceed without asking (or reading the upload)."""
        ...

    async def pre_access(self, info: UploadInfo, mode: str, request: RequestContext) -> Rejection | None:
        """Whether ``request`` may touch ``info`` in ``mode`` (``READ``/``WRITE``):
        ``None`` allows (and is cached); raises ``HookError`` when that cannot be
        decided (the request is then refused)."""
        ...

    def forget_access(self, upload_id: str) -> None:
        """Drop the cached pre-access answers of ``upload_id`` (deleted or complete)."""
        ...

    def post_receive(self, info: UploadInfo, *, final: bool = False, request: RequestContext | None = None) -> None:
        """Bytes received so far (``info.offset``), throttled; ``final=True`` when the
        PATCH ended, with the stored offset. Never blocks, never raises."""
        ...

    def post_finish(self, info: UploadInfo, request: RequestContext | None = None) -> None:
        """The upload is complete. Never blocks, never raises."""
        ...

    def post_terminate(self, info: UploadInfo, request: RequestContext | None = None) -> None:
        """The upload was deleted. Never blocks, never raises."""
        ...


class UploadObserver(Protocol):
    """Counts upload life-cycle events (``tusd_py.metrics.Metrics`` is one)."""

    def upload_created(self) -> None:
        """An upload was created."""
        ...

    def upload_finished(self) -> None:
        """An upload was completed by the store."""
        ...

    def upload_terminated(self) -> None:
        """An upload was deleted by its client."""
        ...


_NO_PROGRESS: Final = contextlib.nullcontext()
"""``UploadEvents.receiving`` without a post-receive hook (stateless, so shared)."""


class UploadEvents:
    """Hook events and upload counters of one handler; both parts are optional."""

    def __init__(self, hooks: UploadHooks | None, observer: UploadObserver | None, *, behind_proxy: bool) -> None:
        self._hooks = hooks
        self._observer = observer
        self._behind_proxy = behind_proxy

    def _context(self, request: Request | None) -> RequestContext | None:
        if request is None:
            return None
        return RequestContext.from_request(request, behind_proxy=self._behind_proxy)

    def _wants(self, event: str) -> bool:
        return self._hooks is not None and self._hooks.wants(event)

    async def pre_create(self, info: UploadInfo, request: Request) -> UploadInfo:
        """The upload to create, as the pre-create hooks shaped it (id, metadata).

        Raises ``TusError``: with the hook's status and message when it rejected the
        upload, 503 when the hook receiver is unreachable, 500 when it answered
        something invalid (the details are logged by the hooks, not sent).
        """
        if self._hooks is None:
            return info
        try:
            result = await self._hooks.pre_create(info, self._context(request))
        except HookError as error:
            raise TusError(ERR_HOOK_UNAVAILABLE if error.status == 503 else ERR_HOOK_FAILED) from error
        if result.rejection is not None:
            rejection = result.rejection
            raise TusError(ErrorKind(ERR_HOOK_REJECTED.code, rejection.status, rejection.message))
        return result.info

    def created(self, info: UploadInfo, request: Request) -> None:
        if self._observer is not None:
            self._observer.upload_created()
        if self._hooks is not None and self._wants(POST_CREATE):
            self._hooks.post_create(info, self._context(request))

    def receiving(self, info: UploadInfo, body: GuardedBody, request: Request) -> AbstractContextManager[None]:
        """Offer post-receive progress while the block (``store.write``) runs.

        ``info.offset`` must be the offset the write starts at. Progress is read from
        ``body.yielded`` by a timer, so the hot path pays nothing per chunk; without a
        post-receive hook nothing at all (a shared no-op context manager).
        """
        hooks = self._hooks
        if hooks is None or not hooks.wants(POST_RECEIVE):
            return _NO_PROGRESS
        return self._reporting(hooks, info, body, request)

    @contextlib.contextmanager
    def _reporting(self, hooks: UploadHooks, info: UploadInfo, body: GuardedBody, request: Request) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        context = self._context(request)
        start = info.offset
        timer: asyncio.TimerHandle | None = None

        def report() -> None:
            nonlocal timer
            # The first call opens the upload's throttle window; later ones send an
            # event when an interval has passed (Hooks.post_receive decides).
            hooks.post_receive(dataclasses.replace(info, offset=start + body.yielded), request=context)
            timer = loop.call_later(max(hooks.progress_interval, _MIN_PROGRESS_TICK_SECONDS), report)

        report()
        try:
            yield
        finally:
            if timer is not None:
                timer.cancel()

    def received(self, info: UploadInfo, request: Request) -> None:
        """A PATCH (or a POST with data) ended; ``info.offset`` is the stored offset."""
        if self._hooks is not None and self._wants(POST_RECEIVE):
            self._hooks.post_receive(info, final=True, request=self._context(request))

    async def finished(self, info: UploadInfo, request: Request | None) -> None:
        """The store finished the upload: ask the pre-finish hook, then send post-finish.

        Raises ``TusError`` (with ``Upload-Offset``: everything is stored) with the
        hook's status and message when it rejected the upload, 500 when it could not
        be asked or answered something invalid; post-finish is then not sent (as in
        tusd). The upload stays finished either way: the hook is asked once.
        """
        if self._observer is not None:
            self._observer.upload_finished()
        if self._hooks is None:
            return
        # A complete upload is used differently (read, not written): ask again.
        self._hooks.forget_access(info.id)
        context = self._context(request)
        if self._wants(PRE_FINISH):
            stored = [("Upload-Offset", str(info.offset))]
            try:
                rejection = await self._hooks.pre_finish(info, context)
            except HookError as error:
                raise TusError(ERR_FINISH_HOOK_FAILED, headers=stored) from error
            if rejection is not None:
                kind = ErrorKind(ERR_FINISH_REJECTED.code, rejection.status, rejection.message)
                raise TusError(kind, headers=stored)
        if self._wants(POST_FINISH):
            self._hooks.post_finish(info, context)

    async def pre_terminate(self, info: UploadInfo, request: Request) -> None:
        """Ask the pre-terminate hook whether ``info`` may be deleted.

        Raises ``TusError``: with the hook's status and message when it refused, 503
        when the receiver is unreachable (fail closed), 500 when it answered something
        invalid. The caller then deletes nothing.
        """
        if self._hooks is None or not self._wants(PRE_TERMINATE):
            return
        try:
            rejection = await self._hooks.pre_terminate(info, self._context(request))
        except HookError as error:
            kind = ERR_TERMINATION_HOOK_UNAVAILABLE if error.status == 503 else ERR_TERMINATION_HOOK_FAILED
            raise TusError(kind) from error
        if rejection is not None:
            raise TusError(ErrorKind(ERR_TERMINATION_REJECTED.code, rejection.status, rejection.message))

    def terminated(self, info: UploadInfo, request: Request) -> None:
        if self._observer is not None:
            self._observer.upload_terminated()
        if self._hooks is not None:
            self._hooks.forget_access(info.id)
            if self._wants(POST_TERMINATE):
                self._hooks.post_terminate(info, self._context(request))

    @property
    def guards_access(self) -> bool:
        """True when a pre-access hook decides who may touch existing uploads."""
        return self._wants(PRE_ACCESS)

    def access_cached(self, upload_id: str, mode: str, request: Request) -> bool:
        """True when a cached pre-access "allow" covers this request (see
        ``UploadHooks.access_allowed``)."""
        assert self._hooks is not None
        return self._hooks.access_allowed(upload_id, mode, RequestContext.from_request(request, behind_proxy=False))

    async def pre_access(self, info: UploadInfo, mode: str, request: Request) -> None:
        """Ask the pre-access hook whether ``request`` may touch ``info`` in ``mode``.

        Raises ``TusError``: with the hook's status and message when it refused, 503
        when it could not be asked or answered something invalid (fail closed; the
        hooks log why).
        """
        assert self._hooks is not None
        context = self._context(request)
        assert context is not None
        try:
            rejection = await self._hooks.pre_access(info, mode, context)
        except HookError as error:
            raise TusError(ERR_ACCESS_HOOK_UNAVAILABLE) from error
        if rejection is not None:
            raise TusError(ErrorKind(ERR_ACCESS_DENIED.code, rejection.status, rejection.message))
