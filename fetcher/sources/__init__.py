"""Sources by URL scheme; each module is imported only when its scheme is used."""

from __future__ import annotations

from fetcher.plan import Artifact
from fetcher.sources.base import Body, ObjectInfo, Source

__all__ = ["Body", "ObjectInfo", "Source", "open_source"]


def open_source(artifact: Artifact) -> Source:
    # Imported here so an HTTP fetch never pays for importing boto3.
    if artifact.scheme in ("http", "https"):
        from fetcher.sources.http import HttpSource

        return HttpSource(artifact)
    if artifact.scheme == "s3":
        from fetcher.sources.s3 import S3Source

        return S3Source(artifact)
    from fetcher.sources.file import FileSource

    return FileSource(artifact)
