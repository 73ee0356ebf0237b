"""Write archive members into a staging tree, refusing anything unsafe.

Python 3.11.7's tarfile predates the 2025 filter fixes, so these checks are
our own and do not lean on ``filter="data"``. Every member goes through
``SafeTree``, whichever archive format it came from:

- names must be relative, without ``..`` or NUL, and stay inside the root
  once any symlink already written is resolved;
- symlinks must point inside the root; hardlinks must name a file already
  unpacked; devices and FIFOs are refused;
- setuid, setgid and sticky bits are dropped;
- member count and bytes written are capped (bytes as written, not as
  declared, so a lying header cannot slip a bomb through).
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
from pathlib import Path
from typing import Protocol

from fetcher.diskwrite import DirectBuffer, FileWriter
from fetcher.errors import ArchiveError, local_error

COPY_CHUNK = 1024 * 1024
MAX_LINK_TARGET = 4096  # PATH_MAX: a longer symlink target is no real one


class Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


class SafeTree:
    """A staging directory that only accepts safe members."""

    def __init__(self, root: Path, *, strip_components: int, max_size: int, max_members: int) -> None:
        self.root = root
        self._real_root = os.path.realpath(root)
        self._strip = strip_components
        self._max_size = max_size
        self._max_members = max_members
        self.members = 0
        self.files = 0  # files and links written: an archive that yields none is refused
        self.written = 0
        self._dir_modes: dict[str, int] = {}
        self._symlinks: list[tuple[str, str]] = []  # (path, member name), checked again at the end
        self._direct_buffer = DirectBuffer()

    # --- names ---------------------------------------------------------------

    def _relative(self, name: str) -> str | None:
        """The member's path inside the root after stripping, or None to skip it."""
        if "\0" in name:
            raise ArchiveError(f"refused member {name!r}: NUL in its name")
        if name.startswith("/") or re.match(r"[A-Za-z]:[\\/]", name):
            raise ArchiveError(f"refused member {name!r}: absolute path")
        parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
        if ".." in parts:
            raise ArchiveError(f"refused member {name!r}: '..' in its path")
        parts = parts[self._strip :]
        if not parts:
            return None
        if parts[0] == ".fetcher":
            raise ArchiveError(f"refused member {name!r}: .fetcher is fetcher's state directory")
        return "/".join(parts)

    def _inside(self, path: str) -> bool:
        real = os.path.realpath(path)
        return real == self._real_root or real.startswith(self._real_root + os.sep)

    def _target(self, relative: str, original: str) -> str:
        """Absolute path for a member, checked after resolving symlinks already written."""
        path = os.path.join(self.root, relative)
        parent = os.path.dirname(path)
        self._makedirs(parent, original)
        if not self._inside(parent):
            raise ArchiveError(f"refused member {original!r}: it would be written through a symlink leading outside")
        return path

    def _count(self) -> None:
        self.members += 1
        if self.members > self._max_members:
            raise ArchiveError(f"archive has more than {self._max_members} members (--max-members)")

    # --- members -------------------------------------------------------------

    def add_dir(self, name: str, mode: int) -> None:
        self._count()
        relative = self._relative(name)
        if relative is None:
            return
        path = self._target(relative, name)
        if os.path.islink(path):
            raise ArchiveError(f"refused member {name!r}: a directory over a symlink")
        self._makedirs(path, name)
        self._dir_modes[path] = stat.S_IMODE(mode) & 0o777 | 0o700

    def add_file(self, name: str, mode: int, data: Readable) -> None:
        self._count()
        relative = self._relative(name)
        if relative is None:
            _drain(data)
            return
        path = self._target(relative, name)
        self._clear(path, name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                out = FileWriter(fd, self._direct_buffer)
                while chunk := data.read(COPY_CHUNK):
                    self.written += len(chunk)
                    if self.written > self._max_size:
                        raise ArchiveError(f"archive unpacks to more than {self._max_size} bytes (--max-unpacked-size)")
                    out.write(chunk)
                out.close()
                os.fchmod(fd, stat.S_IMODE(mode) & 0o777)
            finally:
                os.close(fd)
            self.files += 1
        except OSError as exc:
            raise local_error(exc, f"writing {relative}") from None

    def add_symlink(self, name: str, target: str) -> None:
        self._count()
        relative = self._relative(name)
        if relative is None:
            return
        if len(target) > MAX_LINK_TARGET:
            raise ArchiveError(f"refused member {name!r}: symlink target longer than {MAX_LINK_TARGET} bytes")
        if not target or target.startswith("/") or "\0" in target:
            raise ArchiveError(f"refused member {name!r}: symlink to absolute path {target!r}")
        lexical = posixpath.normpath(posixpath.join(posixpath.dirname(relative), target))
        if lexical == ".." or lexical.startswith("../"):
            raise ArchiveError(f"refused member {name!r}: symlink {target!r} leads outside the destination")
        path = self._target(relative, name)
        if not self._inside(os.path.join(os.path.dirname(path), target)):
            raise ArchiveError(f"refused member {name!r}: symlink {target!r} leads outside the destination")
        self._clear(path, name)
        try:
            os.symlink(target, path)
        except OSError as exc:
            raise local_error(exc, f"writing {relative}") from None
        self._symlinks.append((path, name))
        self.files += 1

    def add_hardlink(self, name: str, target: str) -> None:
        self._count()
        relative = self._relative(name)
        if relative is None:
            return
        target_relative = self._relative(target)
        if target_relative is None:
            raise ArchiveError(f"refused member {name!r}: hardlink to stripped member {target!r}")
        source = os.path.join(self.root, target_relative)
        is_link = os.path.islink(source)
        if not self._inside(os.path.dirname(source)) or not (is_link or os.path.isfile(source)):
            raise ArchiveError(
                f"refused member {name!r}: hardlink to {target!r}, which is not a file unpacked before it"
            )
        path = self._target(relative, name)
        self._clear(path, name)
        try:
            os.link(source, path, follow_symlinks=False)
        except OSError as exc:
            raise local_error(exc, f"writing {relative}") from None
        self.files += 1
        if is_link:  # the same relative target, read from another directory
            self._symlinks.append((path, name))

    def refuse(self, name: str, what: str) -> None:
        raise ArchiveError(f"refused member {name!r}: {what} are not allowed")

    def finish(self) -> None:
        """Check what only the whole tree can show, then apply directory modes.

        A symlink checked when it was written can point outside once a later
        member fills in a link it goes through (``x -> a/up/..``, then
        ``a/up -> ..``): so every symlink is resolved again here. Directory
        modes come last, so read-only directories did not block their children.
        """
        for path, name in self._symlinks:
            if not self._inside(path):
                raise ArchiveError(f"refused member {name!r}: with the links after it, it leads outside")
        if self.files == 0:
            after = f" after --strip-components {self._strip}" if self._strip else ""
            raise ArchiveError(f"the archive has no files{after}: refusing to publish an empty model")
        for path in sorted(self._dir_modes, key=len, reverse=True):
            try:
                os.chmod(path, self._dir_modes[path])
            except OSError as exc:
                raise local_error(exc, "setting directory modes") from None

    # --- helpers ---------------------------------------------------------------

    def _makedirs(self, path: str, original: str) -> None:
        try:
            os.makedirs(path, mode=0o755, exist_ok=True)  # implicit parents, as tar makes them
        except FileExistsError:
            raise ArchiveError(f"refused member {original!r}: a parent of it is not a directory") from None
        except OSError as exc:
            raise local_error(exc, f"creating {path}") from None

    def _clear(self, path: str, original: str) -> None:
        """A later member of the same name replaces the earlier one, as in tar."""
        if os.path.lexists(path):
            if os.path.isdir(path) and not os.path.islink(path):
                raise ArchiveError(f"refused member {original!r}: it would replace a directory")
            os.unlink(path)


def _drain(data: Readable) -> None:
    while data.read(COPY_CHUNK):
        pass
