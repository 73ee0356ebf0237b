"""How archive bytes become members: tar headers read strictly and within bounds, the format found
across compressed members, and every zip failure named by its member.

A corrupt archive must never be published as if it were whole: a tar stream ends only at its
end-of-archive blocks, with nothing but zeros after them. Every header read is bounded, whatever
the archive declares. Where GNU tar has a verdict on an archive, the tests hold it beside ours.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import random
import re
import subprocess
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from tests.conftest import Origin, make_tar, published, run_fetcher, run_measured, sha256, tree
from tests.hostile import (
    END,
    base256,
    gnu_long,
    gnu_tar_extracts,
    header,
    member,
    pax,
    record,
)

OLD = {"m/old.txt": b"the version already published\n"}
MiB = 1024 * 1024


def _fault(case: str, code: int = 5) -> pytest.MarkDecorator:
    return pytest.mark.fault(case, exit=code, area="archive")


def _publish_old(origin: Origin, dest: Path) -> None:
    run = run_fetcher("--source", origin.add("/old.tar.gz", make_tar(OLD)), "--dest", str(dest))
    assert run.code == 0, run.stderr


def _refused(origin: Origin, tmp_path: Path, body: bytes, *phrases: str, timeout: float = 60) -> str:
    """The whole promise for an archive that must be refused: exit 5, one line naming the cause,
    the old version untouched, nothing created beside dest."""
    dest = tmp_path / "dest"
    _publish_old(origin, dest)
    run = run_fetcher("--source", origin.add("/new", body), "--dest", str(dest), timeout=timeout)
    assert run.code == 5, run.stderr
    error = run.error
    assert "\n" not in error
    for phrase in phrases:
        assert phrase in error, error
    assert tree(dest) == OLD
    assert published(dest) == ["m", "m/old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["dest"]
    return error


def _accepted(origin: Origin, tmp_path: Path, body: bytes) -> dict[str, bytes]:
    dest = tmp_path / "dest"
    run = run_fetcher("--source", origin.add("/new", body), "--dest", str(dest), "--sha256", sha256(body))
    assert run.code == 0, run.stderr
    return tree(dest)


A = member("m/a.txt", b"alpha\n")
B = member("m/b.txt", b"bravo\n")
SECOND = len(A)  # offset of the second header


def _corrupt(block: bytes) -> bytes:
    return A + block + B + END


# --- where a tar stream may end -------------------------------------------------------------------

# (archive, phrases the refusal must hold, GNU tar's exit status on it)
ENDINGS = {
    "bad checksum in a later header": (
        _corrupt(header("m/c.txt", size=6, checksum="bad") + b"charly".ljust(512, b"\0")),
        ("checksum", f"offset {SECOND}"),
        2,
    ),
    "negative base-256 size (CVE-2025-8194)": (
        _corrupt(header("m/c.txt", size_field=base256(-512))),
        ("negative size", f"offset {SECOND}"),
        2,
    ),
    "a size written with a minus sign": (
        _corrupt(header("m/c.txt", size_field=b"-0000000001\0")),
        ("size", f"offset {SECOND}"),
        2,
    ),
    "a size with junk in its digits": (
        _corrupt(header("m/c.txt", size_field=b"0000_000001\0")),
        ("size", f"offset {SECOND}"),
        2,
    ),
    "a stream cut inside a header": (A + header("m/b.txt", size=6)[:300], ("truncated", f"offset {SECOND}"), 0),
    "a stream cut inside a member's data": (
        A + header("m/b.txt", size=6000) + b"x" * 1000,
        ("truncated", "m/b.txt"),
        2,
    ),
    "a stream that stops without its end-of-archive blocks": (A + B, ("end-of-archive", f"offset {2 * SECOND}"), 0),
    "a lone zero block followed by more members": (A + b"\0" * 512 + B + END, ("zero block", f"offset {SECOND}"), 0),
    "bytes after the end-of-archive blocks": (A + B + END + b"trailing junk", ("after", "end-of-archive"), 0),
}


@pytest.mark.parametrize(
    "case",
    [pytest.param(case, marks=_fault(f"tar: {case}")) for case in ENDINGS],
)
@pytest.mark.parametrize("compression", ["", "gz"])
def test_a_tar_stream_ends_only_at_its_end_of_archive_blocks(
    origin: Origin, tmp_path: Path, case: str, compression: str
) -> None:
    """Python's tarfile ended silently at a bad header past the first and the rest was published."""
    archive, phrases, gnu_status = ENDINGS[case]
    body = gzip.compress(archive) if compression else archive
    _refused(origin, tmp_path, body, *phrases)
    # Where GNU tar exits 0, it has extracted what came before the fault and ignored the rest
    # (a cut header, a missing end, members after a lone zero block, junk after the end): fetcher
    # refuses those too, since what it publishes must be the whole archive.
    assert gnu_tar_extracts(archive)[0] == gnu_status


@_fault("tar: one zero block and then the end of the stream, as GNU tar accepts", 0)
def test_a_lone_zero_block_at_the_very_end_is_accepted_like_gnu_tar(origin: Origin, tmp_path: Path) -> None:
    archive = A + B + b"\0" * 512
    status, files, said = gnu_tar_extracts(archive)
    assert status == 0 and "lone zero block" in said
    assert files == {"m/a.txt": b"alpha\n", "m/b.txt": b"bravo\n"}
    assert _accepted(origin, tmp_path, gzip.compress(archive)) == files


@_fault("tar: end-of-archive blocks followed by tape blocking (zeros only)", 0)
def test_zeros_after_the_end_of_archive_blocks_are_accepted(origin: Origin, tmp_path: Path) -> None:
    assert _accepted(origin, tmp_path, A + B + END + b"\0" * 20 * 512) == {"m/a.txt": b"alpha\n", "m/b.txt": b"bravo\n"}


# --- headers whose reading is bounded ---------------------------------------------------------


def _gzip_of(*parts: bytes | tuple[bytes, int]) -> bytes:
    """gzip of the parts, where (byte, n) stands for n copies of a byte: built without holding them."""
    compressor = zlib.compressobj(1, wbits=31)
    out = []
    for part in parts:
        if isinstance(part, bytes):
            out.append(compressor.compress(part))
            continue
        byte, count = part
        chunk = byte * MiB
        for _ in range(count // MiB):
            out.append(compressor.compress(chunk))
        out.append(compressor.compress(byte * (count % MiB)))
    return b"".join([*out, compressor.flush()])


def _huge_pax() -> bytes:
    """A 256 MiB pax header of one long record: a ~250 KB tar.gz."""
    size = 256 * MiB
    prefix = b"%d comment=" % size
    return _gzip_of(
        header(b"././@PaxHeader", type=b"x", size=size), prefix, (b"a", size - len(prefix) - 1), b"\n", A, END
    )


def _huge_gnu_long(kind: bytes) -> bytes:
    size = 256 * MiB
    return _gzip_of(header(b"././@LongLink", type=kind, size=size), (b"a", size), A, END)


HUGE = {
    "a pax header declaring 256 MiB": (_huge_pax, "pax header"),
    "a GNU long name declaring 256 MiB": (lambda: _huge_gnu_long(b"L"), "long name"),
    "a GNU long link target declaring 256 MiB": (lambda: _huge_gnu_long(b"K"), "long link"),
}


@pytest.mark.parametrize(
    "case",
    [pytest.param(case, marks=_fault(f"tar: {case} is refused within 100 MiB of memory")) for case in HUGE],
)
def test_memory_does_not_follow_what_a_header_declares(origin: Origin, tmp_path: Path, case: str) -> None:
    build, phrase = HUGE[case]
    body = build()
    assert len(body) < 2 * MiB
    dest = tmp_path / "dest"
    _publish_old(origin, dest)
    code, log, peak_kib = run_measured("--source", origin.add("/huge.tar.gz", body), "--dest", str(dest))
    assert code == 5, log
    assert phrase in log, log
    assert peak_kib < 100 * 1024, f"peak RSS {peak_kib // 1024} MiB"
    assert tree(dest) == OLD


LONG = b"m/" + b"/".join([b"d" * 60] * 3) + b"/w.bin"  # > 100 bytes, and a ustar prefix can hold it


@pytest.mark.parametrize(
    ("case", "archive", "phrases"),
    [
        pytest.param(
            case,
            archive,
            phrases,
            marks=_fault(f"tar: {case}"),
        )
        for case, archive, phrases in [
            ("a pax header over 1 MiB", pax(record("comment", "x" * (MiB + 1))) + A + END, ("pax header", "1 MiB")),
            ("a global pax header over 1 MiB", pax(record("comment", "x" * (MiB + 1)), type=b"g") + A + END, ("pax",)),
            ("a GNU long name over 64 KiB", gnu_long(b"n" * (64 * 1024 + 1)) + A + END, ("long name",)),
            (
                "a pax header with a negative size",
                header(b"././@PaxHeader", type=b"x", size_field=base256(-1)) + A + END,
                ("negative size",),
            ),
            ("a pax header whose data is cut", header(b"././@PaxHeader", type=b"x", size=4096), ("truncated",)),
            ("a pax path longer than 64 KiB", pax(record("path", "p" * (64 * 1024 + 1))) + A + END, ("path",)),
        ]
    ],
)
def test_every_header_read_is_bounded(origin: Origin, tmp_path: Path, case: str, archive: bytes, phrases) -> None:
    _refused(origin, tmp_path, gzip.compress(archive), *phrases)


# --- pax records: strict syntax -----------------------------------------------------------------

PAX_SYNTAX = {
    "a record longer than it says": b"10 path=m/abc.txt\n",
    "a record shorter than it says": b"40 path=m/x\n",
    "a record without '='": b"10 pathxx\n",
    "a record with an empty keyword": b"6 =abc\n",
    "a length that is not a number": b"1x path=m/x.txt\n",
    "a length with a sign": b"+17 path=m/x.txt\n",
    "a zero length (CVE-2019-20907: an infinite loop)": b"0 path=m/x.txt\n",
    "a length running past the header": record("path", "m/x.txt")[:-3],
    "junk after the last record": record("path", "m/x.txt") + b"junk",
    "a size that is negative": record("size", "-1"),
    "a size that is no number": record("size", "12abc"),
    "a size of 5000 digits (int() refuses past 4300)": record("size", "1" * 5000),
    "a size of 21 digits": record("size", "1" * 21),
    "a GNU sparse map": record("GNU.sparse.major", "1") + record("GNU.sparse.minor", "0"),
}


@pytest.mark.parametrize(
    "case",
    [pytest.param(case, marks=_fault(f"tar: pax header with {case}")) for case in PAX_SYNTAX],
)
def test_pax_records_are_read_strictly(origin: Origin, tmp_path: Path, case: str) -> None:
    archive = A + pax(PAX_SYNTAX[case]) + member("m/x.txt", b"x") + END
    phrase = "sparse" if "sparse" in case else "pax"
    error = _refused(origin, tmp_path, gzip.compress(archive), phrase)
    assert "sparse" in case or f"offset {SECOND}" in error


@pytest.mark.parametrize(
    ("case", "archive", "phrase"),
    [
        pytest.param(case, archive, phrase, marks=_fault(f"tar: {case}"))
        for case, archive, phrase in [
            ("a GNU sparse member ('S')", A + member("m/s.bin", b"s", type=b"S") + END, "sparse"),
            ("a GNU multi-volume continuation ('M')", A + member("m/v.bin", b"v", type=b"M") + END, "multi-volume"),
            ("an unknown member type", A + member("m/q.bin", b"q", type=b"Q") + END, "type"),
        ]
    ],
)
def test_members_fetcher_does_not_unpack_are_refused(origin: Origin, tmp_path: Path, case, archive, phrase) -> None:
    _refused(origin, tmp_path, gzip.compress(archive), phrase)


# --- what must still be read as GNU tar reads it ------------------------------------------------------


def _tarfile(members: dict[str, bytes], fmt: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _with_links(fmt: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
        info = tarfile.TarInfo(LONG.decode())
        info.size = 5
        archive.addfile(info, io.BytesIO(b"w8888"))
        link = tarfile.TarInfo("m/" + "l" * 150)
        link.type, link.linkname = tarfile.SYMTYPE, LONG.decode().removeprefix("m/")
        archive.addfile(link)
        hard = tarfile.TarInfo("m/" + "h" * 150)
        hard.type, hard.linkname = tarfile.LNKTYPE, LONG.decode()
        archive.addfile(hard)
    return buffer.getvalue()


GOOD = {
    "GNU long names and link targets ('L', 'K')": lambda: _with_links(tarfile.GNU_FORMAT),
    "pax path and linkpath": lambda: _with_links(tarfile.PAX_FORMAT),
    "pax names in UTF-8": lambda: _tarfile({"m/caf\u00e9-\u6a21\u578b.txt": b"utf8"}, tarfile.PAX_FORMAT),
    "a ustar name split into prefix and name": lambda: _tarfile({LONG.decode(): b"prefix"}, tarfile.USTAR_FORMAT),
    "a size in base-256": lambda: header("m/b.bin", size_field=base256(6)) + b"b256!\n".ljust(512, b"\0") + END,
    "a signed header checksum": lambda: member("m/\xe9t\xe9.txt".encode("latin-1"), b"old", checksum="signed") + END,
    "a pax size overriding the header's": lambda: (
        pax(record("size", "7")) + header("m/p.txt", size=0) + b"paxsize".ljust(512, b"\0") + END
    ),
    "a global pax header": lambda: pax(record("comment", "made by hand"), type=b"g") + A + END,
    "a v7 header without magic": lambda: member("m/v7.txt", b"seven", magic=b"") + END,
    "a name that is not UTF-8": lambda: member(b"m/\xff\xfe.bin", b"latin") + END,
    "a GNU volume label": lambda: header("backup 1", type=b"V") + A + END,
}


@pytest.mark.parametrize(
    "case",
    [pytest.param(case, marks=_fault(f"tar: {case} is unpacked as GNU tar unpacks it", 0)) for case in GOOD],
)
def test_what_gnu_tar_accepts_is_unpacked_the_same(origin: Origin, tmp_path: Path, case: str) -> None:
    archive = GOOD[case]()
    status, files, said = gnu_tar_extracts(archive)
    assert status == 0, said
    dest = tmp_path / "dest"
    run = run_fetcher("--source", origin.add("/ok", gzip.compress(archive)), "--dest", str(dest))
    assert run.code == 0, run.stderr
    found = {
        os.fsdecode(p.relative_to(dest)): p.read_bytes()
        for p in sorted(dest.rglob("*"))
        if p.relative_to(dest).parts[0] != ".fetcher" and p.is_file() and not p.is_symlink()
    }
    assert found == files
    links = [p for p in dest.rglob("*") if p.is_symlink()]
    assert all(p.read_bytes() == b"w8888" for p in links)


# --- the format, found across compressed members ------------------------------------------------

RAW = make_tar({"m/config.json": b'{"a": 1}\n', "m/weights.bin": b"\x00\x01" * 5000}, compression="")
EXPECTED = {"m/config.json": b'{"a": 1}\n', "m/weights.bin": b"\x00\x01" * 5000}


def _zst(*parts: bytes) -> bytes:
    return b"".join(zstandard.ZstdCompressor().compress(p) for p in parts)


SPLITS: dict[str, tuple[str, Callable[..., bytes]]] = {
    "gz": ("tar.gz", gzip.compress),
    "bz2": ("tar.bz2", bz2.compress),
    "xz": ("tar.xz", lzma.compress),
    "zst": ("tar.zst", lambda p: _zst(p)),
}


@pytest.mark.parametrize("kind", sorted(SPLITS))
@pytest.mark.parametrize(
    "cut",
    [
        pytest.param(0, marks=_fault("format: an empty first compressed member before the tar", 0)),
        pytest.param(100, marks=_fault("format: a first compressed member holding only a tar's first 100 bytes", 0)),
    ],
)
def test_the_format_is_found_across_compressed_members(origin: Origin, tmp_path: Path, kind: str, cut: int) -> None:
    fmt, compress = SPLITS[kind]
    body = compress(RAW[:cut]) + compress(RAW[cut:])
    dest = tmp_path / "dest"
    run = run_fetcher("--source", origin.add("/model", body), "--dest", str(dest), "--sha256", sha256(body))
    assert run.code == 0, run.stderr
    assert run.event("published")["format"] == fmt
    assert tree(dest) == EXPECTED


# --- zip: every failure is the archive's, named by its member ----------------------------------------


def _zip(name: str, data: bytes, method: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("m/fine.txt", b"fine")
        archive.writestr(zipfile.ZipInfo(name), data, compress_type=method)
    return buffer.getvalue()


def _headers(body: bytes, name: str) -> tuple[int, int]:
    """Offsets of ``name``'s local header and of its central directory record."""
    encoded = name.encode()
    local = next(m.start() for m in re.finditer(b"PK\x03\x04", body) if body[m.start() + 30 :].startswith(encoded))
    central = next(m.start() for m in re.finditer(b"PK\x01\x02", body) if body[m.start() + 46 :].startswith(encoded))
    return local, central


def _damage(body: bytes, name: str, at: int, replacement: bytes) -> bytes:
    """Overwrite ``name``'s stored (compressed) data from byte ``at`` on."""
    local, _ = _headers(body, name)
    start = local + 30 + int.from_bytes(body[local + 26 : local + 28], "little")
    start += int.from_bytes(body[local + 28 : local + 30], "little") + at
    return body[:start] + replacement + body[start + len(replacement) :]


def _patched(body: bytes, name: str, local_at: int, central_at: int, value: bytes, *, bits: bool = False) -> bytes:
    data = bytearray(body)
    local, central = _headers(body, name)
    for where in (local + local_at, central + central_at):
        if bits:
            data[where] |= value[0]
        else:
            data[where : where + len(value)] = value
    return bytes(data)


NOISE = bytes(range(256)) * 64
ZIPS = {
    # the general purpose flag's bit 0 says "encrypted"
    "an encrypted entry": lambda: _patched(
        _zip("m/w.bin", b"secret", zipfile.ZIP_STORED), "m/w.bin", 6, 8, b"\x01", bits=True
    ),
    "a corrupt deflate stream": lambda: _damage(
        _zip("m/w.bin", NOISE, zipfile.ZIP_DEFLATED), "m/w.bin", 0, b"\xff" * 8
    ),
    "a corrupt bzip2 stream": lambda: _damage(_zip("m/w.bin", NOISE, zipfile.ZIP_BZIP2), "m/w.bin", 4, b"\xff" * 8),
    "a corrupt lzma stream": lambda: _damage(_zip("m/w.bin", NOISE, zipfile.ZIP_LZMA), "m/w.bin", 4, b"\xff" * 5),
    "a bad CRC": lambda: _damage(_zip("m/w.bin", NOISE, zipfile.ZIP_STORED), "m/w.bin", 100, b"XXXXXXXX"),
    "an unsupported compression method": lambda: _patched(
        _zip("m/w.bin", NOISE, zipfile.ZIP_STORED), "m/w.bin", 8, 10, (99).to_bytes(2, "little")
    ),
}


@pytest.mark.parametrize(
    "case",
    [pytest.param(case, marks=_fault(f"zip: {case}")) for case in ZIPS],
)
def test_zip_failures_are_the_archives_and_name_the_member(origin: Origin, tmp_path: Path, case: str) -> None:
    error = _refused(origin, tmp_path, ZIPS[case](), "'m/w.bin'")
    assert "zip" in error


@_fault("tar: a pax header of 170,000 tiny records is read in linear time", 0)
def test_pax_records_are_parsed_in_linear_time(origin: Origin, tmp_path: Path) -> None:
    """CPython's tarfile once took quadratic time over crafted pax headers (CVE-2024-6232)."""
    payload = b"6 a=b\n" * (MiB // 6)
    archive = pax(payload) + pax(payload) + A + END
    dest = tmp_path / "dest"
    run = run_fetcher("--source", origin.add("/many.tar.gz", gzip.compress(archive)), "--dest", str(dest), timeout=30)
    assert run.code == 0, run.stderr
    assert tree(dest) == {"m/a.txt": b"alpha\n"}


def _broken_late(compressed: bytes) -> bytes:
    """Damage past the first bzip2 block (900 KB): the format is still found, the stream fails later."""
    at = len(compressed) * 85 // 100
    return compressed[:at] + bytes(b ^ 0x55 for b in compressed[at : at + 64]) + compressed[at + 64 :]


NOISY = {f"m/part-{i}.bin": bytes(range(256)) * 400 + random.Random(i).randbytes(400_000) for i in range(4)}
CHECKED = {**SPLITS, "zst": ("tar.zst", lambda p: zstandard.ZstdCompressor(write_checksum=True).compress(p))}


@pytest.mark.parametrize(
    "kind",
    [pytest.param(kind, marks=_fault(f"format: a tar.{kind} whose {kind} data is corrupt midway")) for kind in CHECKED],
)
def test_a_compressed_stream_corrupt_midway_is_the_archives_fault(origin: Origin, tmp_path: Path, kind: str) -> None:
    """bz2 reports bad data as an OSError: it must not be taken for a disk error (exit 6). (zstd can
    tell only with its frame checksum, which the zstd tool writes by default.)"""
    raw = make_tar(NOISY, compression="")
    error = _refused(origin, tmp_path, _broken_late(CHECKED[kind][1](raw)), "corrupt")
    # bzip2 checks a block's CRC after handing out its bytes: the tar reader may see the garbage first
    assert f"corrupt {kind} data" in error or (kind == "bz2" and "corrupt tar archive" in error)


def _listing(root: Path) -> dict[str, object]:
    """Every entry under root but fetcher's state: a file's bytes, a link's target, or "dir"."""
    found: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        relative = os.fsdecode(path.relative_to(root))
        if relative.split("/")[0] == ".fetcher":
            continue
        if path.is_symlink():
            found[relative] = ("symlink", os.readlink(path))
        elif path.is_dir():
            found[relative] = "dir"
        else:
            found[relative] = path.read_bytes()
    return found


@pytest.mark.parametrize("fmt", ["gnu", "oldgnu", "pax", "ustar", "v7"])
def test_archives_gnu_tar_writes_unpack_as_gnu_tar_unpacks_them(origin: Origin, tmp_path: Path, fmt: str) -> None:
    """Every format GNU tar writes, with sizes around the block, links, and names past 100 bytes."""
    source = tmp_path / "source"
    deep = "m/" + "/".join(["d" * 40] * 3) if fmt != "v7" else "m/deep"  # v7 has no room for long names
    (source / deep).mkdir(parents=True)
    for size in (0, 1, 511, 512, 513, 100_000):
        (source / deep / f"f{size}.bin").write_bytes(os.urandom(size))
    (source / "m/caf\u00e9.txt").write_bytes(b"utf-8 name")
    long_links = fmt in ("gnu", "oldgnu", "pax")  # ustar and v7 hold link targets of 100 bytes at most
    (source / "m/link").symlink_to(
        os.path.relpath(source / deep / "f1.bin", source / "m") if long_links else "hard.bin"
    )
    os.link(source / deep / "f513.bin", source / "m/hard.bin")
    archive = tmp_path / "a.tar.gz"
    subprocess.run(["tar", f"--format={fmt}", "-C", str(source), "-czf", str(archive), "m"], check=True)
    unpacked = tmp_path / "gnu"
    unpacked.mkdir()
    subprocess.run(["tar", "-xzf", str(archive), "-C", str(unpacked)], check=True)
    dest = tmp_path / "dest"
    body = archive.read_bytes()
    run = run_fetcher("--source", origin.add("/m.tar.gz", body), "--dest", str(dest), "--sha256", sha256(body))
    assert run.code == 0, run.stderr
    assert _listing(dest) == _listing(unpacked)


@_fault("format: a tar.bz2 corrupt in its first block is not saved as a compressed file")
def test_a_compressed_tar_corrupt_at_its_start_is_not_taken_for_a_compressed_file(
    origin: Origin, tmp_path: Path
) -> None:
    """bzip2 hands out a block's bytes before it checks the block's CRC: the garbage it gave for the
    first 1 KiB did not look like tar, so the archive was saved as a .bz2 file, exit 0."""
    compressed = bz2.compress(make_tar(NOISY, compression=""))
    at = 300_000  # inside the first block, past its header
    damaged = compressed[:at] + bytes(b ^ 0x55 for b in compressed[at : at + 64]) + compressed[at + 64 :]
    _refused(origin, tmp_path, damaged, "corrupt bz2 data")


FAST: dict[str, Callable[[bytes], bytes]] = {
    "gz": lambda data: gzip.compress(data, compresslevel=1),
    "bz2": lambda data: bz2.compress(data, compresslevel=1),
    "xz": lambda data: lzma.compress(data, preset=0),
    "zst": CHECKED["zst"][1],
}


@pytest.mark.parametrize("kind", sorted(FAST))
def test_a_large_compressed_file_that_is_no_tar_is_saved_as_it_came(origin: Origin, tmp_path: Path, kind: str) -> None:
    """Its start is inflated to check it, though the head ends in the middle of the stream."""
    body = FAST[kind](os.urandom(3 * MiB).hex().encode())
    assert len(body) > 2 * MiB
    dest = tmp_path / "dest"
    run = run_fetcher("--source", origin.add("/weights.bin.x", body), "--dest", str(dest), "--sha256", sha256(body))
    assert run.code == 0, run.stderr
    assert run.event("published")["format"] == "file"
    assert tree(dest) == {"weights.bin.x": body}


def _zip_of_many(count: int, name_length: int = 12) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(count):
            archive.writestr(f"m/{i:0{name_length}d}", b"")
    return buffer.getvalue()


@_fault("zip: an index (central directory) too large to hold in 100 MiB is refused before it is read")
def test_a_zip_index_is_bounded_before_zipfile_reads_it(origin: Origin, tmp_path: Path) -> None:
    """zipfile holds a zip's whole index in memory, ~600 bytes an entry: 200,000 empty entries
    (a 20 MB zip) took 112 MiB. The index's size is read from its end record and bounded first."""
    body = _zip_of_many(300_000)
    dest = tmp_path / "dest"
    _publish_old(origin, dest)
    code, log, peak_kib = run_measured("--source", origin.add("/many.zip", body), "--dest", str(dest))
    assert code == 5, log
    assert "central directory" in log and "4 MiB" in log, log
    assert peak_kib < 100 * 1024, f"peak RSS {peak_kib // 1024} MiB"
    assert tree(dest) == OLD


@_fault("zip64: an index declared past the bound in its zip64 end record is refused")
def test_a_zip64_index_is_bounded_too(origin: Origin, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(70_000):  # past 65535 entries: zipfile writes zip64 end records
            archive.writestr(f"m/{i:060d}", b"")
    body = bytearray(buffer.getvalue())
    end = body.rindex(b"PK\x05\x06")
    body[end + 12 : end + 16] = (100).to_bytes(4, "little")  # the classic end record lies; zipfile reads zip64's
    assert len(zipfile.ZipFile(io.BytesIO(bytes(body))).infolist()) == 70_000
    _refused(origin, tmp_path, bytes(body), "central directory", "4 MiB")


@_fault("zip: an index within the bound is unpacked", 0)
def test_a_zip_of_many_small_entries_within_the_bound_is_unpacked(origin: Origin, tmp_path: Path) -> None:
    body = _zip_of_many(2_000)
    dest = tmp_path / "dest"
    run = run_fetcher("--source", origin.add("/many.zip", body), "--dest", str(dest), "--sha256", sha256(body))
    assert run.code == 0, run.stderr
    assert len(tree(dest)) == 2_000


@_fault("tar: a file member with an empty name (GNU tar fails on it)")
def test_a_member_with_an_empty_name_is_refused(origin: Origin, tmp_path: Path) -> None:
    archive = A + member(b"", b"no name") + END
    assert gnu_tar_extracts(archive)[0] != 0
    _refused(origin, tmp_path, archive, "empty name")


@_fault("format: a v7 tar with a signed header checksum and high-bit bytes is unpacked, not saved raw", 0)
def test_a_v7_tar_with_a_signed_checksum_is_found_to_be_a_tar(origin: Origin, tmp_path: Path) -> None:
    archive = member("m/café.txt", b"v7\n", magic=b"", checksum="signed") + END
    assert gnu_tar_extracts(archive)[:2] == (0, {"m/café.txt": b"v7\n"})
    assert _accepted(origin, tmp_path, archive) == {"m/café.txt": b"v7\n"}
