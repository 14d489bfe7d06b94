"""Routing of request targets, building of upload URLs, and the client's view (scheme,
host, address) behind a proxy or not.

An upload URL is ``<base_path><id>``. The id is taken from the raw target, never
percent-decoded: it must match ``stores.base.is_valid_upload_id`` as sent, so
``../x``, ``%2e%2e%2f`` and friends are simply unknown paths (404) and never reach a
store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tusd_py.http.types import Headers
from tusd_py.stores.base import is_valid_upload_id

# host, host:port, IPv4, [IPv6]:port. Anything else in a Host or forwarded host is not
# trusted into a Location header.
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,253})|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")
_SCHEMES = frozenset({"http", "https"})


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request target points: the upload collection or one upload."""

    upload_id: str | None
    """None for the collection (``base_path`` itself)."""


def route(target: str, base_path: str) -> Route | None:
    """The route of ``target`` under ``base_path`` (which ends with '/'), or None for a
    path this handler does not serve (404)."""
    path = target.split("?", 1)[0].split("#", 1)[0]
    if path in (base_path, base_path.rstrip("/")):
        return Route(None)
    if not path.startswith(base_path):
        return None
    upload_id = path[len(base_path) :]
    if not is_valid_upload_id(upload_id):
        return None
    return Route(upload_id)


def _first_list_item(value: str | None) -> str | None:
    if value is None:
        return None
    item = value.split(",", 1)[0].strip()
    return item or None


def _forwarded(value: str | None) -> tuple[str | None, str | None]:
    """``(proto, host)`` from the first element of an RFC 7239 Forwarded header."""
    element = _first_list_item(value)
    proto = host = None
    if element is None:
        return None, None
    for pair in element.split(";"):
        name, _, raw = pair.partition("=")
        raw = raw.strip()
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = raw[1:-1]
        name = name.strip().lower()
        if name == "proto":
            proto = raw
        elif name == "host":
            host = raw
    return proto, host


def _valid_host(host: str | None) -> str | None:
    return host if host is not None and _HOST.fullmatch(host) else None


def _valid_scheme(scheme: str | None) -> str | None:
    if scheme is None:
        return None
    scheme = scheme.lower()
    return scheme if scheme in _SCHEMES else None


@dataclass(frozen=True, slots=True)
class ClientView:
    """How the client reached us, as far as the request's headers may be trusted."""

    scheme: str
    """``"http"`` or ``"https"``."""
    host: str | None
    """Host (and port) the client addressed; None without a usable one."""
    remote_addr: str
    """The client's address: the peer, or behind a trusted proxy the last
    X-Forwarded-For entry; ``""`` when unknown."""


def client_view(headers: Headers, peer: tuple[str, int] | None, behind_proxy: bool) -> ClientView:
    """The one place that decides what the client's scheme, host and address are.

    Forwarding headers are trusted only ``behind_proxy`` (``server.behind_proxy``):
    for scheme and host ``Forwarded`` first, then ``X-Forwarded-Host`` /
    ``X-Forwarded-Proto``, invalid values ignored; for the address the last
    ``X-Forwarded-For`` entry, the one our proxy appended (earlier ones come from the
    client and may be forged). Otherwise: ``http``, the Host header and the peer.
    """
    scheme = "http"
    host = _valid_host(headers.get("host"))
    remote_addr = peer[0] if peer else ""
    if behind_proxy:
        forwarded_proto, forwarded_host = _forwarded(headers.get("forwarded"))
        proxy_scheme = _valid_scheme(forwarded_proto) or _valid_scheme(
            _first_list_item(headers.get("x-forwarded-proto"))
        )
        proxy_host = _valid_host(forwarded_host) or _valid_host(_first_list_item(headers.get("x-forwarded-host")))
        scheme = proxy_scheme or scheme
        host = proxy_host or host
        forwarded_for = ",".join(headers.get_all("x-forwarded-for"))
        hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
        if hops:
            remote_addr = hops[-1]
    return ClientView(scheme, host, remote_addr)


def origin_of(headers: Headers, behind_proxy: bool) -> tuple[str, str] | None:
    """``(scheme, host)`` the client used to reach us (see ``client_view``), or None
    without a usable Host."""
    view = client_view(headers, None, behind_proxy)
    if view.host is None:
        return None
    return view.scheme, view.host


def upload_url(scheme: str, host: str, base_path: str, upload_id: str) -> str:
    """The absolute URL of an upload."""
    return f"{scheme}://{host}{base_path}{upload_id}"
