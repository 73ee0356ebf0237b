"""s3:// sources, over boto3, with the standard AWS credential chain.

botocore's own retries are switched off so that tenacity (in ``transfer``)
is the only retry loop, with one budget and one log line per retry.
AWS_ENDPOINT_URL, AWS_REGION, AWS_CA_BUNDLE, profiles and IRSA web identity
are read by botocore itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import boto3
import botocore.exceptions
from botocore import UNSIGNED
from botocore.config import Config

from fetcher.errors import FetchError, SourceChangedError, TransientFetchError
from fetcher.plan import Artifact
from fetcher.sources.base import CHUNK_SIZE, Body, ObjectInfo, SpeedFloor, exact_range, parse_content_range

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

_THROTTLING = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "RequestLimitExceeded",
        "TooManyRequestsException",
    }
)
_MISSING = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchVersion", "404", "NotFound"})
_TRANSIENT_EXC = (
    botocore.exceptions.ConnectionError,  # EndpointConnectionError, ConnectTimeoutError, ...
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.IncompleteReadError,
)


class S3Source:
    def __init__(self, artifact: Artifact) -> None:
        # s3://bucket/key, the key verbatim as in aws s3 cp: no %-decoding, '?' and '#' included
        self.bucket, _, self.key = artifact.source[len("s3://") :].partition("/")
        self.display = artifact.display_source
        config = Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=artifact.timeout,
            read_timeout=artifact.timeout,
            s3={"addressing_style": artifact.s3_addressing_style},  # type: ignore[arg-type]
            signature_version=UNSIGNED if artifact.s3_anonymous else None,
            max_pool_connections=max(10, artifact.concurrency + 1),
        )
        session = boto3.session.Session()
        self._client: S3Client = session.client("s3", config=config)
        self._version: str | None = None
        self._floor = SpeedFloor(artifact.low_speed_limit, artifact.low_speed_time)
        self._etag: str | None = None

    @contextmanager
    def open(self, start: int = 0, end: int | None = None) -> Iterator[Body]:
        request: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key}
        if start or end is not None:
            request["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        if self._version:
            request["VersionId"] = self._version
        elif self._etag:
            request["IfMatch"] = self._etag
        try:
            response = self._client.get_object(**request)
        except botocore.exceptions.ClientError as exc:
            raise self._client_error(exc) from None
        except _TRANSIENT_EXC as exc:
            raise TransientFetchError(f"S3 request for {self.display} failed: {_reason(exc)}") from None
        except botocore.exceptions.NoCredentialsError:
            raise FetchError(
                f"no AWS credentials for {self.display}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "a profile or IRSA, or FETCHER_S3_ANONYMOUS=true for a public bucket"
            ) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise FetchError(f"S3 request for {self.display} failed: {_reason(exc)}") from None
        self._version = self._version or response.get("VersionId")
        self._etag = self._etag or response.get("ETag")
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
                version=self._version or self._etag,
            )
            yield Body(info, offset, self._floor.watch(self._chunks(stream), self.display), partial=partial)
        finally:
            stream.close()

    def _chunks(self, stream: Any) -> Iterator[bytes]:
        try:
            yield from stream.iter_chunks(CHUNK_SIZE)
        except _TRANSIENT_EXC as exc:
            raise TransientFetchError(f"S3 read of {self.display} dropped: {_reason(exc)}") from None

    def _client_error(self, exc: botocore.exceptions.ClientError) -> FetchError:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _MISSING:
            return FetchError(f"{self.display} does not exist ({code})")
        if code == "PreconditionFailed" or status == 412:
            return SourceChangedError(f"{self.display} changed during the download")
        if code in _THROTTLING or status in (408, 429) or status >= 500:
            return TransientFetchError(f"S3 {code or status} for {self.display}")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return FetchError(f"S3 refused access to {self.display} ({code}): check the credentials and bucket policy")
        return FetchError(f"S3 error {code or status} for {self.display}")

    def close(self) -> None:
        self._client.close()


def _reason(exc: Exception) -> str:
    return str(exc).split("\n", 1)[0][:200]
