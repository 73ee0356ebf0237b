"""A real HTTP CONNECT proxy on loopback, as clusters in companies reach the outside through.

``ConnectProxy`` (``HTTPS_PROXY``) tunnels bytes to the host a CONNECT names, optionally
only with the right ``Proxy-Authorization``, and records every CONNECT it got. The
fault-injecting front before moto's S3 server is ``S3Front`` in tests/faults_support.py.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest


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
