"""Tar archives written block by block, for the headers tarfile will not produce.

Every helper returns raw bytes, so a test can build any header: a bad or
signed checksum, a base-256 or negative size, a pax record that lies about
its length, a GNU long name of any declared size, an archive that stops
short of its end-of-archive blocks.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

BLOCK = 512
END = b"\0" * (2 * BLOCK)  # the end-of-archive marker: two zero blocks


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % BLOCK)


def header(
    name: bytes | str,
    *,
    size: int = 0,
    type: bytes = b"0",
    mode: int = 0o644,
    linkname: bytes | str = b"",
    magic: bytes = b"ustar\x0000",
    prefix: bytes = b"",
    size_field: bytes | None = None,
    checksum: str = "unsigned",
) -> bytes:
    """One 512-byte header; ``size_field`` (12 bytes) replaces the octal size, ``checksum`` is
    "unsigned" (what tar writes), "signed" (what some old tars wrote) or "bad"."""
    name_bytes = os.fsencode(name) if isinstance(name, str) else name
    link_bytes = os.fsencode(linkname) if isinstance(linkname, str) else linkname
    block = bytearray(BLOCK)
    block[0:100] = name_bytes[:100].ljust(100, b"\0")
    block[100:108] = _octal(mode, 8)
    block[108:116] = _octal(0, 8)
    block[116:124] = _octal(0, 8)
    block[124:136] = size_field if size_field is not None else _octal(size, 12)
    block[136:148] = _octal(1_700_000_000, 12)
    block[148:156] = b" " * 8
    block[156:157] = type
    block[157:257] = link_bytes[:100].ljust(100, b"\0")
    block[257:265] = magic.ljust(8, b"\0")
    block[345:500] = prefix.ljust(155, b"\0")
    unsigned = sum(block)
    signed = unsigned - 256 * sum(1 for b in block if b >= 128)
    value = {"unsigned": unsigned, "signed": signed, "bad": unsigned + 1}[checksum]
    block[148:156] = b"%06o\0 " % value
    return bytes(block)


def member(name: bytes | str, data: bytes = b"", **fields: object) -> bytes:
    """A regular file: its header, its data, padding to the block."""
    fields.setdefault("size", len(data))
    return header(name, **fields) + padded(data)  # type: ignore[arg-type]


def record(key: str, value: bytes | str) -> bytes:
    """One pax record, ``"%d %s=%s\\n"``, whose length counts its own digits."""
    body = b" " + key.encode() + b"=" + (value.encode() if isinstance(value, str) else value) + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode() + body


def pax(payload: bytes, *, type: bytes = b"x", declared: int | None = None) -> bytes:
    """A pax extended header (``x``, or ``g`` for global) holding ``payload`` (records)."""
    return header(b"././@PaxHeader", type=type, size=len(payload) if declared is None else declared) + padded(payload)


def gnu_long(name: bytes, *, type: bytes = b"L", declared: int | None = None) -> bytes:
    """A GNU long name (``L``) or long link target (``K``) header and its data."""
    data = name + b"\0"
    size = len(data) if declared is None else declared
    return header(b"././@LongLink", type=type, size=size, magic=b"ustar  \0") + padded(data)


def base256(value: int, width: int = 12) -> bytes:
    """A number field in GNU's base-256: first byte 0x80 for positive, 0xff for negative."""
    if value >= 0:
        return b"\x80" + value.to_bytes(width - 1, "big")
    return b"\xff" + (256 ** (width - 1) + value).to_bytes(width - 1, "big")


def gnu_tar_extracts(archive: bytes) -> tuple[int, dict[str, bytes], str]:
    """GNU tar's verdict on an archive: its exit status, the files it wrote, what it said."""
    with tempfile.TemporaryDirectory() as where:
        path = Path(where) / "a.tar"
        path.write_bytes(archive)
        out = Path(where) / "out"
        out.mkdir()
        done = subprocess.run(["tar", "-xf", str(path), "-C", str(out)], capture_output=True, timeout=60)
        files = {
            os.fsdecode(p.relative_to(out)): p.read_bytes()
            for p in sorted(out.rglob("*"))
            if p.is_file() and not p.is_symlink()
        }
        return done.returncode, files, done.stderr.decode(errors="replace")
