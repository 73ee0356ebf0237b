"""An httpx transport whose socket reads are 0.5-1 MiB instead of httpcore's 64 KiB.

Measured here from loopback nginx: stock ``iter_raw()`` reaches ~260-380 MB/s,
because every 64 KiB read pays a round of Python parsing in h11 and httpcore
under the GIL; with 1 MiB reads the same code reaches ~1.5 GB/s. httpcore's
documented ``network_backend`` hook is the lever: the stream it returns may
hand back more than the ``max_bytes`` asked for. The body of a large response
is then read from that stream directly (its documented ``network_stream``
extension), past h11's copies. The one private touch is handing the pool to
httpx's own transport, so request mapping, TLS and exception translation stay
httpx's; ``tests/test_fast_http.py`` fails if an httpx or httpcore upgrade
stops this from taking effect.

The TLS context is built on the first TLS connection, not up front: loading
the CA bundle costs ~25 ms, a tenth of what a plain http:// fetch of a
small model spends before its first byte.
"""

from __future__ import annotations

import functools
import os
import ssl
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpcore
import httpx

from fetcher import kserve
from fetcher.errors import UsageError

READ_SIZE = 1024 * 1024
# The most one read hands h11, for a body it parses (one of DIRECT_BODY or less, such as a ranged
# part). h11 and httpcore hold up to four copies of it at once, on each connection: with 1 MiB reads
# and --concurrency 16, the capped registry row of bench/oci.py peaked at 87-101 MiB RSS; at 512 KiB,
# 63-67 MiB. Bodies are parsed when they are small, or are parts of a split, which happens only
# below --split-below (150 MB/s) a connection, where 512 KiB is still few reads a second.
PARSED_READ_SIZE = 512 * 1024
# A body larger than this is read past h11 (see _DirectBody). Above the largest ranged part
# (--part-size is at most 64 MiB), so parallel parts keep reusing their connections.
DIRECT_BODY = 64 * 1024 * 1024


# What httpcore is handed as the pool's TLS context. It trusts no CA, so were it ever used
# instead of the real one, every TLS handshake would fail: it can only fail closed.
_UNLOADED = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


@functools.cache
def tls_context() -> ssl.SSLContext:
    """httpx's own: certifi, or SSL_CERT_FILE / SSL_CERT_DIR when set; and besides them the CA bundle
    KServe's webhook mounts for CA_BUNDLE_CONFIGMAP_NAME (``kserve.global_ca_bundle``)."""
    try:
        context = httpx.create_ssl_context()
    except OSError as exc:  # ssl.SSLError too: a file that is not PEM
        where = next((f"{k}={os.environ[k]}" for k in ("SSL_CERT_FILE", "SSL_CERT_DIR") if os.environ.get(k)), None)
        raise UsageError(f"cannot load CA certificates from {where or 'certifi'}: {exc.strerror or exc}") from None
    if (bundle := kserve.global_ca_bundle(os.environ)) is not None:
        try:
            context.load_verify_locations(cafile=bundle)
        except OSError as exc:
            raise UsageError(
                f"cannot load CA certificates from {bundle} (CA_BUNDLE_CONFIGMAP_NAME): {exc.strerror or exc}"
            ) from None
    context.set_alpn_protocols(["http/1.1"])
    return context


class LargeReadStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream, tls: Callable[[], ssl.SSLContext] = tls_context) -> None:
        self._stream = stream
        self._tls = tls
        sock = stream.get_extra_info("socket")
        self._tls_socket = sock if isinstance(sock, ssl.SSLSocket) else None
        self._ssl_object = stream.get_extra_info("ssl_object")
        self._buffer = memoryview(bytearray(READ_SIZE)) if self._tls_socket is not None else memoryview(b"")
        self._ended = False

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        """Up to READ_SIZE for a body read past h11 (``_DirectBody`` asks that much), else up to
        PARSED_READ_SIZE: h11 asks for httpcore's 64 KiB."""
        limit = max(max_bytes, PARSED_READ_SIZE)
        if self._tls_socket is None:
            return self._stream.read(limit, timeout)
        return self._read_records(self._tls_socket, min(limit, READ_SIZE), timeout)

    def _read_records(self, sock: ssl.SSLSocket, limit: int, timeout: float | None) -> bytes:
        """Up to ``limit`` bytes of what has arrived, decrypted into one reused buffer.

        A TLS read returns one record (16 KiB at most) however much is asked for.
        Only the first read waits, with httpcore's timeout; the others are
        non-blocking and the loop stops at the first record not yet on the socket.
        That is one EAGAIN per call, where asking whether more had arrived cost a
        settimeout (ioctl) and a poll per record, and records land in place instead
        of being allocated one by one and joined. The reads go to the SSL object
        itself, which ``SSLSocket.recv_into`` reaches through two Python calls.
        """
        if self._ended:
            return b""
        view = self._buffer
        read = self._ssl_object.read
        got = 0
        try:
            sock.settimeout(timeout)
            while got < limit:
                try:
                    size = read(limit - got, view[got:])
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    if not got:
                        raise  # a timeout of 0, and nothing there: as httpcore's own read
                    break  # nothing more has arrived: hand on what has
                except ssl.SSLEOFError:  # no close_notify: an end, as SSLSocket.read makes it by default
                    if not getattr(sock, "suppress_ragged_eofs", True):
                        raise
                    size = 0
                if not size:
                    self._ended = got > 0  # hand over what came before the end first
                    break
                if not got:
                    sock.settimeout(0.0)  # the first record was waited for; the others only taken
                got += size
            sock.settimeout(timeout)
        except TimeoutError as exc:  # httpcore's own mapping, as in its SyncStream.read
            raise httpcore.ReadTimeout(exc) from exc
        except OSError as exc:
            raise httpcore.ReadError(exc) from exc
        return bytes(view[:got])

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, timeout)

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        if ssl_context is _UNLOADED:
            ssl_context = self._tls()
        return LargeReadStream(self._stream.start_tls(ssl_context, server_hostname, timeout), self._tls)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class LargeReadBackend(httpcore.NetworkBackend):
    """httpcore's own sync backend, with streams that read up to READ_SIZE at a time."""

    def __init__(self) -> None:
        self._backend = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        return LargeReadStream(self._backend.connect_tcp(host, port, timeout, local_address, socket_options))

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        return LargeReadStream(self._backend.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


class _Pool(httpcore.ConnectionPool):
    """httpcore's pool; the body of a large response is read past h11 (see ``_DirectBody``)."""

    def handle_request(self, request: httpcore.Request) -> httpcore.Response:
        response = super().handle_request(request)
        stream = response.extensions.get("network_stream")
        length = _direct_length(request, response)
        if length is not None and isinstance(stream, LargeReadStream) and isinstance(response.stream, Iterable):
            timeout = request.extensions.get("timeout", {}).get("read")
            response.stream = _DirectBody(response.stream, stream, length, timeout)
        return response


def _direct_length(request: httpcore.Request, response: httpcore.Response) -> int | None:
    """The Content-Length of a GET's 200/206 body worth reading directly, else None.

    Anything h11 would frame otherwise (chunked, no or several lengths) stays with it.
    """
    if request.method != b"GET" or response.status not in (200, 206):
        return None
    lengths = [value for name, value in response.headers if name.lower() == b"content-length"]
    if len(lengths) != 1 or any(name.lower() == b"transfer-encoding" for name, _ in response.headers):
        return None
    value = lengths[0].strip()
    if not value.isdigit() or int(value) <= DIRECT_BODY:
        return None
    return int(value)


class _DirectBody:
    """A Content-Length body read straight from the stream, not through h11.

    h11 and httpcore copy every body byte four times (into h11's buffer, twice out of
    it, then into bytes): ~0.2 s of CPU per 800 MB here, on the thread that also reads
    the socket. The first chunk still comes through h11, which hands over in one piece
    whatever of the body it has buffered along with the headers; the rest is read
    from the stream, exactly ``length`` bytes, with httpcore's read timeout and errors.
    h11 never sees the end of this body, so the connection is closed, not reused,
    when the response is: one new connection per DIRECT_BODY bytes at most.
    """

    def __init__(self, inner: Iterable[bytes], stream: LargeReadStream, length: int, timeout: float | None) -> None:
        self._inner = inner
        self._stream = stream
        self._length = length
        self._timeout = timeout

    def __iter__(self) -> Iterator[bytes]:
        # Held until the end: dropping the suspended iterator would close the connection.
        through_h11 = iter(self._inner)
        try:
            first = next(through_h11, b"")  # all of the body that h11 had buffered, or one read
            received = len(first)
            if first:
                yield first
            while received < self._length:
                chunk = self._stream.read(READ_SIZE, self._timeout)
                if not chunk:
                    raise httpcore.RemoteProtocolError(
                        "peer closed connection without sending complete message body "
                        f"(received {received} bytes, expected {self._length})"
                    )
                chunk = chunk[: self._length - received]  # a server's excess is dropped with the connection
                received += len(chunk)
                yield chunk
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        if close is not None:
            close()


def fast_transport(max_connections: int = 16) -> httpx.HTTPTransport:
    """httpx's HTTP/1.1 transport, pooled over ``LargeReadBackend``.

    Neither httpx's transport nor the pool loads a CA bundle: the streams build the one
    real TLS context when a connection first needs it.
    """
    transport = httpx.HTTPTransport(verify=_UNLOADED, limits=httpx.Limits(max_connections=max_connections))
    transport._pool = _Pool(
        ssl_context=_UNLOADED,
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=5.0,
        http1=True,
        http2=False,
        network_backend=LargeReadBackend(),
    )
    return transport
