"""Read an archive member by member and hand each member to SafeTree, refusing a corrupt one.

Tar is read by a header reader of our own, not tarfile's stream mode: Python
3.11's tarfile ends a stream silently at a bad header past the first (so a
corrupt archive looked whole), and reads pax and GNU long-name headers whole,
whatever size they declare. Here a stream ends only at a zero block with
nothing but zeros after it; every checksum is verified, every number parsed
strictly (sizes >= 0), every header read bounded; file data is passed on in
chunks, never held whole. Names reach SafeTree exactly as stored (bytes
decoded as UTF-8 with surrogateescape, like tarfile): SafeTree decides.

Zip, which needs random access, is read from its spool with zipfile; every
failure of zipfile or of a decompressor is mapped, in one table, to an
ArchiveError naming the member.
"""

from __future__ import annotations

import functools
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from fetcher.errors import ArchiveError, local_error
from fetcher.unpack import COPY_CHUNK, Readable, SafeTree

if TYPE_CHECKING:
    import zipfile  # imported when a zip is unpacked: it loads bz2 and lzma, which a tar or a file never needs

BLOCK = 512
MAX_PAX = 1024 * 1024  # a pax header holds names and a few numbers: this is already generous
MAX_NAME = 64 * 1024  # a name or link target, as a GNU long name or a pax value; SafeTree refuses past PATH_MAX
MAX_ZIP_INDEX = 4 * 1024 * 1024  # a zip's central directory: ~50 MiB of Python objects at most, ~40,000 entries
MAX_DIGITS = 20  # a pax number: 2**64 has 20 digits, and int() raises past 4300
ZERO_BLOCK = bytes(BLOCK)
_OCTAL = re.compile(rb" *([0-7]*) *")  # tar pads numbers with spaces; int() would also take signs and '_'
_HIGH = bytes(range(128))  # deleting these leaves the bytes a signed checksum counts negative

REGULAR = (b"0", b"\0", b"7")  # 7: contiguous file, a regular file everywhere but on a few old systems
NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # POSIX: no data follows these, whatever their size says
REFUSED = {
    b"3": "device files",
    b"4": "device files",
    b"6": "FIFOs",
    b"S": "GNU sparse files",
    b"M": "GNU multi-volume continuations",
}


def _corrupt(what: str, offset: int) -> ArchiveError:
    return ArchiveError(f"corrupt tar archive: {what} at offset {offset}")


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _field(raw: bytes) -> bytes:
    """A NUL-terminated string field."""
    return raw.split(b"\0", 1)[0]


def _number(raw: bytes, what: str, offset: int) -> int:
    """A numeric field: octal, or GNU's base-256 (first byte 0x80, or 0xff for a negative number)."""
    if raw[0] in (0x80, 0xFF):
        value = int.from_bytes(raw[1:], "big")
        return value - 256 ** (len(raw) - 1) if raw[0] == 0xFF else value
    match = _OCTAL.fullmatch(_field(raw))
    if match is None:
        raise _corrupt(f"bad {what} field {_field(raw)!r} in the header", offset)
    return int(match[1] or b"0", 8)


def _check(block: bytes, offset: int) -> None:
    """The header checksum, unsigned as POSIX has it or signed as some old tars wrote it (GNU takes both)."""
    stored = _number(block[148:156], "checksum", offset)
    rest = block[:148] + block[156:]
    unsigned = sum(rest) + 8 * 32  # the checksum field itself counts as spaces
    if stored not in (unsigned, unsigned - 256 * len(rest.translate(None, _HIGH))):
        raise _corrupt("bad header checksum", offset)


def is_header(block: bytes) -> bool:
    """Whether a 512-byte block passes the reader's own checksum test: format detection uses this one."""
    try:
        _check(block, 0)
    except ArchiveError:
        return False
    return True


class _Stream:
    """The tar stream, with the offset of everything read so far."""

    def __init__(self, stream: Readable) -> None:
        self._stream = stream
        self.offset = 0

    def read(self, size: int) -> bytes:
        data = self._stream.read(size)
        self.offset += len(data)
        return data

    def header(self) -> bytes:
        """The next 512-byte block, or b"" where the stream ends."""
        block = self.read(BLOCK)
        start = self.offset - len(block)
        while block and len(block) < BLOCK:
            more = self.read(BLOCK - len(block))
            if not more:
                raise _corrupt("truncated: the stream ends inside a header", start)
            block += more
        return block

    def exact(self, size: int, what: str) -> bytes:
        """``size`` bytes, or ArchiveError if the stream ends first (a short read is no end)."""
        start = self.offset
        parts = []
        while size > 0:
            data = self.read(min(size, COPY_CHUNK))
            if not data:
                raise _corrupt(f"truncated: the stream ends inside {what}", start)
            parts.append(data)
            size -= len(data)
        return b"".join(parts)

    def skip(self, size: int, what: str) -> None:
        while size > 0:
            size -= len(self.exact(min(size, COPY_CHUNK), what))


class _MemberData:
    """A file member's data, read in pieces of at most COPY_CHUNK (a short read is no end of it)."""

    def __init__(self, stream: _Stream, size: int, name: str) -> None:
        self._stream = stream
        self.remaining = size
        self._name = name

    def read(self, size: int = -1, /) -> bytes:
        want = min(self.remaining, COPY_CHUNK if size < 0 else size)
        if want <= 0:
            return b""
        data = self._stream.read(want)
        if not data:
            raise _corrupt(f"truncated: the stream ends inside the data of member {self._name!r}", self._stream.offset)
        self.remaining -= len(data)
        return data


@dataclass
class _Pax:
    """What fetcher uses of pax records (other keys are read and dropped, so memory stays bounded)."""

    values: dict[str, bytes] = field(default_factory=dict)  # path, linkpath, size; b"" undoes a global value
    sparse: bool = False

    def update(self, other: _Pax) -> None:
        self.values.update(other.values)
        self.sparse = self.sparse or other.sparse


def _pax_records(data: bytes, offset: int) -> Iterator[tuple[bytes, bytes]]:
    """Records ``"%d %s=%s\\n"``, each exactly as long as it says; anything else is corrupt."""
    data = data.rstrip(b"\0")  # some writers pad the data; a record itself ends with a newline
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 21)
        if space < 0 or not data[pos:space].isdigit():
            raise _corrupt("bad pax header: a record without its length", offset)
        digits = data[pos:space]
        end = pos + int(digits)
        record = data[space + 1 : end]
        if end > len(data) or not record.endswith(b"\n"):
            raise _corrupt("bad pax header: a record does not end where its length says", offset)
        key, equals, value = record[:-1].partition(b"=")
        if not equals or not key:
            raise _corrupt("bad pax header: a record without 'keyword='", offset)
        yield key, value
        pos = end


def _parse_pax(data: bytes, offset: int) -> _Pax:
    pax = _Pax()
    for key, value in _pax_records(data, offset):
        if key in (b"path", b"linkpath"):
            if len(value) > MAX_NAME:
                raise _corrupt(f"pax {key.decode()} longer than {MAX_NAME} bytes", offset)
            pax.values[key.decode()] = value
        elif key == b"size":
            if value and not value.isdigit():
                raise _corrupt(f"bad pax size {value[:40]!r}", offset)
            if len(value) > MAX_DIGITS:
                raise _corrupt(f"a pax size of {len(value)} digits, more than {MAX_DIGITS},", offset)
            pax.values["size"] = value
        elif key.startswith(b"GNU.sparse."):
            pax.sparse = True
    return pax


@dataclass
class _Pending:
    """Headers that describe the next member: pax records, GNU long name and link target."""

    pax: _Pax = field(default_factory=_Pax)
    long_name: bytes | None = None
    long_link: bytes | None = None
    since: int | None = None  # offset of the first of them

    def __bool__(self) -> bool:
        return self.since is not None


def _read_meta(stream: _Stream, kind: bytes, size: int, offset: int, pending: _Pending, global_pax: _Pax) -> None:
    """A pax (x, g) or GNU long name (L, K) header's data, refused past its bound before it is read."""
    if kind in (b"x", b"g"):
        if size > MAX_PAX:
            raise _corrupt(f"a pax header of {size} bytes, more than {MAX_PAX // 1024 // 1024} MiB,", offset)
        data = stream.exact(size, "a pax header")
        stream.skip(-size % BLOCK, "a pax header")
        (pending.pax if kind == b"x" else global_pax).update(_parse_pax(data, offset))
        if kind == b"g":
            return
    else:
        what = "long name" if kind == b"L" else "long link target"
        if size > MAX_NAME + 1:  # the name and its NUL
            raise _corrupt(f"a GNU {what} of {size} bytes, more than {MAX_NAME // 1024} KiB,", offset)
        value = _field(stream.exact(size, f"a GNU {what}"))
        stream.skip(-size % BLOCK, f"a GNU {what}")
        if kind == b"L":
            pending.long_name = value
        else:
            pending.long_link = value
    if pending.since is None:
        pending.since = offset


@dataclass(frozen=True)
class _Member:
    name: str
    linkname: str
    kind: bytes
    mode: int
    size: int
    sparse: bool


def _member(block: bytes, offset: int, pending: _Pending, global_pax: _Pax) -> _Member:
    """The member a header describes, with the pax and GNU headers before it applied (pax wins, as in POSIX)."""
    name = _field(block[0:100])
    if block[257:263] == b"ustar\0":  # POSIX ustar: a long name is split into prefix and name
        prefix = _field(block[345:500])
        name = prefix + b"/" + name if prefix else name
    linkname = _field(block[157:257])
    size = _number(block[124:136], "size", offset)
    pax = _Pax()
    pax.update(global_pax)
    pax.update(pending.pax)
    name = pax.values.get("path") or pending.long_name or name
    linkname = pax.values.get("linkpath") or pending.long_link or linkname
    if pax.values.get("size"):
        size = int(pax.values["size"])
    return _Member(
        name=_text(name),
        linkname=_text(linkname),
        kind=block[156:157],
        mode=_number(block[100:108], "mode", offset) & 0o7777,
        size=size,
        sparse=pax.sparse,
    )


def _end(stream: _Stream, zero_at: int) -> None:
    """After the first zero block only zeros may follow: the end-of-archive blocks and tape blocking.

    GNU tar accepts a lone zero block at the very end (with a warning), and so do we; but where it
    stops at a lone zero block and ignores the members after it, or ignores bytes after the end, we
    refuse: what follows would be silently dropped from the model.
    """
    while data := stream.read(COPY_CHUNK):
        if data.count(0) != len(data):
            where = stream.offset - len(data.lstrip(b"\0"))
            if where < zero_at + 2 * BLOCK:
                raise _corrupt(f"a lone zero block at offset {zero_at} is followed by more data", where)
            raise ArchiveError(
                f"corrupt tar archive: data at offset {where}, after the end-of-archive blocks"
                f" at offset {zero_at}: only zeros may follow them"
            )


def unpack_tar(source: Readable, tree: SafeTree) -> None:
    """Unpack a tar stream member by member, as it arrives; refuse it unless it is whole."""
    stream = _Stream(source)
    pending = _Pending()
    global_pax = _Pax()
    while True:
        offset = stream.offset
        block = stream.header()
        if not block:
            if pending:
                raise _corrupt("truncated: the stream ends after a pax or GNU header, before its member", offset)
            raise _corrupt("truncated: the stream ends without its end-of-archive blocks", offset)
        if block == ZERO_BLOCK:
            if pending:
                raise _corrupt(f"a pax or GNU header at offset {pending.since} has no member after it", offset)
            _end(stream, offset)
            break
        _check(block, offset)
        kind = block[156:157]
        if kind in (b"x", b"g", b"L", b"K"):
            size = _number(block[124:136], "size", offset)
            if size < 0:
                raise _corrupt(f"negative size {size} in the header", offset)
            _read_meta(stream, kind, size, offset, pending, global_pax)
            continue
        member = _member(block, offset, pending, global_pax)
        pending = _Pending()
        if member.size < 0:
            raise _corrupt(f"negative size {member.size} in the header of member {member.name!r}", offset)
        _unpack_member(stream, member, tree)
    tree.finish()


def _unpack_member(stream: _Stream, member: _Member, tree: SafeTree) -> None:
    """Hand one member to SafeTree, then move past whatever of its data SafeTree did not read."""
    name, kind = member.name, member.kind
    has_data = kind not in NO_DATA
    data = _MemberData(stream, member.size if has_data else 0, name)
    if member.sparse:
        tree.refuse(name, "GNU sparse files")
    elif kind in REGULAR and not name.endswith("/"):
        tree.add_file(name, member.mode, data)
    elif kind in REGULAR or kind == b"5":  # a regular file named with a trailing slash is a directory (GNU, v7)
        tree.add_dir(name, member.mode)
    elif kind == b"2":
        tree.add_symlink(name, member.linkname)
    elif kind == b"1":
        tree.add_hardlink(name, member.linkname)
    elif kind != b"V":  # a GNU volume label names the archive, not a member: GNU tar skips it too
        tree.refuse(name, REFUSED.get(kind, f"members of tar type {_text(kind)!r}"))
    if has_data:
        stream.skip(data.remaining + -member.size % BLOCK, f"the data of member {name!r}")


# --- zip -----------------------------------------------------------------------------------------


@functools.cache
def _zip_failures() -> tuple[tuple[type[Exception], str], ...]:
    """What each library failure while reading a zip means; the first class that matches wins."""
    import lzma
    import zipfile
    import zlib

    return (
        (zipfile.BadZipFile, "corrupt"),  # bad headers, a bad CRC-32, overlapping entries
        (NotImplementedError, "unsupported compression method"),
        (zlib.error, "corrupt deflate data"),
        (lzma.LZMAError, "corrupt lzma data"),
        (OSError, "corrupt bzip2 data"),  # bz2 says "Invalid data stream" as an OSError without errno
        (EOFError, "truncated compressed data"),
        (UnicodeDecodeError, "a name flagged UTF-8 that is not"),
    )


@functools.cache
def _zip_errors() -> tuple[type[Exception], ...]:
    return tuple(kind for kind, _ in _zip_failures())


def _zip_error(exc: Exception, name: str | None) -> Exception:
    if isinstance(exc, OSError) and exc.errno is not None:  # reading the spool itself failed
        return local_error(exc, "reading the zip archive in staging")
    meaning = next(what for kind, what in _zip_failures() if isinstance(exc, kind))
    where = f"member {name!r}" if name is not None else "its index"
    return ArchiveError(f"corrupt or unsupported zip archive: {where}: {meaning} ({exc})")


class _ZipData:
    """A zip member's data, whose library failures become the archive's (never taken for disk errors)."""

    def __init__(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
        self._name = info.filename
        if info.flag_bits & 0x1:
            raise ArchiveError(f"refused zip member {self._name!r}: encrypted entries are not supported")
        try:
            self._file: IO[bytes] = archive.open(info)
        except _zip_errors() as exc:
            raise _zip_error(exc, self._name) from exc

    def read(self, size: int = -1, /) -> bytes:
        try:
            return self._file.read(COPY_CHUNK if size < 0 else size)
        except _zip_errors() as exc:
            raise _zip_error(exc, self._name) from exc

    def close(self) -> None:
        self._file.close()


_END = b"PK\x05\x06"  # the end of central directory record, 22 bytes and a comment of up to 64 KiB
_ZIP64_LOCATOR = b"PK\x06\x07"  # 20 bytes, right before the end record
_ZIP64_END = b"PK\x06\x06"  # 56 bytes, right before the locator


def _index_size(file: IO[bytes]) -> int:
    """The central directory's size as the end records declare it (APPNOTE 4.3.14-16), found as
    zipfile finds them; 0 where there are none (zipfile will then say the file is no zip)."""
    size = file.seek(0, 2)
    file.seek(max(0, size - (22 + 0xFFFF + 20 + 56)))
    tail = file.read()
    at = len(tail) - 22 if tail[-22:].startswith(_END) and tail[-2:] == b"\0\0" else tail.rfind(_END)
    if at < 0 or len(tail) - at < 22:
        return 0
    declared = int.from_bytes(tail[at + 12 : at + 16], "little")
    locator = at - 20
    if locator >= 56 and tail.startswith(_ZIP64_LOCATOR, locator) and tail.startswith(_ZIP64_END, locator - 56):
        declared = max(declared, int.from_bytes(tail[locator - 56 + 40 : locator - 56 + 48], "little"))
    return declared


def _open_zip(path: Path) -> zipfile.ZipFile:
    """zipfile reads a zip's whole index into memory, ~12 times its size in objects: bound it first."""
    try:
        with path.open("rb") as file:
            index = _index_size(file)
    except OSError as exc:
        raise local_error(exc, "reading the zip archive in staging") from exc
    if index > MAX_ZIP_INDEX:
        raise ArchiveError(
            f"refused zip archive: its central directory (index) is {index} bytes, more than"
            f" {MAX_ZIP_INDEX // 1024 // 1024} MiB, which would all be held in memory"
        )
    import zipfile

    try:
        return zipfile.ZipFile(path)
    except _zip_errors() as exc:
        raise _zip_error(exc, None) from exc


def unpack_zip(path: Path, tree: SafeTree) -> None:
    """Unpack a zip that is already on disk and verified: zip needs random access."""
    archive = _open_zip(path)
    with archive:
        for info in archive.infolist():
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                data = _ZipData(archive, info)
                try:  # read no more than a name can be: SafeTree refuses what is too long
                    target = _text(data.read(MAX_NAME + 1))
                finally:
                    data.close()
                tree.add_symlink(info.filename, target)
            elif info.is_dir():
                tree.add_dir(info.filename, mode or 0o755)
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
                tree.refuse(info.filename, "device files and FIFOs")
            else:
                data = _ZipData(archive, info)
                try:
                    tree.add_file(info.filename, mode or 0o644, data)
                finally:
                    data.close()
    tree.finish()
