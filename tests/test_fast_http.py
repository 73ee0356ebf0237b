"""The HTTP fast path: socket reads of 1 MiB, not httpcore's 64 KiB.

Stock httpx reads 64 KiB at a time and tops out at ~260-380 MB/s from loopback
nginx here, against ~1.5 GB/s with 1 MiB reads. If an httpx or httpcore upgrade
stops the larger reads from taking effect, these tests fail instead of the
slowdown going unnoticed.
"""

from __future__ import annotations

import contextlib
import random
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from fetcher.config import build_parser, resolve
from fetcher.errors import TransientFetchError
from fetcher.plan import build_plan
from fetcher.sources import fast_http, open_source
from fetcher.sources.fast_http import PARSED_READ_SIZE, READ_SIZE, fast_transport, tls_context
from tests.conftest import Origin, Tls

BODY = random.Random(3).randbytes(8 * 1024 * 1024)
HTTPCORE_DEFAULT_READ = 64 * 1024
TLS_RECORD = 16 * 1024  # the most one TLS read returns, however much is asked for


def test_the_fast_transport_reads_more_than_64k_at_a_time(origin: Origin) -> None:
    url = origin.add("/big.bin", BODY)
    with httpx.Client(transport=fast_transport()) as client, client.stream("GET", url) as response:
        chunks = [len(c) for c in response.iter_raw()]
    assert sum(chunks) == len(BODY)
    assert max(chunks) > HTTPCORE_DEFAULT_READ
    assert max(chunks) <= PARSED_READ_SIZE  # a body h11 parses: h11 and httpcore hold up to four copies of a read


def test_stock_httpx_reads_64k_so_the_fast_path_still_matters(origin: Origin) -> None:
    url = origin.add("/big.bin", BODY)
    with httpx.Client() as client, client.stream("GET", url) as response:
        chunks = [len(c) for c in response.iter_raw()]
    assert max(chunks) <= HTTPCORE_DEFAULT_READ


def _chunks(url: str, dest: Path, start: int = 0) -> list[bytes]:
    [artifact] = build_plan(resolve(build_parser().parse_args(["--source", url, "--dest", str(dest)]), {}))
    source = open_source(artifact)
    try:
        with source.open(source.resolve().entries[0], start) as body:
            return list(body.chunks)
    finally:
        source.close()


def _chunk_sizes(url: str, dest: Path) -> list[int]:
    return [len(c) for c in _chunks(url, dest)]


def test_the_http_source_uses_the_fast_path(origin: Origin, tmp_path: Path) -> None:
    chunks = _chunk_sizes(origin.add("/big.bin", BODY), tmp_path)
    assert sum(chunks) == len(BODY)
    assert max(chunks) > HTTPCORE_DEFAULT_READ


def test_over_https_records_that_have_arrived_are_handed_on_together(
    tls_origin: Origin, tls: Tls, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.ca_file))
    tls_context.cache_clear()  # built at the first TLS connection, from the environment of then
    try:
        chunks = _chunk_sizes(tls_origin.add("/big.bin", BODY), tmp_path)
    finally:
        tls_context.cache_clear()
    assert sum(chunks) == len(BODY)
    assert max(chunks) > TLS_RECORD
    assert max(chunks) <= PARSED_READ_SIZE


# --- bodies read past h11 ---------------------------------------------------------------------


@pytest.fixture(params=["http", "https"])
def scheme(request: pytest.FixtureRequest, tls: Tls, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Plain HTTP, or TLS with the test CA trusted."""
    if request.param == "https":
        monkeypatch.setenv("SSL_CERT_FILE", str(tls.ca_file))
    tls_context.cache_clear()
    yield request.param
    tls_context.cache_clear()


@pytest.fixture
def either_origin(scheme: str, request: pytest.FixtureRequest) -> Origin:
    origin: Origin = request.getfixturevalue("origin" if scheme == "http" else "tls_origin")
    return origin


class OneWrite:
    """Answers every request with the same bytes, headers and body in one write, then waits for the hang-up.

    So the first read has the headers and some of the body: h11 holds part of the body
    when the rest is read past it. (The test origin writes its headers on their own.)
    """

    def __init__(self, response: bytes, tls: ssl.SSLContext | None) -> None:
        self._response = response
        self._tls = tls
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self._server.getsockname()[1]}/x"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):  # closed
            while True:
                threading.Thread(target=self._answer, args=(self._server.accept()[0],), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            if self._tls is not None:
                conn = self._tls.wrap_socket(conn, server_side=True)
            conn.recv(65536)
            conn.sendall(self._response)
            conn.recv(1)

    def close(self) -> None:
        self._server.close()


@pytest.fixture
def one_write(scheme: str, tls: Tls) -> Iterator[Callable[[bytes], str]]:
    servers: list[OneWrite] = []

    def serve(response: bytes) -> str:
        servers.append(OneWrite(response, tls.server if scheme == "https" else None))
        return servers[-1].url

    yield serve
    for server in servers:
        server.close()


def _get(url: str, timeout: float = 10.0) -> tuple[bytes, int]:
    """The body, and how many connections the pool kept for reuse once the response was closed."""
    transport = fast_transport()
    with httpx.Client(transport=transport, timeout=timeout) as client:
        with client.stream("GET", url) as response:
            body = b"".join(response.iter_raw())
        return body, len(transport._pool.connections)


def _response(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body


def test_a_body_above_direct_body_is_read_past_h11_from_where_it_stopped(
    one_write: Callable[[bytes], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = one_write(_response(BODY))
    monkeypatch.setattr(fast_http, "DIRECT_BODY", len(BODY) - 1)
    assert _get(url) == (BODY, 0)  # h11 did not see the end: the connection is not reused
    monkeypatch.setattr(fast_http, "DIRECT_BODY", len(BODY))
    assert _get(url) == (BODY, 1)  # through h11 all the way, as below DIRECT_BODY


def test_a_direct_body_ends_at_its_content_length(
    one_write: Callable[[bytes], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = one_write(_response(BODY) + b"EXCESS" * 1000)
    monkeypatch.setattr(fast_http, "DIRECT_BODY", 0)
    assert _get(url) == (BODY, 0)


def _failure(url: str) -> BaseException:
    with pytest.raises(httpx.TransportError) as caught:
        _get(url, timeout=0.3)
    return caught.value


@pytest.mark.parametrize("fault", ["cut", "stall"])
def test_a_direct_body_fails_as_it_would_through_h11(
    either_origin: Origin, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """A server that hangs up early, or goes silent past the read timeout: the same httpx error either way."""

    def add(path: str) -> str:
        if fault == "cut":
            return either_origin.add(path, BODY, cut_after=[3 * READ_SIZE])
        return either_origin.add(path, BODY, stall_after=(3 * READ_SIZE, 3.0))

    expected = _failure(add("/h11.bin"))
    monkeypatch.setattr(fast_http, "DIRECT_BODY", 0)
    got = _failure(add("/direct.bin"))
    assert type(got) is type(expected)
    assert str(got) == str(expected)
    assert isinstance(got, httpx.RemoteProtocolError if fault == "cut" else httpx.ReadTimeout)


def test_the_http_source_gets_a_range_read_directly_whole(
    either_origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fast_http, "DIRECT_BODY", 0)
    url = either_origin.add("/big.bin", BODY, etag='"v1"')
    assert b"".join(_chunks(url, tmp_path, start=3_000_000)) == BODY[3_000_000:]
    assert either_origin.hits("/big.bin")[0].headers["Range"] == "bytes=3000000-"


def test_a_direct_body_cut_short_is_worth_a_retry(
    either_origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fast_http, "DIRECT_BODY", 0)
    url = either_origin.add("/big.bin", BODY, cut_after=[3 * READ_SIZE])
    with pytest.raises(TransientFetchError, match=r"dropped: .*peer closed connection without sending complete"):
        _chunks(url, tmp_path)
