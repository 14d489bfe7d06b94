"""What the tus handler tells the outside world about uploads: hook events
(``tusd_py.hooks``) and upload counters (an ``UploadObserver``, e.g. the server's
``Metrics``). Kept here so the handler calls one method per event and knows neither
hook delivery nor a metrics library.

When each event fires (all after the store call succeeded):

- ``pre_create``: before ``store.create``, outside the lock (the hook may change the
  upload id, and the lock is per id). A rejection or an unusable hook becomes a
  ``TusError``.
- ``created``: after ``store.create``.
- ``receiving``: around ``store.write``; a timer (no per-chunk work) offers a
  post-receive event with the bytes received so far every ``hooks.progress_interval``;
  ``received`` after ``store.write`` returned sends the final one with the stored offset.
- ``finished``: after ``store.finish``.
- ``terminated``: after ``terminate``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Protocol

from tusd_py.hooks import POST_CREATE, POST_FINISH, POST_RECEIVE, POST_TERMINATE, HookError, Hooks, RequestContext
from tusd_py.http.types import Request
from tusd_py.stores.base import UploadInfo
from tusd_py.tus.body import GuardedBody
from tusd_py.tus.errors import ERR_HOOK_FAILED, ERR_HOOK_REJECTED, ERR_HOOK_UNAVAILABLE, ErrorKind, TusError

# The progress timer never ticks faster than this, even with progress_interval = 0
# ("as often as possible"): a zero-delay timer would spin the event loop.
_MIN_PROGRESS_TICK_SECONDS = 0.05


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


class UploadEvents:
    """Hook events and upload counters of one handler; both parts are optional."""

    def __init__(self, hooks: Hooks | None, observer: UploadObserver | None, *, behind_proxy: bool) -> None:
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

    @contextlib.contextmanager
    def receiving(self, info: UploadInfo, body: GuardedBody, request: Request) -> Iterator[None]:
        """Offer post-receive progress while the block (``store.write``) runs.

        ``info.offset`` must be the offset the write starts at. Progress is read from
        ``body.yielded`` by a timer, so the hot path pays nothing per chunk.
        """
        hooks = self._hooks
        if hooks is None or not hooks.wants(POST_RECEIVE):
            yield
            return
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

    def finished(self, info: UploadInfo, request: Request | None) -> None:
        if self._observer is not None:
            self._observer.upload_finished()
        if self._hooks is not None and self._wants(POST_FINISH):
            self._hooks.post_finish(info, self._context(request))

    def terminated(self, info: UploadInfo, request: Request) -> None:
        if self._observer is not None:
            self._observer.upload_terminated()
        if self._hooks is not None and self._wants(POST_TERMINATE):
            self._hooks.post_terminate(info, self._context(request))
