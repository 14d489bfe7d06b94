"""One request/response exchange on a connection, and what it asks of the connection.

The body reports to its own cycle (it is the body's ``BodyFlow``), and the cycle
passes that on with itself as the key: a body or a ``send_informational`` kept past
its cycle can then be told apart from the request now in flight, and cannot disturb
the next request on the connection.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Protocol

import h11

from tusd_py.http.access_log import log_exchange
from tusd_py.http.body import RequestBody
from tusd_py.http.response import ConnectionGone, ResponseWriter, text_response
from tusd_py.http.types import ClientDisconnected, Request, Response

if TYPE_CHECKING:
    from tusd_py.http.server import ServerContext

__all__ = ["CycleHost", "RequestCycle"]

log = logging.getLogger("tusd_py.http")


class CycleHost(Protocol):
    """What a request cycle needs from its connection."""

    def body_first_read(self, cycle: RequestCycle) -> None:
        """``cycle``'s application asked for the body for the first time."""
        ...

    def body_consumed(self, cycle: RequestCycle, buffered: int) -> None:
        """``cycle``'s application took a chunk; ``buffered`` unread bytes remain."""
        ...

    async def send_informational(self, cycle: RequestCycle, status: int, headers: list[tuple[str, str]]) -> None:
        """Send a 1xx response (``status`` checked) before ``cycle``'s final one."""
        ...

    def response_sent(self, cycle: RequestCycle) -> None:
        """``cycle``'s response is written: go on with the connection."""
        ...

    def abort(self) -> None:
        """Drop the connection (its framing is broken)."""
        ...


class RequestCycle:
    """One request/response exchange: what the connection knows about it (plain
    fields, set by the connection and its response writer)."""

    __slots__ = (
        "_host",
        "_conn",
        "_unparsed_head",
        "request",
        "body",
        "method",
        "target",
        "started",
        "expect_continue",
        "continue_sent",
        "framed_here",
        "response_started",
        "response_done",
        "keep_alive",
        "close_after",
        "draining",
        "drained",
        "bytes_in",
        "bytes_out",
        "status",
        "aborted",
    )

    def __init__(self, host: CycleHost, conn: h11.Connection, method: str, target: str, expect_continue: bool,
                 unparsed_head: bytes | None = None) -> None:
        """``conn``: the h11 connection that parsed the request and frames its
        response; or, with ``unparsed_head`` (a head parsed without h11), the idle h11
        connection that is handed that head if a response needs h11."""
        self._host = host
        self._conn = conn
        self._unparsed_head = unparsed_head
        self.method = method
        self.target = target
        self.started = time.perf_counter()
        self.expect_continue = expect_continue
        self.continue_sent = False
        self.framed_here = False
        """The body has a Content-Length and is framed by the connection, not h11."""
        self.response_started = False
        self.response_done = False
        self.keep_alive = False
        """The response written leaves the connection open for the next request."""
        self.close_after = False
        """The connection cannot be reused after this response."""
        self.draining = False
        """An early response went out: the rest of the body is read and dropped."""
        self.drained = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.status = 0
        """The status of the response written (0: none)."""
        self.aborted = False
        """The client hung up before the end of the request body."""
        self.request: Request
        self.body: RequestBody

    def h11_connection(self) -> h11.Connection:
        """The h11 connection that frames this exchange's responses; a head parsed
        without h11 is handed to it first (then h11 follows as if it had parsed it)."""
        head = self._unparsed_head
        if head is not None:
            self._unparsed_head = None
            self._conn.receive_data(head)
            event = self._conn.next_event()
            if type(event) is not h11.Request:
                raise RuntimeError(f"h11 did not parse a head parsed before: {event!r}")
        return self._conn

    @property
    def h11_untouched(self) -> bool:
        """Whether this exchange left its h11 connection as it found it (idle, empty)."""
        return self._unparsed_head is not None

    # -- BodyFlow ------------------------------------------------------------------

    def body_first_read(self) -> None:
        self._host.body_first_read(self)

    def body_consumed(self, buffered: int) -> None:
        self._host.body_consumed(self, buffered)

    def body_timed_out(self) -> None:
        self.close_after = True

    def client_hung_up(self, message: str) -> None:
        """The client closed the connection before the end of the body: the body
        fails with ``ClientDisconnected(message)``, the connection ends after the
        response, and the exchange counts as aborted."""
        self.close_after = True
        self.aborted = True
        self.body.fail(ClientDisconnected, message)

    @property
    def outcome(self) -> int:
        """The status the access log and the observer record: 0 for an aborted
        exchange (whatever the application answered, the client that hung up
        mid-body is not reading it) or when no response went out."""
        return 0 if self.aborted else self.status

    async def send_informational(self, status: int, headers: list[tuple[str, str]]) -> None:
        """``Request.send_informational`` of this cycle's request."""
        if not 100 <= status < 200 or status == 101:
            raise ValueError(f"not an informational status: {status}")
        if self.response_started:
            raise RuntimeError("the final response was already sent")
        await self._host.send_informational(self, status, headers)

    async def run(self, context: ServerContext, writer: ResponseWriter, client: str) -> None:
        """Call the application and write its response (a 500 when it fails), then
        tell the host; log the exchange (``client``: "host:port") either way."""
        try:
            try:
                response = await context.handler(self.request)
                if not isinstance(response, Response):
                    raise TypeError(f"the handler returned {type(response).__name__}, not Response")
            except Exception:
                log.exception(
                    "request handler failed",
                    extra={"request_id": self.request.request_id, "method": self.method},
                )
                if not self.body.complete:
                    self.close_after = True  # how much of the body is still coming is unknown
                response = text_response(500)
            if self._must_close_after(context):
                self.close_after = True
            await writer.send_response(self, response)
        except ConnectionGone:
            pass
        except Exception:
            # Failed while the response was being written (the application's body
            # iterator raised, or its Content-Length was wrong): the framing is
            # broken, so the only honest signal left is to drop the connection.
            log.exception("sending the response failed", extra={"request_id": self.request.request_id})
            self._host.abort()
        else:
            self._host.response_sent(self)
        finally:
            log_exchange(self, client)
            if context.observer is not None:
                context.observer.request_finished(self.method, self.outcome, time.perf_counter() - self.started)

    def _must_close_after(self, context: ServerContext) -> bool:
        """Whether the connection must close after this response (decided before
        the head goes out, so it can say ``Connection: close``)."""
        if self.close_after or context.stopping:
            return True
        body = self.body
        if body.complete:
            return False
        if self.expect_continue and not self.continue_sent:
            # The client may or may not send the body it announced: the connection
            # is in an unknown state (Go's net/http decides the same).
            return True
        return body.length is not None and body.length - self.bytes_in > context.limits.drain_limit
