"""Bytes in, a staging tree out: hash, decompress and unpack as the bytes arrive.

The hash is taken over exactly the bytes the source sent, before anything
else sees them. The format is decided from the first bytes, never from the
URL. Tar archives, compressed or not, are unpacked straight from the stream;
only zip, which needs its central directory at the end, is spooled to disk
first. After unpacking, whatever the archive reader left unread is still
read and hashed (a tar reader reads to the end itself: only zeros may follow
a tar).
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from fetcher.channel import Channel, produce_in_thread
from fetcher.errors import ArchiveError, IntegrityError, local_error
from fetcher.spool import FILE_MODE, ArtifactSpool
from fetcher.unpack import Budget, Readable, SafeTree, Stopped

if TYPE_CHECKING:
    import zstandard

# The decompressors (zlib-ng, zstandard, bz2, lzma) are imported when a stream needs one, and the archive
# readers (fetcher.archives) when one is looked for: a directory's files, fetched or found in the node
# cache, need neither; a plain file needs only the tar header check.


@functools.cache
def _corrupt() -> tuple[type[BaseException], ...]:
    """What a decompressor raises on bad data."""
    import lzma
    import zlib

    import zstandard
    from zlib_ng import zlib_ng

    return (
        zlib.error,
        cast("type[Exception]", zlib_ng.error),  # its stub declares an instance; it is a class
        lzma.LZMAError,
        zstandard.ZstdError,
        EOFError,
        OSError,  # bz2 reports bad data as OSError; fetcher's own errors are not OSErrors
    )


READ_SIZE = 1024 * 1024
HASHED_DEPTH = 2  # chunks between the hasher and the format detection and unpacking
DECOMPRESSED_DEPTH = 2  # blocks of up to READ_SIZE between the inflater and the unpacker
LAYERS = "layers"  # staging/layers/N: each tar layer's own tree; what the merge leaves goes with staging
SNIFF_BYTES = 1024 * 1024  # a whole bzip2 block, or a zstd frame header and first block
PEEK_STEP = 4096  # compressed bytes fed at a time when looking inside the head
CHECK_BUDGET = 64 * 1024 * 1024  # bytes inflated (and dropped) at most to check the head of a compressed file
CHECK_MEMBERS = 64  # compressed members checked at most in the head (each costs a copy of the rest)

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
    members: int = 0  # what the unpack counted against --max-members and --max-unpacked-size
    unpacked: int = 0


class ChunkReader(io.RawIOBase):
    """A readable, peekable file over an iterator of chunks.

    A read that wants at least a whole chunk gets that chunk itself, not a copy:
    on the hot path bytes are copied only where a stage must. Reads are
    locked: after a failure, a stage thread still reading may overlap the
    drain that finishes the hash.
    """

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self._head = b""  # the chunk being read, from self._pos on
        self._pos = 0
        self._lock = threading.Lock()
        self._error: BaseException | None = None

    def _pull(self) -> bytes | None:
        """The next chunk; an error from upstream is raised again to every later reader, never lost."""
        if self._error is not None:
            raise self._error
        try:
            return next(self._chunks, None)
        except BaseException as exc:
            self._error = exc
            raise

    def peek(self, size: int) -> bytes:
        with self._lock:
            return self._peek(size)

    def _peek(self, size: int) -> bytes:
        parts = [self._head[self._pos :]]
        have = len(parts[0])
        while have < size and (chunk := self._pull()) is not None:
            parts.append(chunk)
            have += len(chunk)
        self._head, self._pos = b"".join(parts), 0
        return self._head[:size]

    def readable(self) -> bool:
        return True

    def readinto(self, target: memoryview | bytearray) -> int:  # type: ignore[override]
        data = self.read(len(target))
        target[: len(data)] = data
        return len(data)

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            return self.readall()
        with self._lock:
            return self._read(size)

    def _read(self, size: int) -> bytes:
        if self._pos >= len(self._head):
            chunk = self._pull()
            if chunk is None:
                return b""
            self._head, self._pos = chunk, 0
        if self._pos == 0 and len(self._head) <= size:
            data, self._head = self._head, b""
            return data
        data = self._head[self._pos : self._pos + size]
        self._pos += len(data)
        return data

    def drain(self) -> None:
        """Read the rest, so that whoever hashes the stream has seen every byte."""
        with self._lock:
            self._head, self._pos = b"", 0
            while self._pull() is not None:
                pass


class Digest:
    """SHA-256 and length of everything the source sent, taken before anything else sees it."""

    def __init__(self, on_bytes: Callable[[int], None] | None = None) -> None:
        self._hash = hashlib.sha256()
        self._on_bytes = on_bytes
        self.size = 0

    def __call__(self, chunk: bytes) -> None:
        self._hash.update(chunk)
        self.size += len(chunk)
        if self._on_bytes is not None:
            self._on_bytes(len(chunk))

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class _Decompressor(Protocol):
    def decompress(self, data: bytes, max_length: int = ..., /) -> bytes: ...

    @property
    def eof(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...


def decompressed(raw: Readable, kind: str) -> Iterator[bytes]:
    """The decompressed stream in blocks; concatenated members (pigz, cat a.gz b.gz) are joined."""
    try:
        if kind == "zst":
            import zstandard

            reader = zstandard.ZstdDecompressor().stream_reader(
                raw,  # type: ignore[arg-type]
                read_size=READ_SIZE,
                read_across_frames=True,
            )
            while block := reader.read(READ_SIZE):
                yield block
            return
        pending = b""
        while True:
            data = pending or raw.read(READ_SIZE)
            if not data:
                return
            if not data.strip(b"\0"):  # zeros after the last member (tape-style padding): gzip ignores them too
                _expect_only_zeros(raw, kind)
                return
            decompressor = _new_decompressor(kind)
            while True:
                yield from _bounded(decompressor, data)
                if decompressor.eof:
                    pending = decompressor.unused_data
                    break
                data = raw.read(READ_SIZE)
                if not data:
                    raise ArchiveError(f"truncated {kind} data")
    except _corrupt() as exc:
        raise ArchiveError(f"corrupt {kind} data: {exc}") from None


def _expect_only_zeros(raw: Readable, kind: str) -> None:
    while data := raw.read(READ_SIZE):
        if data.strip(b"\0"):
            raise ArchiveError(f"corrupt {kind} data: unexpected bytes after zero padding")


def _bounded(decompressor: Any, data: bytes) -> Iterator[bytes]:
    """Feed ``data``, never producing more than READ_SIZE at once: a bomb cannot balloon memory."""
    if hasattr(decompressor, "unconsumed_tail"):  # zlib; bz2 and lzma use needs_input
        while data and not decompressor.eof:
            if block := decompressor.decompress(data, READ_SIZE):
                yield block
            data = decompressor.unconsumed_tail
        return
    if block := decompressor.decompress(data, READ_SIZE):
        yield block
    while not decompressor.eof and not decompressor.needs_input:
        if block := decompressor.decompress(b"", READ_SIZE):
            yield block


def _new_decompressor(kind: str) -> _Decompressor:
    if kind == "gz":
        # zlib-ng: the fastest on weight-like data here: 487 MB/s, isal 450, zlib 329 (bench/inflaters.py)
        from zlib_ng import zlib_ng

        return zlib_ng.decompressobj(wbits=31)
    if kind == "bz2":
        import bz2

        return bz2.BZ2Decompressor()
    import lzma

    return lzma.LZMADecompressor()


def _looks_like_tar(block: bytes) -> bool:
    if len(block) < 512:
        return False
    if block[257:262] == b"ustar":
        return True
    from fetcher.archives import is_header

    return is_header(block[:512])  # the reader's check, signed checksums included (v7 tars with high-bit bytes)


def _peek_decompressed(head: bytes, kind: str) -> bytes:
    """Decompress the start of the stream on the side, to look inside without consuming it.

    A tar may begin in a later member (``cat empty.gz model.tar.gz``, or a first member that holds
    only a few bytes): members are decompressed in turn until a header's worth is there, or the head ends.
    """
    want = 1024
    try:
        if kind == "zst":
            return _zst_reader(head).read(want)
        out = b""
        pos = 0
        while len(out) < want and head.startswith(MAGIC[kind], pos):
            decompressor = _new_decompressor(kind)
            # fed in small pieces: what is left over at a member's end is copied, and members can be tiny
            while not decompressor.eof and len(out) < want and pos < len(head):
                piece = head[pos : pos + PEEK_STEP]
                out += decompressor.decompress(piece, want - len(out))
                pos += len(piece) - len(decompressor.unused_data)
            if not decompressor.eof:
                break
        return out
    except _corrupt() as exc:
        raise ArchiveError(f"corrupt {kind} data at the start of the stream: {exc}") from None


def _zst_reader(head: bytes) -> zstandard.ZstdDecompressionReader:
    import zstandard

    return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(head), read_across_frames=True)


def _check_start(head: bytes, kind: str) -> None:
    """Inflate all of the head, discarding it, before calling the stream a compressed file.

    bzip2 hands out a block's bytes before it checks the block's CRC: a .tar.bz2 corrupt in its
    first block gave garbage that did not look like tar, and was saved as a .bz2 file.
    """
    budget = CHECK_BUDGET
    try:
        if kind == "zst":
            reader = _zst_reader(head)
            while budget > 0 and (block := reader.read(READ_SIZE)):
                budget -= len(block)
            return
        pos = 0
        for _member in range(CHECK_MEMBERS):
            if not head.startswith(MAGIC[kind], pos):
                return
            decompressor = _new_decompressor(kind)
            for block in _bounded(decompressor, head[pos:]):
                budget -= len(block)
                if budget <= 0:
                    return
            if not decompressor.eof:
                return
            pos = len(head) - len(decompressor.unused_data)
    except _corrupt() as exc:
        raise ArchiveError(f"corrupt {kind} data at the start of the stream: {exc}") from None


def detect(head: bytes) -> str:
    """The format from the first bytes: tar[.gz|.bz2|.xz|.zst], zip or file."""
    if head.startswith(MAGIC["zip"]) or head.startswith(MAGIC["zip-empty"]):
        return "zip"
    for kind in ("gz", "bz2", "xz", "zst"):
        if head.startswith(MAGIC[kind]):
            if _looks_like_tar(_peek_decompressed(head, kind)):
                return f"tar.{kind}"
            _check_start(head, kind)
            return "file"
    return "tar" if _looks_like_tar(head[:512]) else "file"


def detect_format(head: bytes, extract: str) -> str:
    """What the data will be treated as, given --extract."""
    if extract == "auto":
        return detect(head)
    return "file" if extract == "none" else extract


def _check_declared(head: bytes, extract: str) -> None:
    """An explicit --extract must match the data; say what arrived instead."""
    if extract == "tar":
        return
    if extract == "zip":  # data may precede a zip (self-extracting): refuse only what is clearly another format
        found = detect(head)
        if found == "file":  # a compressed stream that holds no tar is still clearly no zip
            found = next((kind for kind in ("gz", "bz2", "xz", "zst") if head.startswith(MAGIC[kind])), found)
        if found not in ("zip", "file"):
            raise ArchiveError(f"--extract zip, but the data is not zip (it looks like: {found})")
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
    spool: ArtifactSpool | None = None,
    spooled: Callable[[], bool] = lambda: False,
    digests: dict[str, str] | None = None,
) -> Outcome:
    """Turn the source's bytes into files under ``staging/tree``; return the digest.

    Hashing runs in a thread of its own between the download and the rest,
    so that it overlaps both the network and the writing of files.

    ``spooled`` says when the download goes through ``spool``, which then holds all of
    the bytes by the end: a plain file is moved from there, not written again.
    ``digests``: filled with the sha256 of each file an archive unpacks to (see ``SafeTree``).
    """
    digest = Digest(on_bytes)

    def hash_and_pass(channel: Channel) -> None:
        for chunk in chunks:
            digest(chunk)
            channel.put(chunk)

    hashed, _hasher = produce_in_thread(hash_and_pass, HASHED_DEPTH, "fetcher-hash")
    try:
        # On success the hasher has ended: the reader was drained to its end marker.
        adopt = _Adopt(spool, spooled)
        reader = ChunkReader(hashed)
        return _run(reader, digest, extract, filename, staging, limits, expected_sha256, adopt, digests)
    finally:
        hashed.close()  # on failure, the hasher stops at its next chunk, or when the download is closed


def _run(
    reader: ChunkReader,
    digest: Digest,
    extract: str,
    filename: str,
    staging: Path,
    limits: Limits,
    expected_sha256: str | None,
    adopt: _Adopt,
    digests: dict[str, str] | None,
) -> Outcome:
    from fetcher.archives import unpack_tar, unpack_zip

    root = staging / "tree"
    budget = Budget(limits.max_unpacked_size, limits.max_members)
    try:
        head = reader.peek(SNIFF_BYTES)
        fmt = detect_format(head, extract)
        if extract not in ("auto", "none"):
            _check_declared(head, extract)
        if fmt == "file":
            _save_file(reader, root / filename, adopt)
        else:
            tree = SafeTree(root, strip_components=limits.strip_components, budget=budget, digests=digests)
            if fmt == "zip":
                spooled = staging / "archive.zip"
                _spool(reader, spooled)
                _verify(digest, expected_sha256)  # never parse an unverified zip
                unpack_zip(spooled, tree)
                spooled.unlink()
            elif fmt == "tar":
                unpack_tar(reader, tree)
            else:
                _unpack_compressed_tar(reader, fmt.removeprefix("tar."), tree)
    except ArchiveError:
        # A corrupt archive is most often the wrong bytes: say so when the hash can tell.
        if expected_sha256 is not None:
            reader.drain()
            _verify(digest, expected_sha256)
        raise
    reader.drain()
    return Outcome(digest.hexdigest(), digest.size, fmt, budget.members, budget.written)


def unpack_layers(layers: list[tuple[Path, str]], staging: Path, limits: Limits) -> None:
    """A model artifact's verified tar layers (spooled), unpacked at the root of ``staging/tree``,
    within one budget of size and members; no two may hold one file (see ``fetcher.layers``).

    Raises:
        ArchiveError: a layer is no tar (plain, gzip or zstd), a member is unsafe, or two layers share a path.
        LocalFilesystemError: a layer cannot be read.
    """
    from fetcher.layers import LayerTree, MergedTree, merge_packed

    budget = Budget(limits.max_unpacked_size, limits.max_members)
    roots = _unpack_each(layers, staging, budget, lambda _, root: LayerTree(root, budget))
    merge_packed(roots, MergedTree(staging / "tree"))


def unpack_image(layers: list[tuple[Path, str]], subtree: str, staging: Path, limits: Limits) -> int:
    """An image's verified layers (spooled, bottom first) applied as one filesystem, of which only
    ``subtree`` lands in ``staging/tree`` (see ``fetcher.layers``); how many entries it kept.

    Raises:
        ArchiveError: a layer is no tar, a member is unsafe, or nothing is under ``subtree``.
    """
    from fetcher.layers import LayerTree, LayerView, MergedTree, merge_image

    budget = Budget(limits.max_unpacked_size, limits.max_members)
    views = [LayerView(subtree) for _ in layers]
    roots = _unpack_each(layers, staging, budget, lambda index, root: LayerTree(root, budget, views[index]))
    return merge_image(list(zip(roots, views, strict=True)), subtree, MergedTree(staging / "tree"))


def _unpack_each(
    layers: list[tuple[Path, str]], staging: Path, budget: Budget, make_tree: Callable[[int, Path], SafeTree]
) -> list[Path]:
    """Every layer into a tree of its own under ``staging/layers``, as many at once as there are cores.

    Why: inflating is what a layer costs, one core's work at 200-360 MB/s on weights
    (bench/results-oci.md, row modelcar), and zlib and zstd let go of the GIL; one layer
    after another left the other cores idle. The first failure stops the others (through
    the budget they share) and is raised.
    """
    roots = [staging / LAYERS / str(index) for index in range(len(layers))]
    workers = max(1, min(len(layers), len(os.sched_getaffinity(0))))
    failure: BaseException | None = None
    with ThreadPoolExecutor(workers, thread_name_prefix="fetcher-layer") as pool:
        futures = [
            pool.submit(_unpack_layer, path, what, make_tree(index, root))
            for index, ((path, what), root) in enumerate(zip(layers, roots, strict=True))
        ]
        for future in as_completed(futures):
            exc = future.exception()
            if exc is not None and not isinstance(exc, Stopped) and failure is None:
                failure = exc
                budget.stop()
    if failure is not None:
        raise failure
    return roots


def _unpack_layer(path: Path, what: str, tree: SafeTree) -> None:
    from fetcher.archives import unpack_tar

    try:
        with open(path, "rb") as file:
            reader = ChunkReader(iter(lambda: file.read(READ_SIZE), b""))
            fmt = detect(reader.peek(SNIFF_BYTES))
            if fmt == "tar":
                unpack_tar(reader, tree)
            elif fmt in ("tar.gz", "tar.zst"):
                _unpack_compressed_tar(reader, fmt.removeprefix("tar."), tree)
            else:
                raise ArchiveError(f"{what} is declared a tar layer but its bytes are {fmt}")
    except OSError as exc:
        raise local_error(exc, f"reading {what} from the download spool") from exc


def _unpack_compressed_tar(reader: ChunkReader, kind: str, tree: SafeTree) -> None:
    """Decompress in a thread of its own, so inflating overlaps writing files."""
    from fetcher.archives import unpack_tar

    def produce(channel: Channel) -> None:
        for block in decompressed(reader, kind):
            channel.put(block)

    channel, _thread = produce_in_thread(produce, DECOMPRESSED_DEPTH, "fetcher-decompress")
    try:
        tar_stream = ChunkReader(channel)
        unpack_tar(tar_stream, tree)
        tar_stream.drain()  # tar padding; this also lets the thread read the input to its end
    finally:
        # Not joined: on failure the thread may be waiting for bytes that never come; it ends once the
        # download is closed, and its reads share the reader safely with a caller finishing the hash.
        channel.close()


class _Spooled(Exception):
    """The download went through its spool after all: the file is there, no need to write it again."""


@dataclass(frozen=True)
class _Adopt:
    spool: ArtifactSpool | None
    spooled: Callable[[], bool]


class _UntilSpooled:
    def __init__(self, reader: ChunkReader, adopt: _Adopt) -> None:
        self._reader = reader
        self._adopt = adopt

    def read(self, size: int = -1, /) -> bytes:
        if self._adopt.spooled():
            raise _Spooled
        return self._reader.read(size)


def _save_file(reader: ChunkReader, target: Path, adopt: _Adopt) -> None:
    """Write a plain file as it arrives, or, once the download spools it, move the spool in place instead.

    The download decides to split only after its first part, when writing has begun:
    the few MiB written so far are dropped rather than the whole file written twice.
    """
    try:
        # A plain file is the download itself: no stripping, no unpack limits.
        tree = SafeTree(target.parent, strip_components=0, budget=Budget(2**63, 1))
        tree.add_file(target.name, FILE_MODE, _UntilSpooled(reader, adopt))
    except _Spooled:
        target.unlink(missing_ok=True)
        reader.drain()  # hash it; by its end, every byte is in the spool
        assert adopt.spool is not None
        adopt.spool.adopt(target)


def _spool(reader: ChunkReader, path: Path) -> None:
    try:
        with path.open("wb") as out:
            while chunk := reader.read(READ_SIZE):
                out.write(chunk)
    except OSError as exc:
        raise local_error(exc, "writing the zip archive to staging") from None


def _verify(digest: Digest, expected: str | None) -> None:
    if expected is not None and digest.hexdigest() != expected:
        raise IntegrityError(f"sha256 mismatch: expected {expected}, got {digest.hexdigest()} ({digest.size} bytes)")
