"""s3:// sources, over boto3, with the standard AWS credential chain.

botocore's own retries are switched off so that tenacity (in ``transfer``)
is the only retry loop, with one budget and one log line per retry.
AWS_ENDPOINT_URL, AWS_REGION, AWS_CA_BUNDLE, profiles and IRSA web identity
are read by botocore itself (KServe's S3 settings are mapped onto them in
``fetcher.kserve``).
"""

from __future__ import annotations

import base64
import gc
import os
import re
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import boto3
import botocore.exceptions
import botocore.session
import urllib3.exceptions
from botocore import UNSIGNED
from botocore.config import Config

from fetcher.errors import FetchError, SourceChangedError, TransientFetchError, UsageError
from fetcher.manifest import SHA256, Digest, Entry, Manifest, check_layout, listing_identity, relative_path
from fetcher.redact import redact_url
from fetcher.sources.base import CHUNK_SIZE, Body, Connection, ObjectInfo, Selection, exact_range, parse_content_range

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

# What each S3 error code means for fetcher: one table, as httpx's HTTPCORE_EXC_MAP is for
# httpcore. Codes not listed are judged by their status (see _by_status).
_CHANGED = "{source} changed during the download"
_MISSING = "{source} does not exist ({code})"
_REFUSED = "S3 refused access to {source} ({code}): check the credentials and bucket policy"
_BUSY = "S3 {code} for {source}"
S3_ERRORS: dict[str, tuple[type[FetchError], str]] = {
    **dict.fromkeys(("NoSuchKey", "NoSuchBucket", "404", "NotFound"), (FetchError, _MISSING)),
    **dict.fromkeys(
        (
            "AccessDenied",
            "403",
            "Forbidden",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "ExpiredToken",
            "InvalidToken",
            "TokenRefreshRequired",
            "AllAccessDisabled",
            "AccountProblem",
            "InvalidObjectState",  # archived (Glacier): no retry brings it back
        ),
        (FetchError, _REFUSED),
    ),
    # NoSuchVersion: only a pinned request names a version, so the object was replaced under us.
    **dict.fromkeys(("PreconditionFailed", "412", "NoSuchVersion"), (SourceChangedError, _CHANGED)),
    **dict.fromkeys(
        (
            "SlowDown",
            "Throttling",
            "ThrottlingException",
            "RequestTimeout",
            "RequestTimeoutException",
            "InternalError",
            "ServiceUnavailable",
            "RequestLimitExceeded",
            "TooManyRequestsException",
        ),
        (TransientFetchError, _BUSY),
    ),
}

# botocore's own exceptions, most specific first (SSLError is a ConnectionError, but only a
# handshake that failed for another reason than the certificate is worth retrying: see _tls_error).
BOTOCORE_ERRORS: tuple[tuple[type[Exception], type[FetchError], str], ...] = (
    (
        botocore.exceptions.NoCredentialsError,
        FetchError,
        "no AWS credentials for {source}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
        "a profile or IRSA, or FETCHER_S3_ANONYMOUS=true for a public bucket",
    ),
    (botocore.exceptions.ConnectionError, TransientFetchError, "S3 request for {source} failed: {reason}"),
    (botocore.exceptions.ReadTimeoutError, TransientFetchError, "S3 read of {source} timed out"),
    (botocore.exceptions.ResponseStreamingError, TransientFetchError, "S3 read of {source} dropped: {reason}"),
    (botocore.exceptions.IncompleteReadError, TransientFetchError, "S3 read of {source} dropped: {reason}"),
    (botocore.exceptions.ConnectionClosedError, TransientFetchError, "S3 connection for {source} closed: {reason}"),
    (botocore.exceptions.HTTPClientError, TransientFetchError, "S3 request for {source} failed: {reason}"),
    (botocore.exceptions.BotoCoreError, FetchError, "S3 request for {source} failed: {reason}"),
    (urllib3.exceptions.ReadTimeoutError, TransientFetchError, "S3 read of {source} timed out"),
    (urllib3.exceptions.ProtocolError, TransientFetchError, "S3 read of {source} dropped: {reason}"),
    (urllib3.exceptions.HTTPError, TransientFetchError, "S3 read of {source} failed: {reason}"),
)
_BOTOCORE = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)
_LIBRARY = (*_BOTOCORE, urllib3.exceptions.HTTPError)  # reading the body goes to urllib3 directly


def s3_error(exc: Exception, source: str, ca_hint: str = "") -> FetchError:
    """The fetcher error a botocore exception stands for; raise it ``from exc``."""
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        kind, template = S3_ERRORS.get(code) or _by_status(status)
        return kind(template.format(source=source, code=code or status))
    if isinstance(exc, botocore.exceptions.SSLError):
        return _tls_error(exc, source, ca_hint)
    for exc_type, kind, template in BOTOCORE_ERRORS:
        if isinstance(exc, exc_type):
            return kind(template.format(source=source, reason=_reason(exc)))
    return FetchError(f"S3 request for {source} failed: {_reason(exc)}")


def _by_status(status: int) -> tuple[type[FetchError], str]:
    if status == 412:
        return SourceChangedError, _CHANGED
    if status in (408, 429) or status >= 500:
        return TransientFetchError, _BUSY
    if status in (401, 403):
        return FetchError, _REFUSED
    return FetchError, "S3 error {code} for {source}"


def _tls_error(exc: botocore.exceptions.SSLError, source: str, ca_hint: str) -> FetchError:
    """The README's HTTPS policy: an untrusted certificate fails at once, naming the server; any
    other handshake failure is retried. (A CA bundle that cannot be loaded is found before.)"""
    cause: BaseException | None = exc
    for _ in range(8):  # a few layers of urllib3's wrapping; never round a cycle
        if cause is None:
            break
        if isinstance(cause, ssl.SSLCertVerificationError):
            where = redact_url(str(exc.kwargs.get("endpoint_url") or source))
            return FetchError(f"TLS certificate of {where} not trusted: {cause.verify_message}{ca_hint}")
        cause = cause.__cause__ or cause.__context__
    return TransientFetchError(f"TLS handshake with S3 for {source} failed: {_reason(exc)}")


def _ca_bundle_setting(session: botocore.session.Session) -> tuple[str, str] | None:
    """Where botocore takes its CA bundle from, when it is not its default one: (what names it, path)."""
    try:
        path = session.get_config_variable("ca_bundle")
    except botocore.exceptions.BotoCoreError:  # a broken profile: botocore reports it on the first request
        return None
    if not path:
        return None
    named = "AWS_CA_BUNDLE" if os.environ.get("AWS_CA_BUNDLE") == path else "ca_bundle in the AWS config"
    return named, str(path)


def _unloadable(path: str) -> str | None:
    """Why the CA bundle at ``path`` cannot be loaded, or None if it can."""
    try:
        ssl.create_default_context(cafile=path)
    except ssl.SSLError as exc:
        return f"no PEM certificates in it ({exc.reason or exc})"
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _client(core: botocore.session.Session, config: Config, verify: bool | None) -> S3Client:
    """The S3 client, made by boto3 on fetcher's botocore session.

    Making it turns ~3.6 MB of botocore's JSON models into ~35,000 objects, which sets off a full
    garbage collection of everything the imports made: 30-40 ms here, before the first request.
    Those objects, like the client's, live as long as the run, so they are frozen instead
    (``gc.freeze``): no collection looks at them again.
    """
    gc.freeze()
    try:
        client = boto3.session.Session(botocore_session=core).client("s3", config=config, verify=verify)
    except botocore.exceptions.InvalidRegionError as exc:
        raise UsageError(f"the S3 region is not valid ({_plain('region', exc.kwargs.get('region_name'))}): "
                         "check AWS_REGION and AWS_DEFAULT_REGION") from exc  # fmt: skip
    except ValueError as exc:  # botocore's "Invalid endpoint": a host without its scheme, most often
        endpoint = _plain("endpoint", os.environ.get("AWS_ENDPOINT_URL"))
        raise UsageError(
            f"the S3 endpoint is not a URL ({endpoint}): set AWS_ENDPOINT_URL to http(s)://host[:port]"
        ) from exc
    gc.freeze()
    return client


def _plain(what: str, value: object) -> str:
    """A setting echoed in an error only when it is plainly a name (``host:port``, ``eu-west-1``):
    a malformed one may hold a credential (``user:password@host``) that no URL parser finds."""
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9._-]{1,253}(:[0-9]{1,5})?", value):
        return repr(value)
    return f"the {what} given is not shown"


class S3Source:
    """An object, or every object under a prefix: ``s3://bucket/key`` or ``s3://bucket/prefix/``."""

    def __init__(self, source: str, connection: Connection, selection: Selection) -> None:
        # s3://bucket/key, the key verbatim as in aws s3 cp: no %-decoding, '?' and '#' included
        self.bucket, _, self.key = source[len("s3://") :].partition("/")
        self.display = redact_url(source)
        self._selection = selection
        config = Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=connection.timeout,
            read_timeout=connection.timeout,
            s3={"addressing_style": connection.s3_addressing_style},  # type: ignore[arg-type]
            signature_version=UNSIGNED if connection.s3_anonymous else None,
            max_pool_connections=max(10, connection.concurrency + 1),
        )
        core = botocore.session.Session()
        # verify=False only when asked (KServe's S3_VERIFY_SSL=0): a self-signed MinIO. None is botocore's
        # own choice, which reads AWS_CA_BUNDLE.
        verify = False if connection.s3_no_verify_ssl else None
        if verify is False:  # urllib3 would warn on stderr at every request, outside the log
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        self._client = _client(core, config, verify)
        bundle = _ca_bundle_setting(core) if verify is None else None
        https = self._client.meta.endpoint_url.lower().startswith("https:")
        if https and bundle is not None and (why := _unloadable(bundle[1])) is not None:
            # Found here, not on the first request: botocore reports it as a connection error.
            raise UsageError(f"cannot load CA certificates from {bundle[0]}={bundle[1]}: {why}")
        self._ca_hint = (
            f" (trusting only the CAs in {bundle[0]}={bundle[1]})"
            if bundle
            else " (for a private CA, set AWS_CA_BUNDLE to its PEM bundle)"
        )
        self._floor = connection.floor
        self._pins: dict[str, tuple[str | None, str | None]] = {}  # key -> (VersionId, ETag) first seen
        self._checksums: set[str] = set()  # keys the listing says carry a SHA-256 checksum

    # --- what the source names -----------------------------------------------------

    def resolve(self) -> Manifest:
        """One object, or the directory under a prefix; a key with no object but objects under
        ``key/`` is that directory too (``aws s3 cp`` would need --recursive)."""
        if self.key.endswith("/"):
            return self._directory(self.key, note=None)
        request: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key, "ChecksumMode": "ENABLED"}
        try:
            head = self._client.head_object(**request)
        except _BOTOCORE as exc:
            if not _missing(exc):
                raise s3_error(exc, self.display, self._ca_hint) from exc
            if not self._list(self.key + "/", limit=1):  # a missing bucket is NoSuchBucket here
                # A HEAD's 404 carries no code: the bucket answered the listing, so it is the key.
                raise FetchError(_MISSING.format(source=self.display, code="NoSuchKey")) from exc
            return self._directory(
                self.key + "/", note=f"no object at {self.display}: took it as the directory {self.key}/"
            )
        manifest = self._selection.single(self.key)
        if manifest.entries[0].digest is None and (digest := _whole_object_sha256(head)) is not None:
            manifest = manifest.with_entries([replace(manifest.entries[0], digest=digest)])
        return manifest

    def _directory(self, prefix: str, note: str | None) -> Manifest:
        objects = self._list(prefix)
        entries: list[Entry] = []
        for item in objects:
            key = item["Key"]
            if key.endswith("/") and item.get("Size", 0) == 0:  # a "folder" the console made
                continue
            path = relative_path(key[len(prefix) :], "S3 key")
            if "SHA256" in item.get("ChecksumAlgorithm", []):
                self._checksums.add(key)
            entries.append(Entry(path, item["Size"], None, locator=key, pin=item.get("ETag")))
        check_layout(entries, "S3 key")
        return Manifest(tuple(entries), directory=True, identity=listing_identity(entries), note=note)

    def _list(self, prefix: str, limit: int | None = None) -> list[Any]:
        """Every object under ``prefix``, across ListObjectsV2's pages of 1,000."""
        request: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if limit is not None:
            request["MaxKeys"] = limit
        objects: list[Any] = []
        try:
            while True:
                page = self._client.list_objects_v2(**request)
                objects.extend(page.get("Contents", []))
                if limit is not None or not page.get("IsTruncated"):
                    return objects
                request["ContinuationToken"] = page["NextContinuationToken"]
        except _BOTOCORE as exc:
            raise s3_error(exc, f"s3://{self.bucket}/{prefix}", self._ca_hint) from exc

    # --- reading an object -------------------------------------------------------------

    @contextmanager
    def open(self, entry: Entry, start: int = 0, end: int | None = None) -> Iterator[Body]:
        key = entry.locator or self.key
        display = f"s3://{self.bucket}/{key}" if entry.locator != self.key else self.display
        request: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if start or end is not None:
            request["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        version, etag = self._pins.get(key, (None, entry.pin))
        if version:
            request["VersionId"] = version
        elif etag:
            request["IfMatch"] = etag
        whole = start == 0 and end is None
        if whole:
            request["ChecksumMode"] = "ENABLED"
        try:
            vouched = self._vouched(key, display) if start == 0 and not whole and key in self._checksums else None
            response = self._client.get_object(**request)
        except _BOTOCORE as exc:
            raise s3_error(exc, display, self._ca_hint) from exc
        version, etag = version or response.get("VersionId"), etag or response.get("ETag")
        self._pins[key] = (version, etag)
        stream = response["Body"]
        try:
            first, last, size = parse_content_range(response.get("ContentRange"))
            offset = first if first is not None else 0
            partial = exact_range(first, last, start, end)
            if size is None:
                size = response["ContentLength"] + offset
            info = ObjectInfo(
                size=size,
                content_type=response.get("ContentType"),
                ranges=True,
                version=version or etag,
                digest=_whole_object_sha256(response) if whole else vouched,
            )
            yield Body(info, offset, self._floor.watch(self._chunks(stream, display), display), partial=partial)
        finally:
            stream.close()

    def _vouched(self, key: str, display: str) -> Digest | None:
        """The object's whole checksum, asked for apart: a ranged GET does not carry it."""
        head = self._client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        return _whole_object_sha256(head)

    def _chunks(self, stream: Any, display: str) -> Iterator[bytes]:
        """What has arrived, up to CHUNK_SIZE at a time.

        Not ``iter_chunks``: its reads wait for a whole chunk, so a server trickling bytes would
        be seen only once per MiB (days, at a few bytes a second), never by the low-speed limit.
        A StreamingBody hands out its urllib3 response as a context manager, whose ``read1``
        returns after one read of the socket. The size is checked by the caller (``ended early``).
        """
        try:
            with stream as raw:
                while chunk := raw.read1(CHUNK_SIZE):
                    yield chunk
        except _LIBRARY as exc:
            raise s3_error(exc, display, self._ca_hint) from exc

    def close(self) -> None:
        self._client.close()


def _missing(exc: Exception) -> bool:
    """A HEAD's 404: no object at the key (HEAD answers carry no error code of their own)."""
    if not isinstance(exc, botocore.exceptions.ClientError):
        return False
    return str(exc.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound")


def _whole_object_sha256(response: Any) -> Digest | None:
    """S3's ChecksumSHA256, when it covers the whole object.

    A multipart upload's checksum may be COMPOSITE, a checksum of the parts' checksums
    (written ``<base64>-<parts>``): no whole object hashes to it.
    """
    value = response.get("ChecksumSHA256")
    kind = response.get("ChecksumType")
    if not value or kind not in (None, "FULL_OBJECT") or "-" in value:
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        return None
    return Digest(SHA256, raw.hex(), "S3 ChecksumSHA256") if len(raw) == 32 else None


def _reason(exc: Exception) -> str:
    return str(exc).split("\n", 1)[0][:200]
