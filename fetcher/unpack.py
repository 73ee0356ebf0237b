"""Write archive members into a staging tree, refusing anything unsafe.

Python 3.11.7's tarfile predates the 2025 filter fixes, so these checks are
our own and do not lean on ``filter="data"``. Every member goes through
``SafeTree``, whichever archive format it came from. It follows GNU tar
wherever that is safe, and refuses (exit 5, naming the member) where not:

- names must be relative, without ``..`` or NUL; ``--strip-components``
  counts components as GNU tar does (``.`` included), and a backslash is
  part of a name, not a separator;
- a member is created by walking its path one directory at a time from the
  staging root (``openat`` with ``O_NOFOLLOW``): nothing is created, not
  even a parent directory, through a symlink; GNU tar would follow the link;
- symlinks must resolve inside the root, and not into ``.fetcher``: each is
  resolved where it finally stands once the archive ends, because later
  members change what a link leads through; a ``..`` past a component the
  archive lacks is refused (in dest it may be another artifact's link), and
  so is a link taking more than MAX_LINK_WALK components to resolve (each
  costs a stat); hardlinks must name a file or
  symlink unpacked before them; devices and FIFOs are refused;
- a later member replaces an earlier one of the same name as in GNU tar
  (a directory only while it is empty);
- setuid, setgid and sticky bits are dropped;
- a member deeper than MAX_DEPTH (256) path components is refused: the
  tree is walked later by os.walk and shutil.rmtree, which recurse once per
  level (Python's limit is 1000 frames), and a walk holds an fd per level;
  no model needs such depth, and GNU tar's own limit is only PATH_MAX;
- member count and bytes written are capped (bytes as written, not as
  declared, so a lying header cannot slip a bomb through).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import threading
from collections import deque
from pathlib import Path
from typing import Protocol

from fetcher import STATE_DIR
from fetcher.diskwrite import DirectBuffer, FileWriter
from fetcher.errors import ArchiveError, FetcherError, local_error

COPY_CHUNK = 1024 * 1024  # file data moves in chunks of this size, as it arrives (archives reads by it too)
MAX_LINK_TARGET = 4096  # PATH_MAX: a longer symlink target is no real one
OPEN_DIRS = 256  # directory fds kept open between members
MAX_DEPTH = 256  # path components of a member: every walk of the tree (ours, publish's) recurses or holds fds per level
MAX_LINK_HOPS = 40  # the kernel's MAXSYMLINKS: past it a path resolves nowhere (ELOOP)
MAX_LINK_WALK = 4096  # path components one symlink may take to resolve, across all its hops
SHOWN_NAME = 200  # characters of a name a message shows; a longer one is shortened

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Errors that what the archive holds causes (a parent that is a file or a link, a name too long):
# anything else (no space, read-only, I/O) is the volume's.
_ARCHIVE_ERRNOS = {errno.ENOTDIR, errno.ELOOP, errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENAMETOOLONG}


_Entry = tuple[int, str | None] | None  # what a path holds: (mode, link target), or None for nothing


class Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


def show(name: str) -> str:
    """A member name fit for a one-line message: quoted, escaped (non-UTF-8 bytes as \\xNN), shortened."""
    size = len(os.fsencode(name))
    shown = name if len(name) <= SHOWN_NAME else f"{name[: SHOWN_NAME // 2]}...{name[-SHOWN_NAME // 4 :]}"
    quoted = re.sub(r"\\udc([89a-f][0-9a-f])", r"\\x\1", repr(shown))
    return quoted if shown is name else f"{quoted} ({size} bytes)"


class Stopped(Exception):
    """Another tree sharing the budget failed: this one stops too (not the error to report)."""


class Budget:
    """The bytes and members an unpack may still write, shared by trees filled at once (an image's layers).

    Bytes count as written, not as declared, so a lying header cannot slip a bomb through.
    """

    def __init__(self, max_size: int, max_members: int) -> None:
        self.max_size = max_size
        self.max_members = max_members
        self.written = 0
        self.members = 0
        self._stopped = False
        self._lock = threading.Lock()

    def member(self, count: int = 1) -> None:
        with self._lock:
            self._check_stopped()
            self.members += count
            if self.members > self.max_members:
                raise ArchiveError(f"archive has more than {self.max_members} members (--max-members)")

    def take(self, size: int) -> None:
        with self._lock:
            self._check_stopped()
            self.written += size
            if self.written > self.max_size:
                raise ArchiveError(f"archive unpacks to more than {self.max_size} bytes (--max-unpacked-size)")

    def stop(self) -> None:
        """Every tree on this budget fails at its next member or chunk."""
        with self._lock:
            self._stopped = True

    def _check_stopped(self) -> None:
        if self._stopped:
            raise Stopped


def check_links(root: Path) -> None:
    """Every symlink of a finished tree checked, as an unpacked archive's are (a tree the cache made again).

    Raises:
        ArchiveError: a symlink leads outside the tree, or into fetcher's state.
    """
    SafeTree(root, strip_components=0, budget=Budget(0, 0))._check_links()


class SafeTree:
    """A staging directory that only accepts safe members."""

    allow_empty = False  # one archive is the whole model: it may not be empty (an image's layer may)
    # Symlinks are resolved in the tree they end up in: a layer's own tree is not that tree (see fetcher.layers).
    check_links = True

    def __init__(
        self, root: Path, *, strip_components: int, budget: Budget, digests: dict[str, str] | None = None
    ) -> None:
        """``digests``: filled with each file's sha256 by its path in the tree, as it is written (the node
        cache keeps files by digest: hashed here, its bytes are not read back from the disk)."""
        self.root = root
        self._strip = strip_components
        self.budget = budget
        self.digests = digests
        self._root_fd: int | None = None
        self._dirs: dict[tuple[str, ...], int] = {}  # directories walked to, still open
        self._loose: int | None = None  # the last directory walked to, when the cache was full
        self._dir_modes: dict[tuple[str, ...], tuple[int, int, int]] = {}  # path: (mode, st_dev, st_ino)
        self._direct_buffer = DirectBuffer()
        self._name_max = 255
        self._path_max = 4096

    def __del__(self) -> None:
        self._close()

    # --- names ---------------------------------------------------------------

    def _parts(self, name: str, *, directory: bool = False, refused: str = "") -> list[str] | None:
        """The member's path inside the root after stripping, as components; None to skip it.

        As in GNU tar, runs of slashes separate components and ``.`` counts as
        one when stripping; only then are the ``.`` dropped. ``refused`` starts
        each message (a hardlink's target is named after the member).
        """

        def fail(why: str) -> ArchiveError:  # the message is made only when needed
            return ArchiveError(f"{refused or f'refused member {show(name)}'}: {why}")

        if "\0" in name:
            raise fail("NUL in its name")
        if name.startswith("/"):
            raise fail("absolute path")
        raw = [p for p in name.split("/") if p]
        if ".." in raw:
            raise fail("'..' in its path")
        if not raw and not directory and not self._strip:  # nothing stripped it away: GNU tar fails on it too
            raise fail("a file or link with an empty name")
        if len(raw) <= self._strip:
            return None
        raw = raw[self._strip :]
        if not directory and raw[-1] == ".":
            raise fail("a file cannot be named '.'")
        parts = [p for p in raw if p != "."]
        if parts and parts[0] == STATE_DIR:
            raise fail(f"{STATE_DIR} is fetcher's state directory")
        if len(parts) > MAX_DEPTH:
            raise fail(f"deeper than {MAX_DEPTH} path components")
        # Names the filesystem cannot hold are a property of the archive, not a disk failure.
        self._root()  # the limits are the staging volume's
        if any(len(os.fsencode(p)) > self._name_max for p in parts):
            raise fail(f"name too long for the filesystem (a component over {self._name_max} bytes)")
        if len(os.fsencode(os.path.join(self.root, *parts))) >= self._path_max:
            raise fail(f"path too long for the filesystem (PATH_MAX {self._path_max} bytes)")
        return parts

    def _count(self) -> None:
        self.budget.member()

    # --- walking the tree, one directory at a time ------------------------------

    def _root(self) -> int:
        if self._root_fd is None:
            try:
                os.makedirs(self.root, exist_ok=True)
                self._root_fd = os.open(self.root, _DIR_FLAGS)
                self._name_max = os.fpathconf(self._root_fd, "PC_NAME_MAX")
                self._path_max = os.fpathconf(self._root_fd, "PC_PATH_MAX")
            except OSError as exc:
                raise local_error(exc, "creating the staging directory") from None
        return self._root_fd

    def _close(self) -> None:
        self._forget(())
        self._drop_loose()
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None

    def _forget(self, prefix: tuple[str, ...]) -> None:
        """Close the open directories at and under ``prefix``: one was removed, or we are done."""
        for key in [k for k in self._dirs if k[: len(prefix)] == prefix]:
            os.close(self._dirs.pop(key))

    def _walk(self, parts: list[str], name: str, *, create: bool) -> int:
        """An fd of the directory that holds ``parts[-1]``, walked to without following any link.

        Missing directories are created on the way (as tar makes parents) when
        ``create``; a symlink or a file on the way is refused before anything
        below it exists. Directories walked through stay open for the members
        that follow (a few syscalls per member, not per component), up to
        OPEN_DIRS; past that, each is closed once the next is open, so a deep
        path holds no fd per level. The fd stays owned by the tree, valid
        until the next walk: do not close it.
        """
        key = tuple(parts[:-1])
        self._drop_loose()
        if (known := self._dirs.get(key)) is not None:
            return known
        if len(self._dirs) >= OPEN_DIRS:
            self._forget(())
        depth = len(key)
        while depth and key[:depth] not in self._dirs:
            depth -= 1
        fd = self._dirs[key[:depth]] if depth else self._root()
        start = depth  # resumed from the nearest open ancestor
        try:
            for depth in range(start, len(key)):
                part = key[depth]
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        where = show("/".join(key[: depth + 1]))
                        raise ArchiveError(f"refused member {show(name)}: {where} does not exist") from None
                    os.mkdir(part, 0o755, dir_fd=fd)
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    where = show("/".join(key[: depth + 1]))
                    if stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                        raise ArchiveError(
                            f"refused member {show(name)}: it would be written through the symlink {where}"
                        ) from None
                    raise ArchiveError(
                        f"refused member {show(name)}: {where}, on its path, is not a directory"
                    ) from None
                self._drop_loose()  # the directory before, if the cache had no room for it: passed now
                if len(self._dirs) < OPEN_DIRS:
                    self._dirs[key[: depth + 1]] = child
                else:
                    self._loose = child
                fd = child
        except OSError as exc:
            raise self._error(exc, name) from None
        return fd

    def _drop_loose(self) -> None:
        if self._loose is not None:
            os.close(self._loose)
            self._loose = None

    def _error(self, exc: OSError, name: str) -> FetcherError:
        """The member's fault (exit 5) or the volume's (exit 6), named by the member either way."""
        if exc.errno in _ARCHIVE_ERRNOS:
            return ArchiveError(f"refused member {show(name)}: {exc.strerror}")
        return local_error(exc, f"writing {show(name)}")

    def _clear(self, parent: int, leaf: str, parts: list[str], name: str, *, for_dir: bool = False) -> bool:
        """Make room for a member, as GNU tar does: whether a directory is already there (kept for a directory).

        A later member replaces an earlier one of the same name; a directory
        only while it is empty (GNU tar fails on a full one too).
        """
        try:
            info = os.stat(leaf, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(info.st_mode):
            if for_dir:
                return True
            try:
                os.rmdir(leaf, dir_fd=parent)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise ArchiveError(
                        f"refused member {show(name)}: it would replace a directory that is not empty"
                    ) from None
                raise
            self._dir_modes.pop(tuple(parts), None)
            self._forget(tuple(parts))
            return False
        if for_dir and stat.S_ISLNK(info.st_mode) and self._leads_to_directory(parts):
            raise ArchiveError(
                f"refused member {show(name)}: a directory over a symlink to a directory "
                "(GNU tar would keep the link and unpack through it)"
            )
        os.unlink(leaf, dir_fd=parent)
        return False

    # --- members -------------------------------------------------------------

    def add_dir(self, name: str, mode: int) -> None:
        self._count()
        parts = self._parts(name, directory=True)
        if not parts:  # stripped away, or the root itself ("./")
            return
        try:
            parent = self._walk(parts, name, create=True)
            try:
                os.mkdir(parts[-1], 0o755, dir_fd=parent)
            except FileExistsError:  # kept if a directory, else replaced, as GNU tar does
                if not self._clear(parent, parts[-1], parts, name, for_dir=True):
                    os.mkdir(parts[-1], 0o755, dir_fd=parent)
            info = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
        except OSError as exc:
            raise self._error(exc, name) from None
        self._dir_modes[tuple(parts)] = (stat.S_IMODE(mode) & 0o777 | 0o700, info.st_dev, info.st_ino)

    def add_file(self, name: str, mode: int, data: Readable) -> None:
        self._count()
        parts = self._parts(name)
        if parts is None:
            _drain(data)
            return
        if not parts:
            raise ArchiveError(f"refused member {show(name)}: a file cannot be the destination itself")
        try:
            parent = self._walk(parts, name, create=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                fd = os.open(parts[-1], flags, 0o600, dir_fd=parent)
            except FileExistsError:  # an earlier member of the same name: this one replaces it
                self._clear(parent, parts[-1], parts, name)
                fd = os.open(parts[-1], flags, 0o600, dir_fd=parent)
        except OSError as exc:
            raise self._error(exc, name) from None
        try:
            try:
                out = FileWriter(fd, self._direct_buffer)
                hasher = hashlib.sha256() if self.digests is not None else None
                while chunk := data.read(COPY_CHUNK):
                    self.budget.take(len(chunk))
                    out.write(chunk)
                    if hasher is not None:
                        hasher.update(chunk)
                out.close()
                if hasher is not None and self.digests is not None:
                    self.digests["/".join(parts)] = hasher.hexdigest()
                os.fchmod(fd, stat.S_IMODE(mode) & 0o777)
            finally:
                os.close(fd)
        except OSError as exc:
            raise local_error(exc, f"writing {show(name)}") from None

    def add_symlink(self, name: str, target: str) -> None:
        self._count()
        parts = self._parts(name)
        if parts is None:
            return
        if not parts:
            raise ArchiveError(f"refused member {show(name)}: a symlink cannot be the destination itself")
        if len(target) > MAX_LINK_TARGET:
            raise ArchiveError(f"refused member {show(name)}: symlink target longer than {MAX_LINK_TARGET} bytes")
        if not target or target.startswith("/") or "\0" in target:
            raise ArchiveError(f"refused member {show(name)}: symlink to absolute path {show(target)}")
        try:
            parent = self._walk(parts, name, create=True)
            self._clear(parent, parts[-1], parts, name)
            why = self.check_links and self._escapes(parts[:-1], target)  # at once, not only at the end: fail early
            if why:
                raise ArchiveError(f"refused member {show(name)}: symlink {show(target)} {why}")
            os.symlink(target, parts[-1], dir_fd=parent)
        except OSError as exc:
            raise self._error(exc, name) from None

    def add_hardlink(self, name: str, target: str) -> None:
        self._count()
        parts = self._parts(name)
        if parts is None:
            return
        if not parts:
            raise ArchiveError(f"refused member {show(name)}: a hardlink cannot be the destination itself")
        source = self._parts(target, refused=f"refused member {show(name)}: hardlink target {show(target)}")
        if not source:
            raise ArchiveError(f"refused member {show(name)}: hardlink to stripped member {show(target)}")
        not_before = f"refused member {show(name)}: hardlink to {show(target)}, which is not a file unpacked before it"
        try:
            source_parent = os.dup(self._walk(source, target, create=False))
        except ArchiveError:
            raise ArchiveError(not_before) from None
        except OSError as exc:
            raise self._error(exc, name) from None
        try:
            try:
                info = os.stat(source[-1], dir_fd=source_parent, follow_symlinks=False)
            except FileNotFoundError:
                raise ArchiveError(not_before) from None
            if not (stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode)):
                raise ArchiveError(not_before)
            parent = self._walk(parts, name, create=True)
            if source == parts or self._same(parent, parts[-1], info):
                return  # GNU tar's `tar cf m.tar d d/f`: f again, as a link to itself
            self._clear(parent, parts[-1], parts, name)
            os.link(source[-1], parts[-1], src_dir_fd=source_parent, dst_dir_fd=parent, follow_symlinks=False)
            if self.digests is not None and "/".join(source) in self.digests:
                self.digests["/".join(parts)] = self.digests["/".join(source)]
        except OSError as exc:
            raise self._error(exc, name) from None
        finally:
            os.close(source_parent)

    def refuse(self, name: str, what: str) -> None:
        raise ArchiveError(f"refused member {show(name)}: {what} are not allowed")

    def finish(self) -> None:
        """Check what only the whole tree can show, then apply directory modes.

        Every symlink is resolved where it finally stands: a link that was
        harmless when written can lead outside once a later member fills in
        a link it goes through (``x -> a/up/..``, then ``a/up -> ..``).
        Directory modes come last, so read-only directories did not block
        their children; each is applied to the directory it was asked for,
        through no link, or not at all if that directory is gone.
        """
        try:
            self._root()
            if self.check_links:
                self._check_links()
            if not self.allow_empty and not os.listdir(self._root()):
                after = f" after --strip-components {self._strip}" if self._strip else ""
                raise ArchiveError(f"the archive has nothing to unpack{after}: refusing to publish an empty model")
            self._apply_dir_modes()
        finally:
            self._close()

    # --- helpers ---------------------------------------------------------------

    def _check_links(self) -> None:
        def fail(exc: OSError) -> None:
            raise exc

        known: dict[str, _Entry] = {}  # the tree no longer changes: each path is looked at once

        try:
            for directory, dirs, files in os.walk(self.root, onerror=fail):
                base = os.path.relpath(directory, self.root).split(os.sep)
                base = [] if base == ["."] else base
                for entry in dirs + files:
                    path = os.path.join(directory, entry)
                    if os.path.islink(path):
                        target = os.readlink(path)
                        why = self._escapes(base, target, known)
                        if why:
                            member = "/".join([*base, entry])
                            raise ArchiveError(
                                f"refused member {show(member)}: symlink {show(target)} {why}, "
                                "with the members after it"
                            )
        except OSError as exc:
            raise local_error(exc, "checking the unpacked tree") from None

    def _escapes(self, base: list[str], target: str, known: dict[str, _Entry] | None = None) -> str | None:
        """Why a link in directory ``base`` to ``target`` is unsafe, resolved in the tree as it stands; or None.

        As the kernel resolves it, one component at a time, each link read
        and followed inside the root. Past a component staging cannot
        resolve (missing, or a file), a name is taken as written (it may
        exist later, in dest); but a ``..`` or a ``.fetcher`` there is
        refused: in dest that component may be another artifact's link (or
        the user's), so where it leads depends on what this check cannot see.
        At most MAX_LINK_WALK components are walked, across all hops: targets
        of ``d/../`` chains cost a stat each. ``known`` holds what was found
        at each path, for as long as the tree does not change (all of finish).
        """
        known = {} if known is None else known
        current = list(base)
        paths = ["/".join(base[: i + 1]) for i in range(len(base))]  # paths[i]: current[: i + 1] joined
        pending = deque(target.split("/"))
        hops = walked = 0
        missing: str | None = None  # the first component staging could not resolve
        while pending:
            part = pending.popleft()
            walked += 1
            if walked > MAX_LINK_WALK:
                return f"takes more than {MAX_LINK_WALK} path components to resolve, through its links"
            if part in ("", "."):
                continue
            if missing is not None:
                if part in ("..", STATE_DIR):
                    unseen = f"past {show(missing)}, which the archive does not hold as a directory"
                    if part == "..":
                        return f"goes up ('..') {unseen}: where it leads depends on what dest holds"
                    return f"may lead into {STATE_DIR}, fetcher's state directory, {unseen}"
                continue  # taken as written
            if part == "..":
                if not current:
                    return "leads outside the destination"
                current.pop()
                paths.pop()
                continue
            if not current and part == STATE_DIR:
                return f"leads into {STATE_DIR}, fetcher's state directory"
            relative = f"{paths[-1]}/{part}" if paths else part
            current.append(part)
            paths.append(relative)
            entry = known[relative] if relative in known else known.setdefault(relative, self._entry(relative))
            if entry is None:
                missing = relative
            elif entry[1] is not None:
                hops += 1
                if hops > MAX_LINK_HOPS:
                    return None  # a loop: it leads nowhere, in staging as in dest
                link = entry[1]
                if link.startswith("/"):
                    return f"leads through a symlink to the absolute path {show(link)}"
                current.pop()
                paths.pop()
                pending.extendleft(reversed(link.split("/")))
            elif not stat.S_ISDIR(entry[0]) and pending:
                missing = relative
        return None

    def _entry(self, relative: str) -> _Entry:
        """What is at ``relative`` (not followed): its mode and, for a link, its target; None if nothing."""
        try:
            info = os.stat(relative, dir_fd=self._root(), follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        link = os.readlink(relative, dir_fd=self._root()) if stat.S_ISLNK(info.st_mode) else None
        return info.st_mode, link

    def _leads_to_directory(self, parts: list[str]) -> bool:
        """Whether the link at ``parts`` resolves to a directory of the tree (never outside: links are checked)."""
        link = os.readlink("/".join(parts), dir_fd=self._root())
        if self._escapes(parts[:-1], link):
            return False
        return os.path.isdir(os.path.join(self.root, *parts))  # False on any OSError

    def _same(self, parent: int, leaf: str, source: os.stat_result) -> bool:
        try:
            info = os.stat(leaf, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return (info.st_dev, info.st_ino) == (source.st_dev, source.st_ino)

    def _apply_dir_modes(self) -> None:
        for parts in sorted(self._dir_modes, key=len, reverse=True):
            mode, device, inode = self._dir_modes[parts]
            try:
                parent = self._walk(list(parts), "/".join(parts), create=False)
                fd = os.open(parts[-1], _DIR_FLAGS, dir_fd=parent)
            except ArchiveError:
                continue  # gone, or no longer reached through directories alone: not ours to change
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    continue
                raise local_error(exc, "setting directory modes") from None
            try:
                info = os.fstat(fd)
                if (info.st_dev, info.st_ino) == (device, inode):
                    os.fchmod(fd, mode)
            except OSError as exc:
                raise local_error(exc, "setting directory modes") from None
            finally:
                os.close(fd)


def _drain(data: Readable) -> None:
    while data.read(COPY_CHUNK):
        pass
