"""Proxies on loopback, real ones: an HTTP CONNECT proxy, and a fault-injecting front for S3.

``ConnectProxy`` is what clusters in companies reach the outside through
(``HTTPS_PROXY``): it tunnels bytes to the host a CONNECT names, optionally
only with the right ``Proxy-Authorization``, and records every CONNECT it got.
``S3Front`` stands before moto's server: it can terminate TLS (moto's server
speaks plain HTTP) and answer the first GETs with S3 errors of its choosing
(SlowDown, AccessDenied...), as real S3 does, before passing requests on.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.conftest import S3, Tls


@dataclass
class Connect:
    line: str  # the request line, "CONNECT host:port HTTP/1.1"
    headers: dict[str, str]
    status: int = 0  # what the proxy answered


class ConnectProxy:
    """A threaded HTTP proxy that tunnels CONNECT requests; anything else is answered 405."""

    def __init__(self, credentials: tuple[str, str] | None = None) -> None:
        self.seen: list[Connect] = []
        self.tunnelled = 0  # bytes carried, both ways
        expected = "Basic " + base64.b64encode(":".join(credentials).encode()).decode() if credentials else None
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_CONNECT(self) -> None:
                seen = Connect(self.requestline, dict(self.headers.items()))
                proxy.seen.append(seen)
                if expected is not None and self.headers.get("Proxy-Authorization") != expected:
                    seen.status = 407
                    self.send_response(407)
                    self.send_header("Proxy-Authenticate", 'Basic realm="proxy"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                host, _, port = self.path.rpartition(":")
                try:
                    upstream = socket.create_connection((host.strip("[]"), int(port)), timeout=10)
                except OSError:
                    seen.status = 502
                    self.send_error(502)
                    return
                seen.status = 200
                self.send_response(200, "Connection established")
                self.end_headers()
                self.close_connection = True
                with upstream:
                    proxy._pipe(self.connection, upstream)

            def _refuse(self) -> None:
                self.send_error(405, "this proxy only tunnels CONNECT")

            do_GET = do_HEAD = do_POST = do_PUT = _refuse

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, userinfo: str = "") -> str:
        return f"http://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.port}"

    def _pipe(self, client: socket.socket, upstream: socket.socket) -> None:
        """Carry bytes both ways until either side is done."""

        def copy(src: socket.socket, dst: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := src.recv(65536):
                    dst.sendall(data)
                    self.tunnelled += len(data)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        back = threading.Thread(target=copy, args=(upstream, client), daemon=True)
        back.start()
        copy(client, upstream)
        back.join(timeout=30)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def connect_proxy() -> Iterator[ConnectProxy]:
    proxy = ConnectProxy()
    yield proxy
    proxy.close()


@pytest.fixture
def authenticating_proxy() -> Iterator[ConnectProxy]:
    proxy = ConnectProxy(credentials=("proxyuser", "pr0xy-S3CRET"))
    yield proxy
    proxy.close()


_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


@dataclass
class S3Front:
    """Before moto: TLS or not, and S3 errors answered to the first GETs, one per request."""

    target: str  # moto's host:port
    tls: ssl.SSLContext | None = None
    faults: list[tuple[int, str]] = field(default_factory=list)  # (status, S3 error code)
    trickle: list[int] = field(default_factory=list)  # bytes/s to pass a GET's body on at, one per GET
    gets: int = 0  # GET requests seen (each fault answers one)

    def __post_init__(self) -> None:
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if self.command == "GET":
                    front.gets += 1
                    if front.faults:
                        return self._error(*front.faults.pop(0))
                upstream = http.client.HTTPConnection(front.target, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    self.send_response(response.status, response.reason)
                    for name, value in response.getheaders():
                        if name.lower() not in _HOP_BY_HOP:
                            self.send_header(name, value)
                    if response.getheader("Content-Length") is None:
                        self.send_header("Connection", "close")
                        self.close_connection = True
                    self.end_headers()
                    rate = front.trickle.pop(0) if self.command == "GET" and front.trickle else None
                    step = 65536 if rate is None else max(1, rate // 20)
                    if self.command != "HEAD":
                        with contextlib.suppress(OSError):  # the client gave up on a trickle
                            while data := response.read(step):
                                self.wfile.write(data)
                                self.wfile.flush()
                                if rate:
                                    time.sleep(step / rate)
                finally:
                    upstream.close()

            def _error(self, status: int, code: str) -> None:
                body = (
                    f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                    f"<Message>{code} (injected by the test)</Message><RequestId>TEST</RequestId></Error>"
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if self.tls is not None:
            self.server.socket = self.tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def env(self, s3: S3) -> dict[str, str]:
        return s3.env | {"AWS_ENDPOINT_URL": self.endpoint}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _moto(s3: S3) -> str:
    return s3.endpoint.removeprefix("http://")


@pytest.fixture
def s3_front(s3: S3) -> Iterator[S3Front]:
    front = S3Front(_moto(s3))
    yield front
    front.close()


@pytest.fixture
def s3_tls(s3: S3, tls: Tls) -> Iterator[S3Front]:
    front = S3Front(_moto(s3), tls=tls.server)
    yield front
    front.close()
