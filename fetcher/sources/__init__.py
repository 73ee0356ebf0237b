"""Sources, looked up by scheme in ``fetcher.schemes``; each module is imported only when its scheme is used."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fetcher.errors import UsageError
from fetcher.manifest import MAX_SUMS_BYTES, Entry, parse_sha256sums
from fetcher.plan import Artifact
from fetcher.redact import redact_url
from fetcher.schemes import scheme_of
from fetcher.sources.base import Body, Connection, ObjectInfo, One, Selection, Source, SpeedFloor

__all__ = ["Body", "ObjectInfo", "One", "Source", "open_source", "read_sha256sums"]


def connection(artifact: Artifact) -> Connection:
    return Connection(
        headers=artifact.headers,
        bearer_token_file=artifact.bearer_token_file,
        timeout=artifact.timeout,
        concurrency=artifact.concurrency,
        floor=SpeedFloor(artifact.low_speed_limit, artifact.low_speed_time),
        s3_anonymous=artifact.s3_anonymous,
        s3_no_verify_ssl=artifact.s3_no_verify_ssl,
        s3_addressing_style=artifact.s3_addressing_style,
        registry_auth_file=artifact.registry_auth_file,
        oci_platform=artifact.oci_platform,
        oci_path=artifact.oci_path,
        oci_plain_http=artifact.oci_plain_http,
    )


def selection(artifact: Artifact) -> Selection:
    return Selection(
        filename=artifact.filename,
        extract=artifact.extract,
        sha256=artifact.sha256,
        include=artifact.include,
        exclude=artifact.exclude,
    )


def open_source(artifact: Artifact) -> Source:
    source: Source = scheme_of(artifact.source).load()(artifact.source, connection(artifact), selection(artifact))
    return source


def _sums_connection(artifact: Artifact, location: str) -> Connection:
    """The source's connection for its --sha256sums URL, with --header and --bearer-token-file only
    when that URL is on the source's own origin (scheme, host and port): they are the source's
    credentials, and never go to another host (a hub token to a file server, say)."""
    from fetcher.sources.http import origin

    served_from = artifact.source
    if served_from.startswith("hf://"):  # the hub's files come from its endpoint
        from fetcher.sources.hub import hub_endpoint

        served_from = hub_endpoint()
    same = origin(location) == origin(served_from)
    found = connection(artifact)
    return found if same else dataclasses.replace(found, headers=(), bearer_token_file=None)


def read_sha256sums(artifact: Artifact) -> dict[str, str]:
    """--sha256sums, from a file, a URL or S3: read whole (it is small), then parsed strictly."""
    location = artifact.sha256sums
    assert location is not None
    where = f"--sha256sums {redact_url(location)}"
    if "://" not in location:
        try:
            with Path(location).open("rb") as file:
                data = file.read(MAX_SUMS_BYTES + 1)
        except OSError as exc:
            raise UsageError(f"{where}: cannot read it: {exc.strerror}") from None
    else:
        reader = scheme_of(location).load()(location, _sums_connection(artifact, location), Selection())
        try:
            with reader.open(Entry("sha256sums", None, None)) as body:
                data = b""
                for chunk in body.chunks:
                    data += chunk
                    if len(data) > MAX_SUMS_BYTES:
                        break
        finally:
            reader.close()
    if len(data) > MAX_SUMS_BYTES:
        raise UsageError(f"{where}: larger than {MAX_SUMS_BYTES // 2**20} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{where}: not UTF-8 text") from None
    return parse_sha256sums(text, where)
