"""Bytes in, a staging tree out: hash, decompress and unpack as the bytes arrive.

The hash is taken over exactly the bytes the source sent, before anything
else sees them. The format is decided from the first bytes, never from the
URL. Tar archives, compressed or not, are unpacked straight from the stream;
only zip, which needs its central directory at the end, is spooled to disk
first. After unpacking, whatever the archive reader left unread (tar
padding, trailing bytes) is still read and hashed.
"""

from __future__ import annotations

import bz2
import hashlib
import io
import lzma
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

import zstandard

from fetcher.errors import ArchiveError, IntegrityError
from fetcher.unpack import Readable, SafeTree, local_error, unpack_tar, unpack_zip

READ_SIZE = 1024 * 1024
SNIFF_BYTES = 64 * 1024

MAGIC = {
    "gz": b"\x1f\x8b",
    "bz2": b"BZh",
    "xz": b"\xfd7zXZ\x00",
    "zst": b"\x28\xb5\x2f\xfd",
    "zip": b"PK\x03\x04",
    "zip-empty": b"PK\x05\x06",
}


@dataclass(frozen=True)
class Outcome:
    """What the pipeline produced in staging, and the digest of what it read."""

    sha256: str
    size: int
    format: str  # tar, tar.gz, ..., zip or file


class HashingReader(io.RawIOBase):
    """A readable, peekable view of a chunk iterator that hashes every byte it passes."""

    def __init__(self, chunks: Iterable[bytes], on_bytes: Callable[[int], None] | None = None) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self._buffer = bytearray()
        self._hash = hashlib.sha256()
        self._on_bytes = on_bytes
        self.size = 0

    def _pull(self) -> bool:
        chunk = next(self._chunks, None)
        if chunk is None:
            return False
        self._hash.update(chunk)
        self.size += len(chunk)
        if self._on_bytes is not None:
            self._on_bytes(len(chunk))
        self._buffer += chunk
        return True

    def peek(self, size: int) -> bytes:
        while len(self._buffer) < size and self._pull():
            pass
        return bytes(self._buffer[:size])

    def readable(self) -> bool:
        return True

    def readinto(self, target: memoryview | bytearray) -> int:  # type: ignore[override]
        if not self._buffer and not self._pull():
            return 0
        count = min(len(target), len(self._buffer))
        target[:count] = self._buffer[:count]
        del self._buffer[:count]
        return count

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            return self.readall()
        if not self._buffer and not self._pull():
            return b""
        if len(self._buffer) <= size:
            data = bytes(self._buffer)
            self._buffer.clear()
            return data
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def drain(self) -> None:
        """Read and hash the rest, so the digest covers every byte sent."""
        self._buffer.clear()
        while self._pull():
            self._buffer.clear()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class _Decompressor(Protocol):
    def decompress(self, data: bytes) -> bytes: ...


class DecompressingReader(io.RawIOBase):
    """A readable stream of the decompressed bytes; concatenated members are joined."""

    def __init__(self, raw: Readable, kind: str) -> None:
        self._raw = raw
        self._kind = kind
        self._pending = b""
        self._decompressor: _Decompressor | None = None
        self._zstd_reader: IO[bytes] | None = None
        if kind == "zst":
            self._zstd_reader = zstandard.ZstdDecompressor().stream_reader(
                raw,  # type: ignore[arg-type]
                read_size=READ_SIZE,
                read_across_frames=True,
            )

    def readable(self) -> bool:
        return True

    def _new(self) -> _Decompressor:
        if self._kind == "gz":
            return zlib.decompressobj(wbits=31)
        if self._kind == "bz2":
            return bz2.BZ2Decompressor()
        return lzma.LZMADecompressor()

    def read(self, size: int = -1) -> bytes:
        try:
            if self._zstd_reader is not None:
                return self._zstd_reader.read(size if size > 0 else READ_SIZE)
            return self._read(size if size > 0 else READ_SIZE)
        except (zlib.error, lzma.LZMAError, zstandard.ZstdError, EOFError, OSError) as exc:
            # bz2 reports bad data as OSError; fetcher's own errors are not OSErrors.
            raise ArchiveError(f"corrupt {self._kind} data: {exc}") from None

    def _read(self, size: int) -> bytes:
        while True:
            if self._decompressor is None:
                data = self._pending or self._raw.read(READ_SIZE)
                self._pending = b""
                if not data:
                    return b""
                self._decompressor = self._new()
            else:
                data = self._pending or self._raw.read(READ_SIZE)
                self._pending = b""
                if not data:
                    if not getattr(self._decompressor, "eof", True):
                        raise ArchiveError(f"truncated {self._kind} data")
                    return b""
            out = self._decompressor.decompress(data)
            if getattr(self._decompressor, "eof", False):
                self._pending = getattr(self._decompressor, "unused_data", b"")
                self._decompressor = None
            if out:
                return out

    def readinto(self, target: memoryview | bytearray) -> int:  # type: ignore[override]
        data = self.read(len(target))
        target[: len(data)] = data
        return len(data)


def _looks_like_tar(block: bytes) -> bool:
    if len(block) < 512:
        return False
    if block[257:262] == b"ustar":
        return True
    try:
        stored = int(block[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return False
    computed = sum(block[:148]) + 8 * 32 + sum(block[156:512])
    return stored == computed


def _peek_decompressed(head: bytes, kind: str) -> bytes:
    """Decompress the start of the stream on the side, to look inside without consuming it."""
    try:
        if kind == "gz":
            return zlib.decompressobj(wbits=31).decompress(head, 1024)
        if kind == "bz2":
            return bz2.BZ2Decompressor().decompress(head, 1024)
        if kind == "xz":
            return lzma.LZMADecompressor().decompress(head, 1024)
        return zstandard.ZstdDecompressor().decompressobj().decompress(head)[:1024]
    except (zlib.error, lzma.LZMAError, zstandard.ZstdError, OSError, EOFError) as exc:
        raise ArchiveError(f"corrupt {kind} data at the start of the stream: {exc}") from None


def detect(head: bytes) -> str:
    """The format from the first bytes: tar[.gz|.bz2|.xz|.zst], zip or file."""
    if head.startswith(MAGIC["zip"]) or head.startswith(MAGIC["zip-empty"]):
        return "zip"
    for kind in ("gz", "bz2", "xz", "zst"):
        if head.startswith(MAGIC[kind]):
            return f"tar.{kind}" if _looks_like_tar(_peek_decompressed(head, kind)) else "file"
    return "tar" if _looks_like_tar(head[:512]) else "file"


def _check_declared(head: bytes, extract: str) -> None:
    """An explicit --extract must match the data; say what arrived instead."""
    if extract in ("tar", "zip"):
        return
    kind = extract.removeprefix("tar.")
    if not head.startswith(MAGIC[kind]):
        found = detect(head)
        raise ArchiveError(f"--extract {extract}, but the data is not {kind} (it looks like: {found})")


@dataclass(frozen=True)
class Limits:
    strip_components: int
    max_unpacked_size: int
    max_members: int


def run(
    chunks: Iterable[bytes],
    *,
    extract: str,
    filename: str,
    staging: Path,
    limits: Limits,
    expected_sha256: str | None,
    on_bytes: Callable[[int], None] | None = None,
) -> Outcome:
    """Turn the source's bytes into files under ``staging/tree``; return the digest."""
    reader = HashingReader(chunks, on_bytes)
    root = staging / "tree"
    try:
        head = reader.peek(SNIFF_BYTES)
        fmt = detect(head) if extract == "auto" else ("file" if extract == "none" else extract)
        if extract not in ("auto", "none"):
            _check_declared(head, extract)
        if fmt == "file":
            # A plain file is the download itself: no stripping, no unpack limits.
            SafeTree(root, strip_components=0, max_size=2**63, max_members=1).add_file(filename, 0o644, reader)
        else:
            tree = SafeTree(
                root,
                strip_components=limits.strip_components,
                max_size=limits.max_unpacked_size,
                max_members=limits.max_members,
            )
            if fmt == "zip":
                spooled = staging / "archive.zip"
                _spool(reader, spooled)
                _verify(reader, expected_sha256)  # never parse an unverified zip
                unpack_zip(spooled, tree)
                spooled.unlink()
            else:
                kind = fmt.removeprefix("tar").lstrip(".")
                unpack_tar(DecompressingReader(reader, kind) if kind else reader, tree)
    except ArchiveError:
        # A corrupt archive is most often the wrong bytes: say so when the hash can tell.
        reader.drain()
        _verify(reader, expected_sha256)
        raise
    reader.drain()
    return Outcome(sha256=reader.hexdigest(), size=reader.size, format=fmt)


def _spool(reader: HashingReader, path: Path) -> None:
    try:
        with path.open("wb") as out:
            while chunk := reader.read(READ_SIZE):
                out.write(chunk)
    except OSError as exc:
        raise local_error(exc, "writing the zip archive to staging") from None


def _verify(reader: HashingReader, expected: str | None) -> None:
    if expected is not None and reader.hexdigest() != expected:
        raise IntegrityError(f"sha256 mismatch: expected {expected}, got {reader.hexdigest()} ({reader.size} bytes)")
