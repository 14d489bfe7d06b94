"""The plain-head parser that lets most requests bypass h11 (``tusd_py.http.head``).

It may be stricter than h11, never more lenient: every head it accepts must be parsed
by h11 to the very same request, and every head that h11 frames or keeps differently
(or rejects) must be left to h11.
"""

from __future__ import annotations

import h11
import pytest

from tusd_py.http.head import parse_simple_head

MAX = 16 * 1024

ACCEPTED = [
    b"HEAD /files/abc HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n\r\n",
    b"POST /files/ HTTP/1.1\r\nhost: 127.0.0.1:1080\r\nUpload-Length: 1048576\r\nContent-Length: 0\r\n\r\n",
    b"PATCH /files/abc HTTP/1.1\r\nHOST:x\r\nContent-Type: application/offset+octet-stream\r\n"
    b"Upload-Offset: 0\r\nContent-Length: 5\r\n\r\n",
    b"OPTIONS /files/ HTTP/1.1\r\nHost: x\r\nConnection: Keep-Alive\r\nX-Empty:\r\n"
    b"Upload-Metadata: filename d29ybGQ=,is_confidential \t\r\n\r\n",
    b"GET http://x/files/abc?a=b HTTP/1.1\r\nHost: x\r\nUser-Agent: caf\xe9 client\r\n\r\n",
]

REFUSED = [
    b"HEAD /files/abc HTTP/1.0\r\nHost: x\r\n\r\n",  # HTTP/1.0: h11 closes after it
    b"HEAD /files/abc HTTP/2.0\r\nHost: x\r\n\r\n",
    b"head /files/abc HTTP/1.1\r\nHost: x\r\n\r\n",
    b"HEAD /files/abc HTTP/1.1\r\n\r\n",  # no Host
    b"HEAD /files/abc HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    b"HEAD /files/abc HTTP/1.1\r\nHost : x\r\n\r\n",
    b"HEAD /files/abc HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n",
    b"HEAD /files/abc HTTP/1.1\r\nHost: x\r\nX-Ctl: a\x01b\r\n\r\n",
    b"HEAD /files/abc HTTP/1.1\nHost: x\n\n",
    b"HEAD /files/a bc HTTP/1.1\r\nHost: x\r\n\r\n",
    b"HEAD  /files/abc HTTP/1.1\r\nHost: x\r\n\r\n",
    b"PATCH /f HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
    b"PATCH /f HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\n",
    b"PATCH /f HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\n",
    b"PATCH /f HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\n",  # latin-1 superscript two
    b"PATCH /f HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000000000\r\n\r\n",
    b"PATCH /f HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"PATCH /f HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
    b"PATCH /f HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    b"GET /f HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"HEAD /f HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"HEAD /f HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, close\r\n\r\n",
    b"HEAD /f HTTP/1.1\r\nHost: x\r\n",  # incomplete
]


def h11_request(head: bytes) -> tuple[h11.Request, int]:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    event = conn.next_event()
    assert type(event) is h11.Request
    body = conn.next_event()
    length = 0 if type(body) is h11.EndOfMessage else dict(event.headers).get(b"content-length", b"0")
    return event, int(length)


@pytest.mark.parametrize("head", ACCEPTED)
def test_an_accepted_head_is_what_h11_parses(head: bytes) -> None:
    parsed = parse_simple_head(memoryview(head + b"hello"), MAX)
    assert parsed is not None and parsed.raw == head
    event, length = h11_request(head)
    assert parsed.method == event.method.decode()
    assert parsed.target == event.target.decode("latin-1")
    assert parsed.headers == [(name.decode("latin-1"), value.decode("latin-1")) for name, value in event.headers]
    assert parsed.length == length


@pytest.mark.parametrize("head", REFUSED)
def test_what_h11_frames_or_keeps_differently_is_left_to_h11(head: bytes) -> None:
    assert parse_simple_head(head, MAX) is None


def test_a_head_over_the_size_limit_is_left_to_h11() -> None:
    head = b"HEAD /f HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 200 + b"\r\n\r\n"
    assert parse_simple_head(head, len(head)) is not None
    assert parse_simple_head(head, len(head) - 1) is None
