"""An httpx transport whose socket reads are 1 MiB instead of httpcore's 64 KiB.

Measured here from loopback nginx: stock ``iter_raw()`` reaches ~260-380 MB/s,
because every 64 KiB read pays a round of Python parsing in h11 and httpcore
under the GIL; with 1 MiB reads the same code reaches ~1.5 GB/s. httpcore's
documented ``network_backend`` hook is the lever: the stream it returns may
hand back more than the ``max_bytes`` asked for. The one private touch is
handing the pool to httpx's own transport, so request mapping, TLS and
exception translation stay httpx's; ``tests/test_fast_http.py`` fails if an
httpx or httpcore upgrade stops this from taking effect.

The TLS context is built on the first TLS connection, not up front: loading
the CA bundle costs ~25 ms, a tenth of what a plain http:// fetch of a
small model spends before its first byte.
"""

from __future__ import annotations

import functools
import os
import ssl
from collections.abc import Callable, Iterable
from typing import Any

import httpcore
import httpx

from fetcher.errors import UsageError

READ_SIZE = 1024 * 1024


# What httpcore is handed as the pool's TLS context. It trusts no CA, so were it ever used
# instead of the real one, every TLS handshake would fail: it can only fail closed.
_UNLOADED = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


@functools.cache
def tls_context() -> ssl.SSLContext:
    """httpx's own: certifi, or SSL_CERT_FILE / SSL_CERT_DIR when set."""
    try:
        context = httpx.create_ssl_context()
    except OSError as exc:  # ssl.SSLError too: a file that is not PEM
        where = next((f"{k}={os.environ[k]}" for k in ("SSL_CERT_FILE", "SSL_CERT_DIR") if os.environ.get(k)), None)
        raise UsageError(f"cannot load CA certificates from {where or 'certifi'}: {exc.strerror or exc}") from None
    context.set_alpn_protocols(["http/1.1"])
    return context


class LargeReadStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream, tls: Callable[[], ssl.SSLContext] = tls_context) -> None:
        self._stream = stream
        self._tls = tls
        sock = stream.get_extra_info("socket")
        self._tls_socket = sock if isinstance(sock, ssl.SSLSocket) else None
        self._ended = False

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._tls_socket is None:
            return self._stream.read(max(max_bytes, READ_SIZE), timeout)
        return self._read_records(max_bytes, timeout)

    def _read_records(self, max_bytes: int, timeout: float | None) -> bytes:
        """Up to READ_SIZE of what has arrived, gathered one TLS record at a time.

        A TLS read returns one record (16 KiB at most) however much is asked for, so
        asking for 1 MiB would only cost a 1 MiB allocation per 16 KiB (~3x slower
        here). Waiting happens only for the first record; the rest are taken while
        they are already decrypted or on the socket.
        """
        if self._ended:
            return b""
        parts: list[bytes] = []
        size = 0
        while size < READ_SIZE:
            if parts and not (self._tls_socket.pending() or self._stream.get_extra_info("is_readable")):  # type: ignore[union-attr]
                break
            data = self._stream.read(max_bytes, timeout)
            if not data:
                self._ended = bool(parts)  # hand over what came before the end first
                break
            parts.append(data)
            size += len(data)
        return b"".join(parts)

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


def fast_transport(max_connections: int = 16) -> httpx.HTTPTransport:
    """httpx's HTTP/1.1 transport, pooled over ``LargeReadBackend``.

    Neither httpx's transport nor the pool loads a CA bundle: the streams build the one
    real TLS context when a connection first needs it.
    """
    transport = httpx.HTTPTransport(verify=_UNLOADED, limits=httpx.Limits(max_connections=max_connections))
    transport._pool = httpcore.ConnectionPool(
        ssl_context=_UNLOADED,
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=5.0,
        http1=True,
        http2=False,
        network_backend=LargeReadBackend(),
    )
    return transport
