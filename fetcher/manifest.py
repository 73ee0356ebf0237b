"""The manifest: what an artifact is made of, resolved before anything is downloaded.

Every stage works from it. A single file or archive is a manifest of one
object (to unpack, or not); a directory (an S3 prefix, a Hugging Face repo, a
mounted folder) is a manifest of many objects saved as files. For each
object it says where it goes, how big it is, what digest it must have and
where that digest came from, and what pins it (an ETag, a VersionId, a commit).

Paths come from a bucket listing or a hub's API: they are checked here, in
one place, as strictly as tar members (exit 5 before anything is published).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from fetcher import STATE_DIR
from fetcher.errors import ArchiveError, FetchError, IntegrityError, UsageError
from fetcher.unpack import MAX_DEPTH, show

SHA256 = "sha256"
GIT_SHA1 = "sha1-git"  # the hub's id of a small file: sha1 of b"blob <size>\0" + the content
NAME_MAX = 255


@dataclass(frozen=True)
class Digest:
    """An expected digest and who vouches for it (shown in the dry-run plan and on mismatch)."""

    algorithm: str  # SHA256 or GIT_SHA1
    hex: str
    origin: str  # "--sha256", "--sha256sums", "the hub (LFS sha256)", "S3 ChecksumSHA256", ...

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


class Hasher:
    """The digest an object must match, computed over its bytes as they pass."""

    def __init__(self, algorithm: str, size: int | None) -> None:
        self.algorithm = algorithm
        self._sha = hashlib.sha1() if algorithm == GIT_SHA1 else hashlib.sha256()
        if algorithm == GIT_SHA1:
            self._sha.update(b"blob %d\0" % (size or 0))
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        self._sha.update(data)
        self.size += len(data)

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


@dataclass(frozen=True)
class Entry:
    """One object of an artifact."""

    path: str  # where it goes, relative to dest ("" for an archive unpacked into dest)
    size: int | None  # None: not known until the source answers
    digest: Digest | None  # None: unverified, unless the source vouches for one when it answers
    locator: str = ""  # what the source opens: a key, a repo path, a file path ("": the artifact's source)
    pin: str | None = None  # ETag, VersionId or commit: a later byte range must come from this version
    unpack: bool = False

    def describe(self) -> dict[str, Any]:
        shown: dict[str, Any] = {"path": self.path, "size": self.size}
        shown["checksum"] = f"{self.digest} (from {self.digest.origin})" if self.digest else "(none: unverified)"
        if self.unpack:  # a tar, not a file of that name: its members land at their own paths
            shown["unpacked"] = "at the root, its members at their own paths"
        return shown


@dataclass(frozen=True)
class Manifest:
    """The objects of an artifact and the identity of the version they were resolved from."""

    entries: tuple[Entry, ...]
    directory: bool
    identity: str | None = None  # a commit, a digest of the listing: equal identity, same files
    note: str | None = None  # what resolving had to decide, for the log ("took it as a directory")
    left_out: int = 0  # objects the source holds that --sha256sums or --include/--exclude left out
    image_subtree: str | None = None  # the entries are an image's layers: applied in order, this subtree kept

    @property
    def size(self) -> int | None:
        sizes = [entry.size for entry in self.entries]
        return None if any(size is None for size in sizes) else sum(s for s in sizes if s is not None)

    def with_entries(self, entries: Iterable[Entry]) -> Manifest:
        return replace(self, entries=tuple(entries))


# --- paths -----------------------------------------------------------------------


def relative_path(name: str, what: str) -> str:
    """A listed object's path in dest, normalised, or exit 5 naming it.

    Runs of ``/`` and ``.`` components are dropped, as a filesystem would read them;
    ``..``, absolute names, NUL and fetcher's state directory are refused, as in a tar.
    """

    def fail(why: str) -> ArchiveError:
        return ArchiveError(f"refused {what} {show(name)}: {why}")

    if "\0" in name:
        raise fail("NUL in its name")
    if name.startswith("/"):
        raise fail("absolute path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise fail("'..' in its path")
    if not parts:
        raise fail("an empty name")
    if parts[0] == STATE_DIR:
        raise fail(f"{STATE_DIR} is fetcher's state directory")
    if len(parts) > MAX_DEPTH:
        raise fail(f"deeper than {MAX_DEPTH} path components")
    if any(len(os.fsencode(part)) > NAME_MAX for part in parts):
        raise fail(f"a path component over {NAME_MAX} bytes")
    return "/".join(parts)


def check_layout(entries: Sequence[Entry], what: str) -> None:
    """Two objects may not land on one path, nor one object where another needs a directory.

    A path is what a directory's transfer knows each entry by, so a packed layer (whose
    name is no file: its members carry their own paths) may not share one either.
    """
    claimed: dict[str, str] = {}
    for entry in entries:
        if entry.path in claimed:
            raise ArchiveError(
                f"refused {what} {show(entry.locator)}: it lands on {show(entry.path)}, "
                f"as {show(claimed[entry.path])} does"
            )
        claimed[entry.path] = entry.locator
    files = {entry.path: entry.locator for entry in entries if not entry.unpack}
    for entry in entries:
        parts = entry.path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent in files:
                raise ArchiveError(
                    f"refused {what} {show(entry.locator)}: {show(parent)} is a file ({show(files[parent])})"
                )


# --- selection -------------------------------------------------------------------


def selected(path: str, include: Sequence[str], exclude: Sequence[str], *, directory: bool = False) -> bool:
    """huggingface_hub's allow_patterns / ignore_patterns, so patterns copied from there mean the same.

    fnmatch on the whole path (``*`` crosses ``/``, so ``*.json`` matches
    ``original/params.json``); a pattern ending in ``/`` means everything under
    it; exclude wins over include. A ``directory`` (a packed layer, whose files are
    not known before it arrives) is matched by its name too: ``tok``, ``tok/`` and
    ``tok/*`` all select it.
    """

    def matches(patterns: Sequence[str]) -> bool:
        normal = [p.replace("\\", "/") for p in patterns]  # as huggingface_hub: a backslash is a separator
        return any(fnmatch.fnmatchcase(n, p + "*" if p.endswith("/") else p) for p in normal for n in names)

    name = path.replace("\\", "/")
    names = (name, name + "/") if directory else (name,)

    return (not include or matches(include)) and not (exclude and matches(exclude))


# --- sha256sums ------------------------------------------------------------------

_SUMS_LINE = re.compile(r"(\\?)([0-9a-fA-F]{64}) [ *](.+)")
_SUMS_ESCAPES = {"\\": "\\", "n": "\n", "r": "\r"}  # what sha256sum escapes in a name, after a leading backslash
MAX_SUMS_BYTES = 64 * 2**20


def parse_sha256sums(text: str, where: str) -> dict[str, str]:
    """``sha256sum``'s output, as ``sha256sum -c`` reads it: path -> hex digest.

    ``HEX  path`` or ``HEX *path``, or ``\\HEX  path`` with the path's backslashes, newlines
    and carriage returns escaped (``\\\\``, ``\\n``, ``\\r``); a leading ``./`` is dropped; blank lines
    and ``#`` comments are skipped. Anything else is a usage error naming its line: a manifest
    that is misread would pin the wrong files.
    """
    sums: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _SUMS_LINE.fullmatch(line.rstrip("\r"))
        if match is None:
            raise UsageError(f"{where}: line {number} is not 'SHA256  path' as sha256sum writes it")
        path = match.group(3)
        if match.group(1):
            try:
                path = re.sub(r"\\(.)", lambda m: _SUMS_ESCAPES[m.group(1)], path)
            except KeyError:
                raise UsageError(f"{where}: line {number} has an escape sha256sum does not write") from None
        while path.startswith("./"):
            path = path[2:]
        try:
            path = relative_path(path, "path")
        except ArchiveError as exc:
            raise UsageError(f"{where}: line {number}: {exc}") from None
        if path in sums and sums[path] != match.group(2).lower():
            raise UsageError(f"{where}: line {number}: {show(path)} is listed twice with different digests")
        sums[path] = match.group(2).lower()
    if not sums:
        raise UsageError(f"{where}: lists no files")
    return sums


def pin_to_sums(entries: Sequence[Entry], sums: dict[str, str], origin: str, source: str) -> tuple[list[Entry], int]:
    """Exactly the files the manifest lists, each with its digest; how many the source had besides.

    A listed file the source lacks is an integrity failure: the source is not what was pinned.
    """
    by_path = {entry.path: entry for entry in entries}
    missing = [path for path in sums if path not in by_path]
    if missing:
        raise IntegrityError(
            f"{show(missing[0])} is listed in {origin} but missing from {source}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    pinned = [replace(by_path[path], digest=Digest(SHA256, hex_, origin)) for path, hex_ in sums.items()]
    return sorted(pinned, key=lambda entry: entry.path), len(entries) - len(pinned)


def listing_identity(entries: Iterable[Entry]) -> str:
    """One digest of what a listing said: the same files at the same versions give the same identity."""
    digest = hashlib.sha256()
    for entry in sorted(entries, key=lambda e: e.path):
        digest.update(f"{entry.path}\0{entry.size}\0{entry.pin}\0{entry.digest}\n".encode(errors="surrogateescape"))
    return "listing:" + digest.hexdigest()


def select(
    manifest: Manifest,
    include: Sequence[str],
    exclude: Sequence[str],
    sums: dict[str, str] | None,
    sums_origin: str,
    display: str,
) -> Manifest:
    """The directory's files the user asked for, pinned to --sha256sums when given."""
    if not manifest.directory:
        return manifest
    entries = [e for e in manifest.entries if selected(e.path, include, exclude, directory=e.unpack)]
    left_out = len(manifest.entries) - len(entries)
    if sums is not None:
        wanted = {path: hex_ for path, hex_ in sums.items() if selected(path, include, exclude)}
        entries, unlisted = pin_to_sums(entries, wanted, sums_origin, display)
        left_out += unlisted
    if not entries:
        if manifest.entries:
            raise UsageError(
                f"nothing to fetch: --include/--exclude leave out all {len(manifest.entries)} files of {display}"
            )
        raise FetchError(f"{display} holds no files")
    return replace(manifest, entries=tuple(entries), left_out=left_out)
