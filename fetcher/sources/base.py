"""The one interface every source implements: resolve to a manifest, then open a byte range
of one of its objects and read chunks.

A source pins each object it first saw (ETag, S3 VersionId, file mtime, hub
commit), so a later range of a changed object fails with ``SourceChangedError``
instead of being stitched onto bytes of the old one. A source is handed the
settings it needs (``Connection``, ``Selection``), never the whole artifact.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fetcher.errors import TransientFetchError
from fetcher.manifest import SHA256, Digest, Entry, Manifest

CHUNK_SIZE = 1024 * 1024


class TooSlow(TransientFetchError):
    """Bytes arrive, but slower than the low-speed limit: retried, yet never counted as progress
    that refills the retry budget, or a trickle would be retried for ever."""


@dataclass(frozen=True)
class SpeedFloor:
    """curl's --low-speed-limit / --low-speed-time: the least a transfer must sustain.

    Only the time spent waiting for the network counts (a generator is paused while the
    pipeline takes a chunk), so a slow disk is never blamed on the server. The rate is
    judged over consecutive windows of ``period`` seconds of waiting.
    """

    limit: int  # bytes/s; 0: no floor
    period: float  # seconds

    def watch(self, chunks: Iterable[bytes], display: str) -> Iterator[bytes]:
        if self.limit <= 0:
            yield from chunks
            return
        source = iter(chunks)
        got, waited = 0, 0.0
        while True:
            began = time.monotonic()
            chunk = next(source, None)
            waited += time.monotonic() - began
            if chunk is None:
                return
            got += len(chunk)
            if waited >= self.period:
                if got < self.limit * waited:
                    raise TooSlow(
                        f"{display} averaged {got / waited:.0f} bytes/s over {waited:.1f} s, below --low-speed-limit "
                        f"{self.limit} bytes/s sustained for --low-speed-time {self.period:g} s"
                    )
                got, waited = 0, 0.0
            yield chunk


@dataclass(frozen=True)
class ObjectInfo:
    """What the source said about the whole object."""

    size: int | None
    content_type: str | None = None
    ranges: bool = False  # the source serves byte ranges, so parts can be fetched in parallel
    version: str | None = None  # ETag or S3 VersionId: identifies this exact object
    encoding: str | None = None  # a Content-Encoding the server applied anyway: the bytes are kept as sent
    digest: Digest | None = None  # a whole-object digest the source vouches for (S3 ChecksumSHA256)


@dataclass
class Body:
    """One response: the object's info and its bytes from ``offset`` on.

    ``offset`` is where the bytes really start: 0 when a server ignored the
    range and sent everything, which the caller then skips. ``partial`` says
    the server honoured the range exactly.
    """

    info: ObjectInfo
    offset: int
    chunks: Iterator[bytes]
    partial: bool = False


@dataclass(frozen=True)
class Connection:
    """How a source talks to its server: the settings a source needs, not the whole artifact."""

    headers: tuple[tuple[str, str], ...] = ()
    bearer_token_file: Path | None = None
    timeout: float = 30.0
    concurrency: int = 16
    floor: SpeedFloor = SpeedFloor(0, 60.0)
    s3_anonymous: bool = False
    s3_no_verify_ssl: bool = False
    s3_addressing_style: str = "auto"
    registry_auth_file: Path | None = None
    oci_platform: str | None = None  # None: linux and this node's architecture
    oci_path: str | None = None  # the model's directory in an ordinary image
    oci_plain_http: bool = False


@dataclass(frozen=True)
class Selection:
    """What of the source is wanted, and what vouches for it."""

    filename: str = "download"  # a single object's name in dest, unless it is unpacked
    extract: str = "auto"
    sha256: str | None = None
    sha256sums: dict[str, str] | None = None  # path -> digest, read from --sha256sums
    sums_origin: str = "--sha256sums"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def single(self, locator: str = "") -> Manifest:
        """The manifest of a source that names one object: a file to save, or an archive to unpack."""
        digest = Digest(SHA256, self.sha256, "--sha256") if self.sha256 else None
        entry = Entry(self.filename, None, digest, locator=locator, unpack=self.extract != "none")
        return Manifest((entry,), directory=False)


class Source(Protocol):
    """Where an artifact's objects come from: resolved to a manifest, then read object by object.

    Every object is read whole or from an offset, as often as needed. Once a source has
    seen an object, later reads of it are pinned to that version (ETag, VersionId,
    mtime): a changed object fails with ``SourceChangedError`` instead of being stitched
    onto bytes of the old one.
    """

    display: str  # the location with secrets masked, for logs and errors

    def resolve(self) -> Manifest:
        """The objects that make up the artifact now. Raise TransientFetchError for what is worth retrying."""
        ...

    def open(self, entry: Entry, start: int = 0, end: int | None = None) -> AbstractContextManager[Body]:
        """Read bytes ``start`` to ``end`` (exclusive; None: the end) of one object of the manifest."""
        ...

    def close(self) -> None: ...


class ObjectReader(Protocol):
    """One object, as a transfer reads it."""

    display: str

    def open(self, start: int = 0, end: int | None = None) -> AbstractContextManager[Body]: ...


class One:
    """One object of a source: what a transfer of that object is handed."""

    def __init__(self, source: Source, entry: Entry, directory: bool) -> None:
        self.source = source
        self.entry = entry
        self.display = f"{source.display.rstrip('/')}/{entry.path}" if directory else source.display

    def open(self, start: int = 0, end: int | None = None) -> AbstractContextManager[Body]:
        return self.source.open(self.entry, start, end)


def parse_content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """First byte, last byte and total size of "bytes 100-199/1000"; Nones if it is not one."""
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", (value or "").strip())
    if not match:
        return None, None, None
    total = match.group(3)
    return int(match.group(1)), int(match.group(2)), int(total) if total.isdigit() else None


def exact_range(first: int | None, last: int | None, start: int, end: int | None) -> bool:
    """Whether a response holds exactly bytes ``start``..``end`` as asked (no Content-Range: the whole object)."""
    if first is None:
        return start == 0 and end is None
    return first == start and (end is None or last == end - 1)
