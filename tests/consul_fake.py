"""An in-process fake of the Consul HTTP API, for testing the Consul locker.

No Consul server can be installed on the test machines, so this module serves the
part of Consul's HTTP API that ``tusd_py.lockers.consul`` relies on, over real HTTP
(h11 on asyncio streams, on a free loopback port), following the documented
semantics:

Sessions (https://developer.hashicorp.com/consul/api-docs/session and
https://developer.hashicorp.com/consul/docs/automate/session):

- ``PUT /v1/session/create`` with a JSON body (field names matched case-insensitively,
  as Go's JSON decoder does): ``Name``, ``TTL`` (Go duration; must be 10s..24h or the
  request fails with 400), ``LockDelay`` (Go duration string, or a number taken as
  seconds below 1000 and nanoseconds above, like Consul's ``FixupLockDelay``; default
  15s), ``Behavior`` (``release`` default, or ``delete``). Answers ``{"ID": ...}``.
- ``PUT /v1/session/renew/<id>``: ``[session]``, or 404 when unknown/invalidated.
- ``PUT /v1/session/destroy/<id>``: ``true`` (also for an unknown id: idempotent).
- ``GET /v1/session/info/<id>``: ``[session]`` or ``[]``; a blocking query on the
  sessions table.
- Invalidation (destroy, TTL expiry, ``expire_session``): each key the session holds
  is released (``Session`` cleared, ``ModifyIndex`` bumped, ``LockIndex`` kept) or, with
  ``Behavior=delete``, deleted; and the session's lock-delay starts for each of those
  keys, during which ``?acquire`` by any session fails. A plain ``?release`` starts no
  lock-delay.
- TTL expiry runs on a clock the test controls (``clock`` / ``advance``): a session
  whose TTL elapsed without a renew is invalidated. Consul may wait up to 2x TTL; the
  fake invalidates at exactly TTL, the earliest Consul is allowed to, which is the
  strictest case for a client. Lock-delay runs on the same clock.

KV store (https://developer.hashicorp.com/consul/api-docs/kv):

- ``GET /v1/kv/<key>``: ``[entry]`` with ``Key``, ``Value`` (base64, or null),
  ``Flags``, ``CreateIndex``, ``ModifyIndex``, ``LockIndex`` and ``Session`` (only when
  locked); 404 when missing. ``?recurse`` lists every key with the prefix (404 if none).
- ``X-Consul-Index`` like Consul's KV endpoint: a single existing key answers its
  ``ModifyIndex``; a missing key the KV table index; a recursive list the highest
  index of the entries and tombstones under the prefix (the table index when nothing
  is there).
- ``PUT /v1/kv/<key>`` with the body as value: ``?flags``, ``?cas=<index>`` (0: only if
  the key does not exist; otherwise only if ``ModifyIndex`` matches), ``?acquire=<session>``
  (fails if another session holds the key or the key is in lock-delay; an unknown
  session is a 500 "invalid session" error, like Consul; a new holder increments
  ``LockIndex``), ``?release=<session>`` (only by the holding session). Answers
  ``true``/``false``.
- ``DELETE /v1/kv/<key>``: ``?recurse`` and ``?cas`` (a missing key counts as deleted);
  deletes leave tombstones so a recursive blocking query sees them.

Blocking queries (https://developer.hashicorp.com/consul/api-docs/features/blocking):
``?index=N&wait=D`` on the GET endpoints above holds the request until the answer's
index is above N or ``wait`` (default 5m, at most 10m) passes; waiting uses real time.

ACLs (https://developer.hashicorp.com/consul/api-docs/api-structure#authentication):
when the fake has a token, a request must carry it in ``X-Consul-Token``,
``Authorization: Bearer`` or ``?token=``; otherwise 403 "Permission denied".

Test controls: ``expire_session``, ``advance``, ``wait_until``, ``stop()`` (closes the
listener and every open connection, so in-flight blocking queries fail like a dead
agent), ``restart()``
(same port; by default forgets every session and key like a restarted dev agent),
``requests`` (a log of what clients sent) and ``hang`` (accept connections but never
answer, like a stuck agent).

Not implemented: datacenters, namespaces, consistency modes, health-check bound
sessions, transactions, ``?keys``/``?separator``, hash-based blocking.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import h11

_GO_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DEFAULT_LOCK_DELAY = 15.0
_DEFAULT_WAIT = 300.0
_MAX_WAIT = 600.0


class _BadRequest(Exception):
    pass


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration string such as ``"15s"``, ``"1.5s"``, ``"250ms"``, ``"1m30s"``."""
    if text in {"0", ""}:
        return 0.0
    parts = re.findall(r"([0-9]*\.?[0-9]+)(ns|us|µs|ms|s|m|h)", text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise _BadRequest(f"invalid duration {text!r}")
    return sum(float(number) * _GO_DURATION_UNITS[unit] for number, unit in parts)


def _go_duration(seconds: float) -> str:
    return f"{seconds:g}s"


@dataclass
class FakeSession:
    """A session as the fake stores it."""

    id: str
    name: str
    ttl: float
    lock_delay: float
    behavior: str
    create_index: int
    modify_index: int
    expires_at: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Name": self.name,
            "Node": "fake-consul",
            "LockDelay": int(self.lock_delay * 1e9),
            "Behavior": self.behavior,
            "TTL": _go_duration(self.ttl) if self.ttl else "",
            "NodeChecks": ["serfHealth"],
            "ServiceChecks": None,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@dataclass
class FakeEntry:
    """A KV entry as the fake stores it."""

    key: str
    value: bytes | None
    flags: int
    create_index: int
    modify_index: int
    lock_index: int = 0
    session: str | None = None

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "Key": self.key,
            "Value": None if self.value is None else base64.b64encode(self.value).decode("ascii"),
            "Flags": self.flags,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
            "LockIndex": self.lock_index,
        }
        if self.session is not None:
            entry["Session"] = self.session
        return entry


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str] = field(default_factory=dict)


class FakeConsul:
    """A fake Consul agent serving HTTP on ``127.0.0.1:<port>`` (see module docstring)."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.clock = 0.0
        """The fake's notion of time for TTLs and lock-delay; move it with ``advance``."""
        self.requests: list[RecordedRequest] = []
        self.hang = False
        """When set, requests are read but never answered (a stuck agent)."""
        self.port = 0
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._request_logged = asyncio.Event()
        self._reset_state()

    def _reset_state(self) -> None:
        # Raft index 1 is never a data index in Consul; start above it.
        self.index = 1
        self.kv_index = 1
        self.sessions_index = 1
        self.sessions: dict[str, FakeSession] = {}
        self.kv: dict[str, FakeEntry] = {}
        self.tombstones: dict[str, int] = {}
        self.lock_delays: dict[str, float] = {}

    # --- lifecycle -------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> None:
        """Listen on ``port`` (0: a free one)."""
        self._server = await asyncio.start_server(self._serve_connection, "127.0.0.1", port or self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and drop every connection (in-flight requests fail)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._connections):
            writer.transport.abort()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)

    async def restart(self, lose_state: bool = True) -> None:
        """Stop and start again on the same port; by default forget all sessions and
        keys (a restarted dev-mode agent)."""
        await self.stop()
        if lose_state:
            self._reset_state()
        await self.start(self.port)

    # --- test controls ---------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        """Move the fake clock; sessions whose TTL ran out are invalidated."""
        self.clock += seconds
        for session in list(self.sessions.values()):
            if session.expires_at is not None and session.expires_at <= self.clock:
                self._invalidate(session.id)

    def expire_session(self, session_id: str) -> None:
        """Invalidate a session now, as a TTL expiry would."""
        if session_id not in self.sessions:
            raise KeyError(session_id)
        self._invalidate(session_id)

    def get_value(self, key: str) -> bytes | None:
        entry = self.kv.get(key)
        return None if entry is None else entry.value

    def holder(self, key: str) -> str | None:
        """The session holding ``key``, if any."""
        entry = self.kv.get(key)
        return None if entry is None else entry.session

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition()`` holds, checking it after every state change
        (a key written or released, a session created or invalidated)."""
        while not condition():
            await self._changed.wait()

    def requests_to(self, method: str, path_prefix: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == method and r.path.startswith(path_prefix)]

    async def wait_for_request(self, matches: Callable[[RecordedRequest], bool]) -> RecordedRequest:
        """Wait until a request for which ``matches`` is true has been received."""
        checked = 0
        while True:
            for request in self.requests[checked:]:
                if matches(request):
                    return request
            checked = len(self.requests)
            self._request_logged.clear()
            await self._request_logged.wait()

    # --- state changes ---------------------------------------------------------------

    def _next_index(self) -> int:
        self.index += 1
        return self.index

    def _notify(self) -> None:
        """Wake every blocked query so it re-checks its index."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _invalidate(self, session_id: str) -> None:
        session = self.sessions.pop(session_id)
        index = self._next_index()
        self.sessions_index = index
        for key, entry in list(self.kv.items()):
            if entry.session != session_id:
                continue
            if session.lock_delay > 0:
                self.lock_delays[key] = self.clock + session.lock_delay
            if session.behavior == "delete":
                del self.kv[key]
                self.tombstones[key] = index
            else:
                entry.session = None
                entry.modify_index = index
            self.kv_index = index
        self._notify()

    def _expire_due_sessions(self) -> None:
        self.advance(0)

    # --- HTTP ------------------------------------------------------------------------

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._connections.add(writer)
        connection = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = await self._read_request(connection, reader)
                if request is None:
                    return
                if self.hang:
                    await asyncio.Event().wait()
                status, headers, payload = await self._dispatch(request, body)
                headers = [*headers, ("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
                writer.write(connection.send(h11.Response(status_code=status, headers=headers)))
                writer.write(connection.send(h11.Data(data=payload)))
                writer.write(connection.send(h11.EndOfMessage()))
                await writer.drain()
                if connection.our_state is h11.MUST_CLOSE:
                    return
                connection.start_next_cycle()
        except (ConnectionError, h11.ProtocolError, asyncio.IncompleteReadError):
            return
        finally:
            self._connections.discard(writer)
            self._handlers.discard(task)
            writer.transport.abort()

    async def _read_request(
        self, connection: h11.Connection, reader: asyncio.StreamReader
    ) -> tuple[h11.Request | None, bytes]:
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                connection.receive_data(data)
                if not data and request is None:
                    return None, b""
                continue
            if isinstance(event, h11.ConnectionClosed):
                return None, b""
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return request, bytes(body)

    def _authorized(self, headers: dict[str, str], query: dict[str, str]) -> bool:
        if self.token is None:
            return True
        presented = headers.get("x-consul-token") or query.get("token")
        authorization = headers.get("authorization", "")
        if not presented and authorization.lower().startswith("bearer "):
            presented = authorization[7:].strip()
        return presented == self.token

    async def _dispatch(self, request: h11.Request, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        target = urlsplit(request.target.decode("ascii"))
        path = unquote(target.path)
        query = dict(parse_qsl(target.query, keep_blank_values=True))
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in request.headers}
        method = request.method.decode("ascii")
        self.requests.append(RecordedRequest(method, path, query, headers))
        self._request_logged.set()
        if not self._authorized(headers, query):
            return 403, [], b"Permission denied"
        self._expire_due_sessions()
        try:
            if path.startswith("/v1/kv/"):
                return await self._kv(method, path[len("/v1/kv/"):], query, body)
            if path.startswith("/v1/session/"):
                return await self._session(method, path[len("/v1/session/"):], query, body)
        except _BadRequest as error:
            return 400, [], str(error).encode()
        except _InvalidSession as error:
            # Consul's state store error, surfaced by the HTTP API as a 500.
            return 500, [], f"invalid session {str(error)!r}".encode()
        return 404, [], b"no such endpoint"

    async def _block(self, query: dict[str, str], current_index: Any) -> None:
        """Hold a blocking query until ``current_index()`` passes ``?index`` or the
        wait ends."""
        min_index = int(query.get("index", "0") or 0)
        if min_index <= 0:
            return
        wait = min(parse_go_duration(query["wait"]) if "wait" in query else _DEFAULT_WAIT, _MAX_WAIT)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while current_index() <= min_index:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    @staticmethod
    def _json(status: int, index: int | None, value: Any) -> tuple[int, list[tuple[str, str]], bytes]:
        headers = [] if index is None else [("X-Consul-Index", str(index))]
        return status, headers, json.dumps(value).encode()

    # --- KV --------------------------------------------------------------------------

    def _kv_read_index(self, key: str, recurse: bool) -> int:
        if not recurse:
            entry = self.kv.get(key)
            return entry.modify_index if entry is not None else self.kv_index
        if not key:
            return self.kv_index
        indexes = [e.modify_index for k, e in self.kv.items() if k.startswith(key)]
        indexes += [i for k, i in self.tombstones.items() if k.startswith(key)]
        return max(indexes) if indexes else self.kv_index

    async def _kv(
        self, method: str, key: str, query: dict[str, str], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        recurse = "recurse" in query
        if method == "GET":
            await self._block(query, lambda: self._kv_read_index(key, recurse))
            index = self._kv_read_index(key, recurse)
            if recurse:
                entries = [self.kv[k].to_json() for k in sorted(self.kv) if k.startswith(key)]
            else:
                entries = [self.kv[key].to_json()] if key in self.kv else []
            if not entries:
                return 404, [("X-Consul-Index", str(index))], b""
            return self._json(200, index, entries)
        if method == "PUT":
            return self._json(200, None, self._kv_put(key, query, body))
        if method == "DELETE":
            return self._json(200, None, self._kv_delete(key, query, recurse))
        return 405, [], b"method not allowed"

    def _kv_put(self, key: str, query: dict[str, str], body: bytes) -> bool:
        existing = self.kv.get(key)
        if "cas" in query:
            cas = int(query["cas"])
            if cas == 0 and existing is not None:
                return False
            if cas != 0 and (existing is None or existing.modify_index != cas):
                return False
        flags = int(query.get("flags", "0") or 0)
        acquire, release = query.get("acquire"), query.get("release")
        session = acquire or release
        if session is not None and session not in self.sessions:
            # Consul's state store refuses lock operations with an unknown session.
            raise _InvalidSession(session)
        if acquire is not None:
            if existing is not None and existing.session is not None and existing.session != acquire:
                return False
            if existing is None or existing.session is None:
                delay_until = self.lock_delays.get(key)
                if delay_until is not None and delay_until > self.clock:
                    return False
        if release is not None and (existing is None or existing.session != release):
            return False
        index = self._next_index()
        if existing is None:
            existing = FakeEntry(key, body, flags, create_index=index, modify_index=index)
            self.kv[key] = existing
            self.tombstones.pop(key, None)
        else:
            existing.value, existing.flags, existing.modify_index = body, flags, index
        if acquire is not None and existing.session != acquire:
            existing.session = acquire
            existing.lock_index += 1
        if release is not None:
            existing.session = None
        self.kv_index = index
        self._notify()
        return True

    def _kv_delete(self, key: str, query: dict[str, str], recurse: bool) -> bool:
        if "cas" in query:
            existing = self.kv.get(key)
            if existing is None:
                return True
            if existing.modify_index != int(query["cas"]):
                return False
        doomed = [k for k in self.kv if k.startswith(key)] if recurse else [k for k in (key,) if k in self.kv]
        if not doomed:
            return True
        index = self._next_index()
        for doomed_key in doomed:
            del self.kv[doomed_key]
            self.tombstones[doomed_key] = index
        self.kv_index = index
        self._notify()
        return True

    # --- sessions --------------------------------------------------------------------

    async def _session(
        self, method: str, rest: str, query: dict[str, str], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        action, _, session_id = rest.partition("/")
        if action == "create" and method == "PUT":
            return self._json(200, None, {"ID": self._create_session(body)})
        if action == "renew" and method == "PUT":
            session = self.sessions.get(session_id)
            if session is None:
                return 404, [], f"Session id '{session_id}' not found".encode()
            if session.ttl:
                session.expires_at = self.clock + session.ttl
            return self._json(200, None, [session.to_json()])
        if action == "destroy" and method == "PUT":
            if session_id in self.sessions:
                self._invalidate(session_id)
            return self._json(200, None, True)
        if action == "info" and method == "GET":
            await self._block(query, lambda: self.sessions_index)
            session = self.sessions.get(session_id)
            return self._json(200, self.sessions_index, [] if session is None else [session.to_json()])
        return 405, [], b"method not allowed"

    def _create_session(self, body: bytes) -> str:
        try:
            raw = json.loads(body) if body.strip() else {}
        except json.JSONDecodeError as error:
            raise _BadRequest(f"Request decode failed: {error}") from error
        fields = {name.lower(): value for name, value in raw.items()}
        ttl = parse_go_duration(str(fields.get("ttl") or ""))
        if ttl and not 10 <= ttl <= 86400:
            raise _BadRequest(f"Invalid Session TTL '{fields['ttl']}', must be between [10s=24h0m0s]")
        lock_delay_field = fields.get("lockdelay")
        if lock_delay_field is None:
            lock_delay = _DEFAULT_LOCK_DELAY
        elif isinstance(lock_delay_field, (int, float)):
            # Consul's FixupLockDelay: small numbers are seconds, large ones nanoseconds.
            lock_delay = float(lock_delay_field) if lock_delay_field < 1000 else lock_delay_field / 1e9
        else:
            lock_delay = parse_go_duration(str(lock_delay_field))
        if lock_delay > 60:
            lock_delay = 60.0  # Consul caps lock-delay at 60 s
        behavior = fields.get("behavior") or "release"
        if behavior not in {"release", "delete"}:
            raise _BadRequest(f"Invalid Behavior setting '{behavior}'")
        index = self._next_index()
        self.sessions_index = index
        session = FakeSession(
            id=str(uuid.uuid4()),
            name=str(fields.get("name") or ""),
            ttl=ttl,
            lock_delay=lock_delay,
            behavior=behavior,
            create_index=index,
            modify_index=index,
            expires_at=self.clock + ttl if ttl else None,
        )
        self.sessions[session.id] = session
        self._notify()
        return session.id


class _InvalidSession(Exception):
    pass
