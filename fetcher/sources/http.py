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
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from fetcher import __version__
from fetcher.errors import FetchError, SourceChangedError, TransientFetchError, UsageError
from fetcher.manifest import Entry, Manifest
from fetcher.plan import read_bearer_token
from fetcher.redact import redact_url
from fetcher.sources.base import Body, Connection, ObjectInfo, Selection, exact_range, parse_content_range
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


def _headers(connection: Connection) -> dict[str, str]:
    headers = {"User-Agent": f"fetcher/{__version__}", "Accept-Encoding": "identity"}
    headers.update(dict(connection.headers))
    if connection.bearer_token_file is not None:
        headers["Authorization"] = f"Bearer {read_bearer_token(connection.bearer_token_file)}"
    return headers


class Pin:
    """What the first response said about one object, which pins every later range of it."""

    def __init__(self) -> None:
        self.seen: Validators | None = None


class HttpClient:
    """One httpx client per source: its connections pooled for all of its objects.

    Our headers go with every request, and none of them (nor Authorization) to
    another origin on a redirect. ``explain`` turns a server's own error
    response into fetcher's error (the hub's X-Error-Code), before status codes judge it.
    """

    def __init__(
        self,
        url: str,
        connection: Connection,
        *,
        explain: Callable[[httpx.Response, str], FetchError | None] | None = None,
        headers: dict[str, str] | None = None,
        auth: httpx.Auth | None = None,
    ) -> None:
        self._origin = origin(url)
        # A proxy from the environment needs httpx's own transport. httpx builds one per proxy
        # and loads CAs for each at once, so it is handed ours (see _proxy_verify).
        proxied = _proxied(url)
        self._client = httpx.Client(
            headers=_headers(connection) | (headers or {}),
            event_hooks={"request": [self._drop_secrets_across_origins]},
            timeout=httpx.Timeout(connection.timeout),
            follow_redirects=True,
            verify=_proxy_verify(url) if _proxies() else True,
            transport=None if proxied else fast_transport(connection.concurrency + 1),
            auth=auth,
        )
        self._own_headers = {name for name, _ in connection.headers} | {"Authorization"}
        self._floor = connection.floor
        self._explain = explain

    @contextmanager
    def stream(
        self, url: str, display: str, pin: Pin, start: int = 0, end: int | None = None, accept: str | None = None
    ) -> Iterator[tuple[Body, httpx.Response]]:
        """GET ``url`` from ``start`` to ``end``, pinned to what ``pin`` saw first."""
        headers = pin.seen.preconditions() if pin.seen is not None else {}
        if start or end is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        if accept:
            headers["Accept"] = accept
        with self._errors(display, url), self._client.stream("GET", url, headers=headers) as response:
            offset, exact = self._check(response, display, pin, start, end)
            info = _info(response, offset, pin)
            chunks = self._floor.watch(_chunks(response, display), display)
            yield Body(info, offset, chunks, partial=exact), response

    def get(
        self, url: str, display: str, params: dict[str, str] | None = None, accept: str | None = None
    ) -> httpx.Response:
        """A small request, read whole (an API's JSON); errors sorted as for a download."""
        with self._errors(display, url):
            response = self._client.get(url, params=params, headers={"Accept": accept} if accept else None)
            self._judge(response, display)
            return response

    def head(self, url: str, display: str, accept: str | None = None) -> httpx.Response:
        """A HEAD, for what its headers say (a registry's Docker-Content-Digest)."""
        with self._errors(display, url):
            response = self._client.head(url, headers={"Accept": accept} if accept else None)
            self._judge(response, display)
            return response

    @contextmanager
    def _errors(self, display: str, url: str) -> Iterator[None]:
        try:
            yield
        except httpx.HTTPError as exc:
            raise httpx_error(exc, display, url) from exc

    def _drop_secrets_across_origins(self, request: httpx.Request) -> None:
        """No user header, and no Authorization, goes to another origin (scheme, host or port).

        httpx itself drops only Authorization, and keeps it on an http-to-https redirect.
        """
        if origin(str(request.url)) != self._origin:
            for name in self._own_headers:
                request.headers.pop(name, None)

    def _judge(self, response: httpx.Response, display: str) -> None:
        """Raise what an error status means: retry it, or fail with the server's own reason."""
        status = response.status_code
        if status < 400 and status not in RETRYABLE_STATUS:
            return
        if self._explain is not None and (error := self._explain(response, display)) is not None:
            raise error
        if status in RETRYABLE_STATUS:
            raise TransientFetchError(
                f"HTTP {status} {response.reason_phrase} from {display}",
                retry_after=retry_after_seconds(response.headers.get("Retry-After")),
            )
        hint = " (check --header / --bearer-token-file)" if status in (401, 403) else ""
        raise FetchError(f"HTTP {status} {response.reason_phrase} from {display}{hint}")

    def _check(self, response: httpx.Response, display: str, pin: Pin, start: int, end: int | None) -> tuple[int, bool]:
        """Where the body starts, and whether it is exactly the range asked for."""
        status = response.status_code
        if status == 412 and _PRECONDITIONS & set(response.request.headers.keys()):
            raise SourceChangedError(f"{display} changed during the download (its {pin.seen} no longer matches)")
        self._judge(response, display)
        if status not in (200, 206):
            raise FetchError(f"unexpected HTTP {status} {response.reason_phrase} from {display}")
        _pin(response, display, pin)
        if status == 206:
            first, last, _size = parse_content_range(response.headers.get("Content-Range"))
            if first is None:
                raise FetchError(f"{display} answered a range request without a usable Content-Range")
            return first, exact_range(first, last, start, end)
        return 0, exact_range(None, None, start, end)

    def close(self) -> None:
        self._client.close()


def _pin(response: httpx.Response, display: str, pin: Pin) -> None:
    """Remember what identifies the object; a later response for another version is refused.

    The preconditions sent with later requests make the server refuse a changed object
    (412); comparing each response's own validators catches a server that ignores them.
    """
    size = _size(response, 0) if response.status_code == 206 else _int(response.headers.get("Content-Length"))
    seen = Validators.of(response.headers, size)
    if pin.seen is None:
        pin.seen = seen
    elif (why := pin.seen.differs(seen)) is not None:
        raise SourceChangedError(f"{display} changed during the download (another {why})")


def _size(response: httpx.Response, offset: int) -> int | None:
    if response.status_code == 206:
        return parse_content_range(response.headers.get("Content-Range"))[2]
    if (length := response.headers.get("Content-Length", "")).isdigit():
        return int(length) + offset
    return None


def _info(response: httpx.Response, offset: int, pin: Pin) -> ObjectInfo:
    ranges = response.status_code == 206 or response.headers.get("Accept-Ranges", "").lower() == "bytes"
    version = pin.seen.version if pin.seen is not None else None
    return ObjectInfo(
        size=_size(response, offset),
        content_type=response.headers.get("Content-Type"),
        ranges=ranges and version is not None,  # parts must be pinned to one version
        version=version,
        encoding=response.headers.get("Content-Encoding", "identity").lower() or None,
    )


def _chunks(response: httpx.Response, display: str) -> Iterator[bytes]:
    try:
        yield from response.iter_raw()  # as it arrives: a chunker would lose bytes on a cut
    except httpx.HTTPError as exc:
        raise httpx_error(exc, display, str(response.url), reading=True) from exc


def read_capped(chunks: Iterable[bytes], limit: int) -> tuple[bytes, bool]:
    """At most ``limit`` bytes of a body, and whether that was all of it: what a server answers is held
    in memory only up to there, and nothing past it is read, however much it sends."""
    data = bytearray()
    for chunk in chunks:
        data += chunk
        if len(data) > limit:
            return bytes(data[:limit]), False
    return bytes(data), True


# What each httpx exception means for fetcher, most specific first: one table, as httpx's own
# HTTPCORE_EXC_MAP is for httpcore. Two need a closer look (see httpx_error): a refused
# certificate is final whatever class carries it, and a proxy's refusal depends on its status.
HTTPX_ERRORS: tuple[tuple[type[Exception], type[FetchError], str], ...] = (
    (httpx.TimeoutException, TransientFetchError, "timed out talking to {source} ({name})"),
    (httpx.UnsupportedProtocol, FetchError, "request to {source} failed: {name}: {reason}"),
    (httpx.LocalProtocolError, FetchError, "request to {source} failed: {name}: {reason}"),
    (httpx.TooManyRedirects, FetchError, "request to {source} failed: {name}: {reason}"),
    (httpx.InvalidURL, FetchError, "request to {source} failed: {name}: {reason}"),
    (httpx.TransportError, TransientFetchError, "connection to {source} failed: {reason}"),
    (httpx.HTTPError, FetchError, "request to {source} failed: {name}: {reason}"),
)
_WHILE_READING = {
    httpx.TimeoutException: "read from {source} timed out",
    httpx.TransportError: "connection to {source} dropped: {reason}",
}


def httpx_error(exc: httpx.HTTPError, display: str, url: str, *, reading: bool = False) -> FetchError:
    """The fetcher error an httpx exception stands for; raise it ``from exc`` to keep the cause."""
    if isinstance(exc, httpx.ProxyError):
        return _proxy_error(exc, display, urlsplit(url).scheme)
    if isinstance(exc, httpx.TransportError) and (refused := _certificate_refused(exc)) is not None:
        return FetchError(f"TLS certificate of {_failed_at(exc)} not trusted: {refused.verify_message}{_ca_hint()}")
    if isinstance(exc, httpx.ConnectError) and "WRONG_VERSION_NUMBER" in str(exc):  # no retry makes it speak TLS
        return FetchError(f"{_failed_at(exc)} answered TLS with something else: is it plain HTTP?{_plain_hint(url)}")
    for exc_type, kind, template in HTTPX_ERRORS:
        if isinstance(exc, exc_type):
            if reading:
                template = next((t for cls, t in _WHILE_READING.items() if isinstance(exc, cls)), template)
            return kind(template.format(source=display, name=type(exc).__name__, reason=_reason(exc)))
    raise AssertionError("HTTPX_ERRORS ends with httpx.HTTPError")


class HttpSource:
    """One object at an http:// or https:// URL."""

    def __init__(self, source: str, connection: Connection, selection: Selection) -> None:
        self.url = source
        self.display = redact_url(source)
        self._selection = selection
        self._client = HttpClient(source, connection)
        self._pin = Pin()

    def resolve(self) -> Manifest:
        return self._selection.single()

    @contextmanager
    def open(self, entry: Entry, start: int = 0, end: int | None = None) -> Iterator[Body]:
        with self._client.stream(self.url, self.display, self._pin, start, end) as (body, _response):
            yield body

    def close(self) -> None:
        self._client.close()


_PRECONDITIONS = frozenset({"if-match", "if-unmodified-since"})


@dataclass(frozen=True)
class Validators:
    """What identifies one version of an object (RFC 9110 8.8), and what of it can pin a range.

    A strong ETag pins with If-Match. Without one, a Last-Modified pins with If-Unmodified-Since,
    but only when it is strong: at least a second before the response's Date (8.8.2.2), else a
    second change within the same second would go unseen. A weak ETag cannot pin byte ranges
    (two versions may share it); with nothing to pin to, a cut transfer starts again from byte 0.
    """

    etag: str | None
    last_modified: str | None
    strong_date: bool
    size: int | None

    @classmethod
    def of(cls, headers: httpx.Headers, size: int | None) -> Validators:
        modified = _date(headers.get("Last-Modified"))
        date = _date(headers.get("Date"))
        strong_date = modified is not None and date is not None and date - modified >= 1
        return cls(headers.get("ETag"), headers.get("Last-Modified"), strong_date, size)

    @property
    def strong_etag(self) -> str | None:
        return self.etag if self.etag and not self.etag.startswith("W/") else None

    @property
    def version(self) -> str | None:
        """The pin, as parts and the download spool name it; None: nothing pins a range."""
        if self.strong_etag:
            return self.strong_etag
        return f"Last-Modified: {self.last_modified}" if self.strong_date else None

    def preconditions(self) -> dict[str, str]:
        if self.strong_etag:
            return {"If-Match": self.strong_etag}
        if self.strong_date and self.last_modified:
            return {"If-Unmodified-Since": self.last_modified}
        return {}

    def differs(self, other: Validators) -> str | None:
        """Which validator of a later response shows another version, if any does."""
        for what, mine, theirs in (
            ("ETag", self.etag, other.etag),
            ("Last-Modified", self.last_modified, other.last_modified),
            ("size", self.size, other.size),
        ):
            if mine is not None and theirs is not None and mine != theirs:
                return what
        return None

    def __str__(self) -> str:
        return "ETag" if self.strong_etag else "Last-Modified"


def _date(value: str | None) -> float | None:
    try:
        return email.utils.parsedate_to_datetime(value).timestamp() if value else None
    except (TypeError, ValueError):
        return None


def origin(url: str) -> tuple[str, str, int | None]:
    """Scheme, host and port (the scheme's own when none is written): what a secret may not leave."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, parts.hostname or "", parts.port or {"http": 80, "https": 443}.get(scheme)


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


def _proxy_error(exc: httpx.ProxyError, display: str, scheme: str) -> FetchError:
    """A proxy's refusal of a CONNECT is final unless its status says to retry (like an origin's)."""
    text = _reason(exc)
    status = int(text[:3]) if text[:3].isdigit() else None
    message = f"the proxy for {display} refused to connect: {text}"
    if status is None or status in RETRYABLE_STATUS:
        return TransientFetchError(message)
    if status == 407:
        message += f" (check the credentials in {scheme.upper()}_PROXY)"
    return FetchError(message)


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


def _plain_hint(url: str) -> str:
    return " (for a registry served so, --oci-plain-http)" if url.startswith("https://") and "/v2/" in url else ""


def _ca_hint() -> str:
    for name in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
        if value := os.environ.get(name):
            return f" (trusting only the CAs in {name}={value})"
    return " (for a private CA, set SSL_CERT_FILE to its PEM bundle)"


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text.split("\n", 1)[0][:200]
