"""http:// and https:// sources, over httpx.

Status codes are sorted here into what is worth retrying (408, 429, 5xx,
dropped connections, timeouts) and what is not (other 4xx). Error messages
carry the redacted URL only: httpx's own messages include the full URL,
presigned signature and all, so they are never passed on.
"""

from __future__ import annotations

import email.utils
import os
import ssl
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpx

from fetcher import __version__
from fetcher.errors import FetchError, SourceChangedError, TransientFetchError, UsageError
from fetcher.plan import Artifact, read_bearer_token
from fetcher.redact import is_secret_header, redact_url
from fetcher.sources.base import Body, ObjectInfo, exact_range, parse_content_range
from fetcher.sources.fast_http import fast_transport, tls_context

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds from now: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _headers(artifact: Artifact) -> dict[str, str]:
    headers = {"User-Agent": f"fetcher/{__version__}", "Accept-Encoding": "identity"}
    headers.update(dict(artifact.headers))
    if artifact.bearer_token_file is not None:
        headers["Authorization"] = f"Bearer {read_bearer_token(artifact.bearer_token_file)}"
    return headers


class HttpSource:
    def __init__(self, artifact: Artifact) -> None:
        self.url = artifact.source
        self.display = artifact.display_source
        self._origin = _origin(self.url)
        # A proxy from the environment needs httpx's own transport. httpx builds one per proxy
        # and loads CAs for each at once, so it is handed ours (see _proxy_verify).
        proxied = _proxied(self.url)
        self._client = httpx.Client(
            headers=_headers(artifact),
            event_hooks={"request": [self._drop_secrets_across_origins]},
            timeout=httpx.Timeout(artifact.timeout),
            follow_redirects=True,
            verify=_proxy_verify(self.url) if _proxies() else True,
            transport=None if proxied else fast_transport(artifact.concurrency + 1),
        )
        self._etag: str | None = None
        self._size: int | None = None

    @contextmanager
    def open(self, start: int = 0, end: int | None = None) -> Iterator[Body]:
        headers = {}
        if start or end is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
            if self._etag:
                headers["If-Match"] = self._etag
        try:
            with self._client.stream("GET", self.url, headers=headers) as response:
                offset, exact = self._check(response, start, end)
                info = self._info(response, offset)
                yield Body(info, offset, self._chunks(response), partial=exact)
        except httpx.TimeoutException as exc:
            raise TransientFetchError(f"timed out talking to {self.display} ({type(exc).__name__})") from None
        except _NOT_TRANSIENT as exc:
            raise FetchError(f"request to {self.display} failed: {type(exc).__name__}: {_reason(exc)}") from None
        except httpx.TransportError as exc:
            if (refused := _certificate_refused(exc)) is not None:  # the same answer on every retry
                where, why = _failed_at(exc), refused.verify_message
                raise FetchError(f"TLS certificate of {where} not trusted: {why}{_ca_hint()}") from None
            raise TransientFetchError(f"connection to {self.display} failed: {_reason(exc)}") from None

    def _drop_secrets_across_origins(self, request: httpx.Request) -> None:
        """httpx drops Authorization on a redirect to another origin; do the same for our secret headers."""
        if _origin(str(request.url)) != self._origin:
            for name in [name for name in request.headers if is_secret_header(name)]:
                del request.headers[name]

    def _check(self, response: httpx.Response, start: int, end: int | None) -> tuple[int, bool]:
        """Where the body starts, and whether it is exactly the range asked for."""
        status = response.status_code
        if status == 412 and "If-Match" in response.request.headers:
            raise SourceChangedError(f"{self.display} changed during the download (ETag no longer matches)")
        if status in RETRYABLE_STATUS:
            raise TransientFetchError(
                f"HTTP {status} {response.reason_phrase} from {self.display}",
                retry_after=retry_after_seconds(response.headers.get("Retry-After")),
            )
        if status >= 400:
            hint = " (check --header / --bearer-token-file)" if status in (401, 403) else ""
            raise FetchError(f"HTTP {status} {response.reason_phrase} from {self.display}{hint}")
        if status not in (200, 206):
            raise FetchError(f"unexpected HTTP {status} {response.reason_phrase} from {self.display}")
        self._pin(response)
        if status == 206:
            first, last, _size = parse_content_range(response.headers.get("Content-Range"))
            if first is None:
                raise FetchError(f"{self.display} answered a range request without a usable Content-Range")
            return first, exact_range(first, last, start, end)
        return 0, exact_range(None, None, start, end)

    def _pin(self, response: httpx.Response) -> None:
        """Remember the object's ETag and size; a later response for another version is refused."""
        etag = response.headers.get("ETag")
        strong = etag if etag and not etag.startswith("W/") else None
        size = (
            self._info(response, 0).size
            if response.status_code == 206
            else _int(response.headers.get("Content-Length"))
        )
        if self._etag is None and self._size is None:
            self._etag, self._size = strong, size
            return
        if (strong and self._etag and strong != self._etag) or (size is not None and self._size not in (None, size)):
            raise SourceChangedError(f"{self.display} changed during the download (another ETag or size)")

    def _info(self, response: httpx.Response, offset: int) -> ObjectInfo:
        size: int | None = None
        if response.status_code == 206:
            size = parse_content_range(response.headers.get("Content-Range"))[2]
        elif (length := response.headers.get("Content-Length", "")).isdigit():
            size = int(length) + offset
        ranges = response.status_code == 206 or response.headers.get("Accept-Ranges", "").lower() == "bytes"
        return ObjectInfo(
            size=size,
            content_type=response.headers.get("Content-Type"),
            ranges=ranges and self._etag is not None,  # parts must be pinned to one version
            version=self._etag,
            encoding=response.headers.get("Content-Encoding", "identity").lower() or None,
        )

    def _chunks(self, response: httpx.Response) -> Iterator[bytes]:
        try:
            yield from response.iter_raw()  # as it arrives: a chunker would lose bytes on a cut
        except httpx.TimeoutException:
            raise TransientFetchError(f"read from {self.display} timed out") from None
        except httpx.TransportError as exc:
            raise TransientFetchError(f"connection to {self.display} dropped: {_reason(exc)}") from None

    def close(self) -> None:
        self._client.close()


_NOT_TRANSIENT = (httpx.UnsupportedProtocol, httpx.LocalProtocolError, httpx.TooManyRedirects, httpx.InvalidURL)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname or "", parts.port


def _int(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


def _proxy_verify(url: str) -> ssl.SSLContext:
    """Our CAs for httpx's proxy transports; for a plain-http source, CAs that cannot load are
    no error: an https redirect then fails closed, trusting nothing."""
    try:
        return tls_context()
    except UsageError:
        if urlsplit(url).scheme == "https":
            raise
        return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def _proxies() -> bool:
    return any(scheme in urllib.request.getproxies() for scheme in ("http", "https", "all"))


def _proxied(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(parts.hostname or "")


def _certificate_refused(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate check under httpx's and httpcore's wrapping, if that is what failed."""
    cause: BaseException | None = exc
    for _ in range(8):  # a few layers deep; never round a cycle
        if cause is None or isinstance(cause, ssl.SSLCertVerificationError):
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


def _failed_at(exc: httpx.TransportError) -> str:
    """The URL whose server failed: after a redirect, not the one configured."""
    try:
        return redact_url(str(exc.request.url))
    except RuntimeError:  # no request attached
        return "the server"


def _ca_hint() -> str:
    for name in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
        if value := os.environ.get(name):
            return f" (trusting only the CAs in {name}={value})"
    return " (for a private CA, set SSL_CERT_FILE to its PEM bundle)"


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text.split("\n", 1)[0][:200]
