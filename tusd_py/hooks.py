"""Hooks: tell other systems about uploads, and let one of them veto or shape creation.

Events, in the life of an upload:

- ``pre-create``: before the store creates an upload. The answer may reject it (the
  client gets the given 4xx status and message), choose its id, or change its metadata.
  The request waits for it (bounded by ``hooks.timeout`` and ``hooks.retries``).
- ``post-create``: the upload exists.
- ``post-receive``: progress while a PATCH streams, at most one per
  ``hooks.progress_interval`` per upload, plus always one when the PATCH ends.
- ``pre-finish``: the store finished the upload; the request that completed it waits.
  A rejection answers it with the given 4xx status and message, a failure with 500; the
  upload stays complete (it is not asked again) and post-finish is not sent (tusd's way).
- ``post-finish``: the upload is complete (and pre-finish, when enabled, accepted it).
- ``pre-terminate``: before a DELETE (or IETF cancellation) takes effect. A rejection
  answers with the given 4xx status and message, an unreachable receiver with 503;
  nothing is deleted then.
- ``post-terminate``: a client deleted the upload.
- ``pre-access``: before a request touches an existing upload (HEAD, PATCH, GET,
  DELETE, each partial of a concatenation), with the access mode (``read``/``write``).
  A rejection answers with the given 4xx status and message, any failure with 503
  (fail closed). Allows are cached per upload, mode and credentials for
  ``hooks.access_cache_ttl`` seconds (``tusd_py.access``).

``post-*`` events never make a request wait: they go into a bounded queue that a few
background tasks deliver. When the queue is full an event is dropped and logged (a
hook receiver that is down must not take memory or the upload service with it).
Failed deliveries are retried, then logged; they never raise into the handler.

Two kinds of receivers, both optional:

- An HTTP webhook (``hooks.url``): each enabled event (``hooks.events``) is POSTed as
  JSON (see ``HookEvent.to_json``), with the request's headers, credentials included
  (the receiver is the operator's own backend and may authenticate the client with
  them), except those named in ``hooks.strip_headers``. Deliveries are at least once: a retry after a
  timeout may repeat an event the receiver already handled, so every event carries an
  ``event_id`` that stays the same across retries. With ``hooks.secret`` set, the body is
  signed: ``Tusd-Py-Signature: sha256=<hex HMAC-SHA256 of the body>``.
- Python callables registered by embedders with ``hooks.on(event, fn)``; they are called
  for their event whatever ``hooks.events`` says (registering one is the opt-in).

A pre-create answer (webhook JSON, or a ``PreCreateAnswer`` from a callable)::

    {}                                             accept unchanged
    {"reject": true, "status": 403, "message": "quota exceeded"}
    {"id": "invoice-42"}                           use this upload id
    {"metadata": {"owner": "alice", "tmp": null}}  set keys (text values), remove "tmp"
    {"storage": {"Key": "invoices/42.pdf"}}        S3 store: the final object's key
    {"owner": "user-17"}                           kept with the upload, in later events

A pre-finish, pre-terminate or pre-access answer: ``{}`` (or an empty body) accepts, ``{"reject":
true, "status": 409, "message": "..."}`` refuses; a callable returns ``None`` or a
``Rejection(status, message)``.

Callables run first, in registration order, then the webhook; each sees the upload as
changed by the ones before it; the first rejection wins. The blocking events
(``pre-*``) fail closed: an unreachable webhook or a raising callable is an error.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from tusd_py.access import AccessCache
from tusd_py.config import HOOK_EVENT_NAMES, HooksConfig
from tusd_py.stores.base import UploadInfo, is_valid_upload_id

# The vocabulary the tus handler speaks with hooks lives with it (tusd_py.tus.events,
# which must not import this module's HTTP client); re-exported here for embedders.
from tusd_py.tus.events import POST_CREATE as POST_CREATE
from tusd_py.tus.events import POST_FINISH as POST_FINISH
from tusd_py.tus.events import POST_RECEIVE as POST_RECEIVE
from tusd_py.tus.events import POST_TERMINATE as POST_TERMINATE
from tusd_py.tus.events import PRE_ACCESS as PRE_ACCESS
from tusd_py.tus.events import PRE_CREATE as PRE_CREATE
from tusd_py.tus.events import PRE_FINISH as PRE_FINISH
from tusd_py.tus.events import PRE_TERMINATE as PRE_TERMINATE
from tusd_py.tus.events import READ as READ
from tusd_py.tus.events import WRITE as WRITE
from tusd_py.tus.events import HookError as HookError
from tusd_py.tus.events import PreCreateResult as PreCreateResult
from tusd_py.tus.events import Rejection as Rejection
from tusd_py.tus.events import RequestContext as RequestContext
from tusd_py.webhook import WebhookSender

if TYPE_CHECKING:  # only the type: the tus handler imports hooks, not prometheus
    from tusd_py.metrics import Metrics

log = logging.getLogger("tusd_py.hooks")

HOOK_EVENTS: Final = HOOK_EVENT_NAMES
assert HOOK_EVENTS == (
    PRE_CREATE, POST_CREATE, POST_RECEIVE, PRE_FINISH, POST_FINISH, PRE_TERMINATE, POST_TERMINATE, PRE_ACCESS
)

# The rejection message goes into the response body; keep it short.
MAX_REJECT_MESSAGE_CHARS: Final = 1024
DEFAULT_REJECT_STATUS: Final = 403
DEFAULT_REJECT_MESSAGE: Final = "upload rejected by the server's pre-create hook"
MAX_OWNER_CHARS: Final = 1024
"""Longest ``owner`` a pre-create hook may set (it is stored with every upload)."""
# post-receive throttling remembers one timestamp per upload with a PATCH in progress;
# this bounds that table if a caller ever forgets the final event.
MAX_TRACKED_PROGRESS: Final = 100_000

# tus metadata keys: non-empty ASCII without spaces and commas.
_METADATA_KEY = re.compile(r"[\x21-\x2b\x2d-\x7e]+")


def upload_to_json(info: UploadInfo) -> dict[str, Any]:
    """The upload as hook receivers see it: metadata decoded to text."""
    return {
        "id": info.id,
        "size": info.length,
        "size_is_deferred": info.length is None,
        "offset": info.offset,
        "metadata": {key: info.metadata_text(key) for key in info.metadata},
        "is_partial": info.is_partial,
        "is_final": info.is_final,
        "partial_uploads": None if info.partial_ids is None else list(info.partial_ids),
        "finished": info.finished,
        "created_at": info.created_at,
        "expires_at": info.expires_at,
        "storage": dict(info.storage),
        "owner": info.owner,
    }


@dataclass(frozen=True, slots=True)
class HookEvent:
    """One event, as passed to Python callables and (as JSON) to the webhook."""

    type: str
    upload: UploadInfo
    """A snapshot of the upload when the event happened."""
    request: RequestContext | None = None
    event_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    time: float = dataclasses.field(default_factory=time.time)
    mode: str | None = None
    """pre-access only: ``"read"`` (HEAD, GET, a concatenation's partial) or
    ``"write"`` (PATCH, DELETE)."""

    def to_json(self, strip_headers: frozenset[str] = frozenset()) -> dict[str, Any]:
        """The JSON form; the request's headers without ``strip_headers`` (lower-case)."""
        document = {
            "type": self.type,
            "event_id": self.event_id,
            "time": self.time,
            "upload": upload_to_json(self.upload),
            "request": None if self.request is None else self.request.to_json(strip_headers),
        }
        if self.mode is not None:
            document["mode"] = self.mode
        return document

    def body(self, strip_headers: frozenset[str] = frozenset()) -> bytes:
        """The webhook body. ``default=str`` keeps odd store fields from failing it."""
        return json.dumps(self.to_json(strip_headers), default=str, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class PreCreateAnswer:
    """What a pre-create hook may answer; the default accepts the upload unchanged."""

    reject: bool = False
    status: int = DEFAULT_REJECT_STATUS
    """Status of the rejection, 400-499 (anything else becomes 403)."""
    message: str = DEFAULT_REJECT_MESSAGE
    upload_id: str | None = None
    """Use this id for the upload (letters, digits, '-', '_'; at most 128)."""
    metadata: Mapping[str, str | None] | None = None
    """Metadata keys to set (text values) or, with None, to remove."""
    storage_key: str | None = None
    """The final object's key under the store's prefix (S3 store; tusd's
    ``storage.Key``), checked by the store like a templated key."""
    owner: str | None = None
    """Opaque text (e.g. the uploader's user id) stored with the upload and passed to
    every later hook (``upload.owner``), so pre-access can check "same user"."""

    @classmethod
    def from_json(cls, document: object) -> PreCreateAnswer:
        """Parse a webhook's JSON answer; raises ``HookError`` when it is malformed."""
        if not isinstance(document, dict):
            raise HookError("pre-create answer is not a JSON object")
        upload_id = document.get("id")
        if upload_id is not None and not isinstance(upload_id, str):
            raise HookError("pre-create answer: \"id\" must be a string")
        metadata = document.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise HookError("pre-create answer: \"metadata\" must be an object")
        storage = document.get("storage") or {}
        storage_key = storage.get("Key") if isinstance(storage, dict) else None
        if not isinstance(storage, dict) or (storage_key is not None and not isinstance(storage_key, str)):
            raise HookError("pre-create answer: \"storage\" must be an object with a string \"Key\"")
        owner = document.get("owner")
        if owner is not None and not isinstance(owner, str):
            raise HookError("pre-create answer: \"owner\" must be a string")
        status = document.get("status", DEFAULT_REJECT_STATUS)
        message = document.get("message", DEFAULT_REJECT_MESSAGE)
        return cls(
            reject=document.get("reject") is True,
            status=status if isinstance(status, int) and not isinstance(status, bool) else -1,
            message=message if isinstance(message, str) else DEFAULT_REJECT_MESSAGE,
            upload_id=upload_id,
            metadata=metadata,
            storage_key=storage_key,
            owner=owner,
        )


def _apply_answer(info: UploadInfo, answer: PreCreateAnswer, source: str) -> PreCreateResult:
    """Validate ``answer`` and apply it to a copy of ``info``."""
    if answer.reject:
        status = answer.status
        if not 400 <= status <= 499:
            # The intent (reject) is clear; only the status is unusable. A 2xx/5xx here
            # would tell tus clients the upload exists or to retry forever.
            log.warning("pre-create hook rejected with status %r; answering 403 instead", status,
                        extra={"hook": source})
            status = DEFAULT_REJECT_STATUS
        message = (answer.message or DEFAULT_REJECT_MESSAGE)[:MAX_REJECT_MESSAGE_CHARS]
        return PreCreateResult(info, Rejection(status, message))
    changes: dict[str, Any] = {}
    if answer.upload_id is not None:
        if not is_valid_upload_id(answer.upload_id):
            raise HookError(f"{source} answered an invalid upload id {answer.upload_id[:200]!r}")
        changes["id"] = answer.upload_id
    if answer.metadata is not None:
        metadata = dict(info.metadata)
        for key, text in answer.metadata.items():
            if not isinstance(key, str) or _METADATA_KEY.fullmatch(key) is None:
                raise HookError(f"{source} answered an invalid metadata key {key!r}")
            if text is None:
                metadata.pop(key, None)
            elif isinstance(text, str):
                metadata[key] = base64.b64encode(text.encode()).decode("ascii")
            else:
                raise HookError(f"{source} answered a non-text value for metadata key {key!r}")
        changes["metadata"] = metadata
    if answer.storage_key is not None:
        changes["storage"] = {**info.storage, "Key": answer.storage_key}
    if answer.owner is not None:
        if len(answer.owner) > MAX_OWNER_CHARS:
            raise HookError(f"{source} answered an owner longer than {MAX_OWNER_CHARS} characters")
        changes["owner"] = answer.owner
    return PreCreateResult(dataclasses.replace(info, **changes) if changes else info)


HookCallable = Callable[[HookEvent], Awaitable[PreCreateAnswer | Rejection | None]]
"""An embedder's hook: ``async def fn(event) -> PreCreateAnswer | Rejection | None``.
The return value matters only for pre-create (a ``PreCreateAnswer``) and for pre-finish,
pre-terminate and pre-access (a ``Rejection`` refuses)."""


def _rejection_from_json(document: object, event_type: str) -> Rejection | None:
    """Parse a pre-finish/pre-terminate webhook answer; ``HookError`` when malformed."""
    if not isinstance(document, dict):
        raise HookError(f"{event_type} answer is not a JSON object")
    if document.get("reject") is not True:
        return None
    status, message = document.get("status", DEFAULT_REJECT_STATUS), document.get("message")
    status = status if isinstance(status, int) and not isinstance(status, bool) else -1
    return _checked_rejection(Rejection(status, message if isinstance(message, str) else ""), event_type, "webhook")


def _checked_rejection(rejection: Rejection, event_type: str, source: str) -> Rejection:
    """``rejection`` with a 4xx status (else 403) and a short, non-empty message."""
    status = rejection.status
    if not 400 <= status <= 499:
        # As for pre-create: the intent (reject) is clear; a 2xx/5xx would tell tus
        # clients the request succeeded or to retry forever.
        log.warning("%s hook rejected with status %r; answering 403 instead", event_type, status,
                    extra={"hook": source})
        status = DEFAULT_REJECT_STATUS
    message = rejection.message or f"rejected by the server's {event_type} hook"
    return Rejection(status, message[:MAX_REJECT_MESSAGE_CHARS])


class Hooks:
    """The hook events of one server: a webhook sender and registered callables.

    Create one per server with the ``[hooks]`` config; the tus handler calls
    ``pre_create``, ``pre_finish``, ``pre_terminate`` and ``pre_access`` (awaited) and the ``post_*``
    methods (plain calls that never block); ``close`` at shutdown delivers what is pending, within a time limit.
    """

    def __init__(
        self,
        config: HooksConfig,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock`` (monotonic seconds) is injectable so progress throttling can be
        tested without sleeping."""
        self._config = config
        self._metrics = metrics
        self._clock = clock
        self._sender: WebhookSender | None = None
        if config.url:
            self._sender = WebhookSender(
                config.url,
                timeout=config.timeout,
                retries=config.retries,
                retry_backoff=config.retry_backoff,
                secret=config.secret,
            )
        self._webhook_events = frozenset(config.events) if self._sender is not None else frozenset()
        self._strip_headers = frozenset(name.lower() for name in config.strip_headers)
        self._access = AccessCache(config.access_cache_ttl, config.credential_headers, clock=clock)
        self._callables: dict[str, list[HookCallable]] = {event: [] for event in HOOK_EVENTS}
        self._queue: asyncio.Queue[HookEvent] = asyncio.Queue(maxsize=config.max_pending)
        self._workers: list[asyncio.Task[None]] = []
        self._closed = False
        # upload id -> clock() of the last post-receive sent (or of the PATCH's start).
        self._progress_sent: dict[str, float] = {}

    def on(self, event: str, fn: HookCallable) -> None:
        """Call ``fn`` for every ``event`` (one of ``HOOK_EVENTS``)."""
        if event not in self._callables:
            raise ValueError(f"unknown hook event {event!r}; expected one of {', '.join(HOOK_EVENTS)}")
        self._callables[event].append(fn)

    @property
    def progress_interval(self) -> float:
        """Minimum seconds between two post-receive events of one upload."""
        return self._config.progress_interval

    def wants(self, event: str) -> bool:
        """True when something receives ``event`` (lets callers skip building it)."""
        return event in self._webhook_events or bool(self._callables.get(event))

    # --- pre-create: the request waits for the answer --------------------------------

    async def pre_create(self, info: UploadInfo, request: RequestContext | None = None) -> PreCreateResult:
        """Ask the callables, then the webhook, whether to create ``info`` and how.

        Returns the (possibly changed) upload or a rejection. Raises ``HookError`` when
        the webhook is unreachable or an answer is invalid: the upload must then not be
        created (fail closed: a pre-create hook is often an authorization check).
        """
        result = PreCreateResult(info)
        for fn in self._callables[PRE_CREATE]:
            try:
                answer = await fn(HookEvent(PRE_CREATE, result.info, request))
            except HookError:
                raise
            except Exception as error:
                log.exception("pre-create hook %r raised", fn)
                raise HookError(f"pre-create hook {fn!r} raised {type(error).__name__}") from error
            if isinstance(answer, Rejection):
                return PreCreateResult(result.info, _checked_rejection(answer, PRE_CREATE, repr(fn)))
            if answer is not None:
                result = _apply_answer(result.info, answer, f"pre-create hook {fn!r}")
                if result.rejection is not None:
                    return result
        if self._sender is not None and PRE_CREATE in self._webhook_events:
            event = HookEvent(PRE_CREATE, result.info, request)
            try:
                raw = await self._sender.send(PRE_CREATE, event.body(self._strip_headers))
                try:
                    document = json.loads(raw) if raw.strip() else {}
                except ValueError as error:
                    raise HookError("pre-create hook answered invalid JSON") from error
                result = _apply_answer(result.info, PreCreateAnswer.from_json(document), "pre-create webhook")
            except HookError as error:
                log.warning("pre-create hook failed: %s", error, extra={"upload_id": info.id})
                self._count(PRE_CREATE, "failed")
                raise
            self._count(PRE_CREATE, "ok")
        return result

    # --- pre-finish, pre-terminate: the request waits for a yes or no ------------------

    async def pre_finish(self, info: UploadInfo, request: RequestContext | None = None) -> Rejection | None:
        """Ask whether the finished upload ``info`` is accepted: ``None`` when every
        receiver accepted, else the first rejection. Raises ``HookError`` when the
        webhook is unreachable, a callable raised or an answer is invalid."""
        return await self._decide(PRE_FINISH, info, request)

    async def pre_terminate(self, info: UploadInfo, request: RequestContext | None = None) -> Rejection | None:
        """Ask whether ``info`` may be deleted, as ``pre_finish`` asks; the caller
        deletes nothing unless this returns ``None``."""
        return await self._decide(PRE_TERMINATE, info, request)

    # --- pre-access: who may touch an existing upload --------------------------------

    def access_allowed(self, upload_id: str, mode: str, request: RequestContext) -> bool:
        """True when pre-access allowed this upload, mode and credentials less than
        ``hooks.access_cache_ttl`` seconds ago (``tusd_py.access``)."""
        return self._access.allowed(upload_id, mode, self._access.credentials_digest(request.headers))

    async def pre_access(self, info: UploadInfo, mode: str, request: RequestContext) -> Rejection | None:
        """Ask whether ``request`` may touch ``info`` in ``mode`` (``READ`` or
        ``WRITE``), as ``pre_finish`` asks; an allow is cached, a rejection is not.
        Raises ``HookError`` when the webhook is unreachable, a callable raised or an
        answer is invalid (the caller refuses the request)."""
        rejection = await self._decide(PRE_ACCESS, info, request, mode)
        if rejection is None:
            self._access.remember(info.id, mode, self._access.credentials_digest(request.headers))
        return rejection

    def forget_access(self, upload_id: str) -> None:
        """Drop the cached pre-access allows of ``upload_id`` (deleted or complete)."""
        self._access.forget(upload_id)

    async def _decide(
        self, event_type: str, info: UploadInfo, request: RequestContext | None, mode: str | None = None
    ) -> Rejection | None:
        """Callables in registration order, then the webhook; the first rejection wins.
        Same timeout, retries and signature as every webhook delivery."""
        event = HookEvent(event_type, info, request, mode=mode)
        for fn in self._callables[event_type]:
            try:
                answer = await fn(event)
            except HookError:
                raise
            except Exception as error:
                log.exception("%s hook %r raised", event_type, fn, extra={"upload_id": info.id})
                raise HookError(f"{event_type} hook {fn!r} raised {type(error).__name__}") from error
            if isinstance(answer, PreCreateAnswer) and answer.reject:
                answer = Rejection(answer.status, answer.message)
            if isinstance(answer, Rejection):
                return _checked_rejection(answer, event_type, repr(fn))
        if self._sender is None or event_type not in self._webhook_events:
            return None
        try:
            raw = await self._sender.send(event_type, event.body(self._strip_headers))
            try:
                document = json.loads(raw) if raw.strip() else {}
            except ValueError as error:
                raise HookError(f"{event_type} hook answered invalid JSON") from error
            rejection = _rejection_from_json(document, event_type)
        except HookError as error:
            log.warning("%s hook failed: %s", event_type, error, extra={"upload_id": info.id})
            self._count(event_type, "failed")
            raise
        self._count(event_type, "ok")
        return rejection

    # --- post-*: fire and forget --------------------------------------------------------

    def post_create(self, info: UploadInfo, request: RequestContext | None = None) -> None:
        """The upload was created (after the store's ``create``)."""
        self._emit(POST_CREATE, info, request)

    def post_receive(self, info: UploadInfo, *, final: bool = False, request: RequestContext | None = None) -> None:
        """Progress of a PATCH: ``info.offset`` is the bytes received so far.

        Call it as often as you like while the body streams (it is a clock read and a
        dict lookup when throttled); an event goes out at most once per
        ``progress_interval`` per upload, the first one an interval after the PATCH
        began. Call it with ``final=True`` when the PATCH ends (in a ``finally``), with
        the stored offset: that event is always sent and resets the throttle.
        """
        if not self.wants(POST_RECEIVE):
            return
        if final:
            self._progress_sent.pop(info.id, None)
        else:
            now = self._clock()
            last = self._progress_sent.get(info.id)
            if last is None:
                # The PATCH just began: start its throttle window without an event, so
                # a short PATCH sends only its final event.
                if len(self._progress_sent) >= MAX_TRACKED_PROGRESS:
                    del self._progress_sent[next(iter(self._progress_sent))]
                self._progress_sent[info.id] = now
                return
            if now - last < self._config.progress_interval:
                return
            self._progress_sent[info.id] = now
        self._emit(POST_RECEIVE, info, request)

    def post_finish(self, info: UploadInfo, request: RequestContext | None = None) -> None:
        """The upload is complete (after the store's ``finish``)."""
        self._progress_sent.pop(info.id, None)
        self._emit(POST_FINISH, info, request)

    def post_terminate(self, info: UploadInfo, request: RequestContext | None = None) -> None:
        """The upload was deleted (after the store's ``terminate``)."""
        self._progress_sent.pop(info.id, None)
        self._emit(POST_TERMINATE, info, request)

    def _emit(self, event_type: str, info: UploadInfo, request: RequestContext | None) -> None:
        if not self.wants(event_type):
            return
        if self._closed:
            log.warning("%s hook dropped: hooks are closed", event_type, extra={"upload_id": info.id})
            self._count(event_type, "dropped")
            return
        try:
            self._queue.put_nowait(HookEvent(event_type, info, request))
        except asyncio.QueueFull:
            log.warning("%s hook dropped: %d deliveries already pending", event_type, self._queue.qsize(),
                        extra={"upload_id": info.id})
            self._count(event_type, "dropped")
            return
        if not self._workers:
            self._workers = [
                asyncio.get_running_loop().create_task(self._deliver_forever(), name=f"tusd-py hooks {number}")
                for number in range(self._config.max_concurrent_deliveries)
            ]

    async def _deliver_forever(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                await self._deliver(event)
            finally:
                self._queue.task_done()

    async def _deliver(self, event: HookEvent) -> None:
        """Give ``event`` to every receiver; log failures, never raise them."""
        upload_id = event.upload.id
        for fn in self._callables[event.type]:
            try:
                await fn(event)
            except Exception:
                log.exception("%s hook %r raised", event.type, fn, extra={"upload_id": upload_id})
        if self._sender is not None and event.type in self._webhook_events:
            try:
                await self._sender.send(event.type, event.body(self._strip_headers))
            except HookError as error:
                log.warning("%s hook failed: %s", event.type, error, extra={"upload_id": upload_id})
                self._count(event.type, "failed")
            else:
                self._count(event.type, "ok")

    def _count(self, event_type: str, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.hook_delivery(event_type, outcome)

    async def close(self, drain_timeout: float = 5.0) -> None:
        """Stop taking events and deliver the pending ones for at most ``drain_timeout``
        seconds; what is still pending then is abandoned (and logged)."""
        self._closed = True
        if self._workers:
            try:
                async with asyncio.timeout(drain_timeout):
                    await self._queue.join()
            except TimeoutError:
                log.warning("hooks closed with deliveries pending after %.1fs (up to %d abandoned)", drain_timeout,
                            self._queue.qsize() + len(self._workers))
            for worker in self._workers:
                worker.cancel()
            await asyncio.gather(*self._workers, return_exceptions=True)
            self._workers = []
        if self._sender is not None:
            await self._sender.close()
