"""``tus.urls.client_view``: the one decision of the client's scheme, host and address,
used for upload URLs (``origin_of``) and for hook events (``RequestContext``)."""

from __future__ import annotations

import pytest

from tusd_py.http.types import Headers
from tusd_py.tus.urls import ClientView, client_view, origin_of

PEER = ("127.0.0.1", 50000)
PROXIED = Headers([
    ("Host", "backend:1080"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "uploads.example"),
    ("X-Forwarded-For", "203.0.113.9, 198.51.100.1"),
    ("X-Forwarded-For", "192.0.2.50"),
])


def test_without_a_proxy_forwarding_headers_are_ignored() -> None:
    assert client_view(PROXIED, PEER, behind_proxy=False) == ClientView("http", "backend:1080", "127.0.0.1")
    assert origin_of(PROXIED, behind_proxy=False) == ("http", "backend:1080")


def test_behind_a_proxy_the_forwarded_values_count() -> None:
    # The last X-Forwarded-For hop is the one our proxy appended; earlier ones may be forged.
    assert client_view(PROXIED, PEER, behind_proxy=True) == ClientView("https", "uploads.example", "192.0.2.50")
    assert origin_of(PROXIED, behind_proxy=True) == ("https", "uploads.example")


def test_forwarded_comes_before_x_forwarded() -> None:
    headers = Headers([
        ("Host", "backend"),
        ("Forwarded", 'for=192.0.2.1;proto=https;host="a.example", proto=http;host=b.example'),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "c.example"),
    ])
    view = client_view(headers, PEER, behind_proxy=True)
    assert (view.scheme, view.host) == ("https", "a.example")
    assert view.remote_addr == "127.0.0.1"  # no X-Forwarded-For: the peer


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([("Host", "ok.example"), ("X-Forwarded-Proto", "ftp"), ("X-Forwarded-Host", "bad host")],
         ClientView("http", "ok.example", "127.0.0.1")),
        ([("Host", "a b")], ClientView("http", None, "127.0.0.1")),
        ([("X-Forwarded-For", " , ")], ClientView("http", None, "127.0.0.1")),
    ],
)
def test_invalid_values_are_ignored(headers: list[tuple[str, str]], expected: ClientView) -> None:
    assert client_view(Headers(headers), PEER, behind_proxy=True) == expected


def test_no_peer_and_no_host() -> None:
    assert client_view(Headers(), None, behind_proxy=True) == ClientView("http", None, "")
    assert origin_of(Headers(), behind_proxy=True) is None

