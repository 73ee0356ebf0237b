"""Servers that misbehave on purpose, and the promise every fault case checks.

``Scripted`` is a loopback HTTP/1.1 server whose answers are written by the test, byte by
byte: it can do what a well-behaved server never does (reset a connection, send more than it
announced, answer a range with another range). ``S3Front`` is an HTTP(S) proxy in front of
moto's S3 server (fixtures ``s3_front``, ``s3_tls``) that answers chosen requests with S3's own
error documents (SlowDown, AccessDenied, InvalidAccessKeyId...), trickles or cuts bodies, and
can run a hook between requests (overwrite the object while fetcher is reading it).
``Promise`` holds what must be true after a fault: the exit code, a one-line message naming
the cause, dest exactly as it was (or the new version), nothing created beside dest.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import S3, Run, Tls, make_tar, published, tree

# --- two versions of a model ---------------------------------------------------------


def version(n: int, size: int = 600_000) -> tuple[bytes, dict[str, bytes]]:
    """Version n of a model as a tar.gz, and the files it unpacks to (same names in every version)."""
    import random

    files = {
        "model/config.json": b'{"version": %d}\n' % n,
        "model/weights.bin": random.Random(n).randbytes(size),
    }
    return make_tar(dict(files)), files


# --- the promise ---------------------------------------------------------------------


def _snapshot(root: Path, dest: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p != dest and dest not in p.parents}


@dataclass
class Promise:
    """dest inside a sandbox: after a fault, dest must be as it was and nothing new beside it."""

    sandbox: Path
    dest: Path = field(init=False)
    old: dict[str, bytes] | None = None  # what dest held before the fault (set once seeded)
    _outside: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.dest = self.sandbox / "dest"
        self.sandbox.mkdir(parents=True, exist_ok=True)
        self._outside = _snapshot(self.sandbox, self.dest)

    def holds_old(self, run: Run, code: int, cause: str | tuple[str, ...]) -> None:
        """The failure as promised: ``code``, one line naming ``cause``, dest exactly as it was."""
        assert run.code == code, f"exit {run.code}, not {code}:\n{run.stderr}"
        message = run.error
        assert "\n" not in message and message.strip(), message
        causes = (cause,) if isinstance(cause, str) else cause
        assert any(c in message for c in causes), f"{causes!r} not named in: {message}"
        assert "Traceback" not in run.stderr, run.stderr
        self.holds(self.old)

    def holds(self, files: dict[str, bytes] | None) -> None:
        """dest holds exactly ``files`` (and their directories), nothing else outside its state."""
        if files is None:
            assert not self.dest.exists() or published(self.dest) == [], published(self.dest)
        else:
            assert tree(self.dest) == files
            directories = {str(Path(name).parent) for name in files} - {"."}
            expected = set(files)
            for name in directories:
                parts = Path(name).parts
                expected |= {str(Path(*parts[: i + 1])) for i in range(len(parts))}
            assert set(published(self.dest)) == expected, published(self.dest)
        assert _snapshot(self.sandbox, self.dest) == self._outside, "something was created outside dest"


# --- a scripted HTTP server ------------------------------------------------------------


class Exchange:
    """One request, and the means to answer it any way at all."""

    def __init__(self, handler: BaseHTTPRequestHandler, number: int) -> None:
        self.handler = handler
        self.number = number  # 0 for the first request the current script answers
        self.path = handler.path
        self.headers = dict(handler.headers.items())

    @property
    def range(self) -> tuple[int, int | None] | None:
        """The (first, last) byte asked for, or None."""
        wanted = self.headers.get("Range")
        if not wanted:
            return None
        first, _, last = wanted.removeprefix("bytes=").partition("-")
        return int(first), int(last) if last else None

    def head(self, status: int, headers: dict[str, str]) -> None:
        self.handler.send_response(status)
        for name, value in headers.items():
            self.handler.send_header(name, value)
        self.handler.end_headers()
        self.handler.wfile.flush()

    def write(self, data: bytes) -> None:
        try:
            self.handler.wfile.write(data)
            self.handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def serve(self, body: bytes, etag: str = '"v"', content_type: str = "application/octet-stream") -> None:
        """An honest answer: the whole body, or the range asked for."""
        headers = {"Content-Type": content_type, "ETag": etag, "Accept-Ranges": "bytes"}
        asked = self.range
        if asked is None:
            self.head(200, headers | {"Content-Length": str(len(body))})
            self.write(body)
            return
        first, last = asked[0], len(body) - 1 if asked[1] is None else asked[1]
        part = body[first : last + 1]
        content_range = f"bytes {first}-{last}/{len(body)}"
        self.head(206, headers | {"Content-Length": str(len(part)), "Content-Range": content_range})
        self.write(part)

    def reset(self) -> None:
        """Abort the connection with a TCP RST, as a crashing load balancer does.

        First wait (a little) until the client's kernel has acknowledged what was sent,
        so that the bytes before the reset are the client's to read, not lost in flight.
        """
        self.handler.wfile.flush()
        deadline = time.monotonic() + 2
        while _unacknowledged(self.handler.connection) and time.monotonic() < deadline:
            time.sleep(0.005)
        self.handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.handler.connection.close()
        self.handler.close_connection = True

    def close(self) -> None:
        """End the connection cleanly (FIN), whatever was announced."""
        self.handler.close_connection = True
        with contextlib.suppress(OSError):
            self.handler.connection.shutdown(socket.SHUT_RDWR)


def _unacknowledged(connection: socket.socket) -> int:
    """Bytes sent on this socket that the peer has not acknowledged yet (SIOCOUTQ)."""
    import fcntl
    import termios

    return struct.unpack("i", fcntl.ioctl(connection.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]


Script = Callable[[Exchange], None]


class Scripted:
    """A loopback HTTP server where ``script(exchange)`` answers every GET."""

    def __init__(self, script: Script, port: int = 0) -> None:
        self._script = script
        self._answered = 0  # requests answered by the current script
        self.requests: list[Exchange] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                with server._lock:
                    exchange = Exchange(self, server._answered)
                    server._answered += 1
                    server.requests.append(exchange)
                    script = server._script
                script(exchange)

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def script(self) -> Script:
        return self._script

    @script.setter
    def script(self, script: Script) -> None:
        """From now on, answer with ``script``; its first request is number 0."""
        with self._lock:
            self._script, self._answered = script, 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# --- a fault-injecting front before moto ------------------------------------------------


@dataclass
class S3Error:
    status: int
    code: str
    times: int = 1_000_000  # how many requests it answers, then requests pass again
    only: str = "GET"  # the method it answers


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]


_ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{code} (injected)</Message>'
    "<RequestId>FAULTS0001</RequestId><HostId>faults</HostId></Error>"
)
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class S3Front:
    """A reverse proxy before moto, which fetcher's AWS_ENDPOINT_URL (``env``) points at.

    Moto's server speaks plain HTTP and never fails on its own; the front can speak TLS (``tls``)
    and misbehave as real S3 and networks do, each fault applied to the next requests it fits:
    ``errors`` answered first, in order, each ``times`` times, with S3's own error document;
    ``trickle``, bytes/s at which to send the next successful GETs' bodies; ``cuts``, bytes of the
    next successful GETs' bodies to send before closing the connection; ``after_get``, called once
    when the next GET's answer has left moto (to change the object before the parts are asked for).
    ``requests`` is every request received, errors included.
    """

    def __init__(self, s3: S3, tls: ssl.SSLContext | None = None) -> None:
        self.upstream = s3.endpoint.removeprefix("http://")
        self.errors: list[S3Error] = []
        self.trickle: list[int] = []
        self.cuts: list[int] = []
        self.after_get: Callable[[], object] | None = None
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                front._handle(self)

            do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self.endpoint = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.env = s3.env | {"AWS_ENDPOINT_URL": self.endpoint}
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def gets(self) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.method == "GET"]

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        method = handler.command
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP}
        length = int(headers.get("Content-Length") or 0)
        payload = handler.rfile.read(length) if length else None
        with self._lock:
            self.requests.append(Request(method, handler.path, headers))
            error = next((e for e in self.errors if e.times > 0 and e.only == method), None)
            if error is not None:
                error.times -= 1
        if error is not None:
            body = _ERROR_XML.format(code=error.code).encode()
            handler.send_response(error.status)
            handler.send_header("Content-Type", "application/xml")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            if method != "HEAD":
                handler.wfile.write(body)
            return
        connection = http.client.HTTPConnection(self.upstream, timeout=30)
        try:
            connection.request(method, handler.path, body=payload, headers=headers)
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        hook = rate = cut = None
        with self._lock:
            if method == "GET":
                hook, self.after_get = self.after_get, None
                if response.status < 300:
                    rate = self.trickle.pop(0) if self.trickle else None
                    cut = self.cuts.pop(0) if self.cuts else None
        if hook is not None:  # the object changes once this answer has left moto
            hook()
        handler.send_response(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in _HOP and name.lower() != "content-length":
                handler.send_header(name, value)
        handler.send_header("Content-Length", response.getheader("Content-Length", str(len(data))))
        handler.end_headers()
        if method == "HEAD":
            return
        if cut is not None:
            data = data[:cut]
        step = 65536 if rate is None else max(1, rate // 20)
        try:
            for start in range(0, len(data), step):
                handler.wfile.write(data[start : start + step])
                handler.wfile.flush()
                if rate is not None:
                    time.sleep(step / rate)
            handler.wfile.flush()
            if cut is not None:  # a clean close: a reset would drop what the client has not read yet
                handler.connection.shutdown(socket.SHUT_RDWR)
                handler.close_connection = True
        except OSError:  # fetcher gave up on a trickle, or read what it wanted and hung up
            handler.close_connection = True

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def s3_front(s3: S3) -> Iterator[S3Front]:
    front = S3Front(s3)
    yield front
    front.close()


@pytest.fixture
def s3_tls(s3: S3, tls: Tls) -> Iterator[S3Front]:
    front = S3Front(s3, tls=tls.server)
    yield front
    front.close()


# --- fetcher in the background ----------------------------------------------------------


class Background:
    """``python -m fetcher`` started as run_fetcher starts it, but not waited for: to signal it mid-way."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        import subprocess
        import sys

        from tests.conftest import ROOT, _clean_env

        full_env = _clean_env() | {
            "FETCHER_RETRY_BACKOFF": "0.05",
            "FETCHER_TERMINATION_LOG": "/dev/null",
            "FETCHER_LOG_FORMAT": "json",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fetcher", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env | (env or {}),
            cwd=ROOT,
        )
        self.lines: list[str] = []
        self._seen = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._seen:
                self.lines.append(line)
                self._seen.notify_all()
        with self._seen:
            self.lines.append("")  # end of output
            self._seen.notify_all()

    def wait_for(self, event: str, timeout: float = 60) -> None:
        """Until fetcher has logged ``event`` (a JSON log line's "event")."""
        needle = f'"event": "{event}"'
        with self._seen:
            ok = self._seen.wait_for(lambda: any(needle in line for line in self.lines) or "" in self.lines, timeout)
        assert ok and any(needle in line for line in self.lines), f"no {event!r} in:\n{''.join(self.lines)}"

    def finish(self, timeout: float = 60) -> Run:
        import json

        try:
            code = self.process.wait(timeout=timeout)
        finally:
            self.process.kill()
        self._reader.join(timeout=10)
        stdout = self.process.stdout.read() if self.process.stdout else ""
        stderr = "".join(self.lines)
        events = []
        for line in stderr.splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                events.append({"event": "(not json)", "line": line})
        return Run(code, stdout, stderr, events)
