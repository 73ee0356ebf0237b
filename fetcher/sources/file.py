"""file:// sources: a local file, or a folder, e.g. a model on a mounted volume (a PVC, NFS).

A folder is copied with the rules of an archive: a symlink must lead to a
file inside the folder (its content is copied), and a device, FIFO or socket,
or a link leading outside, is refused (exit 5) before anything is published.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from fetcher.errors import ArchiveError, FetchError, SourceChangedError
from fetcher.manifest import Entry, Manifest, check_layout, listing_identity, relative_path
from fetcher.redact import redact_url
from fetcher.sources.base import CHUNK_SIZE, Body, Connection, ObjectInfo, Selection
from fetcher.unpack import show


class FileSource:
    def __init__(self, source: str, connection: Connection, selection: Selection) -> None:
        self.path = Path(unquote(urlsplit(source).path))
        self.display = redact_url(source)
        self._selection = selection
        self._pins: dict[str, tuple[int, int]] = {}
        self._directory = source.endswith("/")

    def resolve(self) -> Manifest:
        if not self._directory:
            with suppress(OSError):
                self._directory = self.path.is_dir()
        if not self._directory:
            return self._selection.single()
        if not self.path.is_dir():
            raise FetchError(f"{self.display} is not a directory")
        entries = self._walk()
        check_layout(entries, "file")
        return Manifest(tuple(entries), directory=True, identity=listing_identity(entries))

    def _walk(self) -> list[Entry]:
        """Every file under the folder, links resolved and checked; in a stable order."""
        root = os.path.realpath(self.path)
        entries: list[Entry] = []

        def failed(exc: OSError) -> None:
            raise FetchError(f"cannot read {self.display}: {exc.strerror}") from exc

        for directory, dirs, files in os.walk(root, onerror=failed):
            dirs.sort()
            for name in sorted(files) + [d for d in dirs if os.path.islink(os.path.join(directory, d))]:
                full = os.path.join(directory, name)
                relative = relative_path(os.path.relpath(full, root), "file")
                entries.append(self._entry(root, full, relative))
        return entries

    def _entry(self, root: str, full: str, relative: str) -> Entry:
        real = os.path.realpath(full)
        if real != full and os.path.commonpath([root, real]) != root:
            raise ArchiveError(f"refused file {show(relative)}: a symlink leading outside {self.display}")
        try:
            info = os.stat(real)
        except OSError as exc:
            raise ArchiveError(f"refused file {show(relative)}: {exc.strerror} (a dangling symlink?)") from exc
        if stat.S_ISDIR(info.st_mode):
            raise ArchiveError(f"refused file {show(relative)}: a symlink to a directory")
        if not stat.S_ISREG(info.st_mode):
            raise ArchiveError(f"refused file {show(relative)}: not a regular file (a device, FIFO or socket)")
        return Entry(relative, info.st_size, None, locator=real, pin=f"{info.st_size}-{info.st_mtime_ns}")

    @contextmanager
    def open(self, entry: Entry, start: int = 0, end: int | None = None) -> Iterator[Body]:
        path = Path(entry.locator) if entry.locator else self.path
        display = f"{self.display.rstrip('/')}/{entry.path}" if entry.locator else self.display
        try:
            handle = path.open("rb")
        except FileNotFoundError as exc:
            raise FetchError(f"{display} does not exist") from exc
        except OSError as exc:
            raise FetchError(f"cannot read {display}: {exc.strerror}") from exc
        with handle:
            info = os.fstat(handle.fileno())
            pin = (info.st_size, info.st_mtime_ns)
            first = self._pins.setdefault(str(path), pin)
            listed = entry.pin is not None and entry.pin != f"{pin[0]}-{pin[1]}"
            if pin != first or listed:
                raise SourceChangedError(f"{display} changed while it was being read")
            handle.seek(start)
            described = ObjectInfo(size=info.st_size, ranges=True, version=f"{pin[0]}-{pin[1]}")
            limit = (end if end is not None else info.st_size) - start
            yield Body(described, start, self._chunks(handle, limit, display, pin), partial=True)

    def _chunks(self, handle: BinaryIO, limit: int, display: str, pin: tuple[int, int]) -> Iterator[bytes]:
        """The bytes, then a last look at the file: a write while they were read (a copy onto the
        volume still running) gives bytes of two versions, which are never published."""
        try:
            while limit > 0 and (chunk := handle.read(min(CHUNK_SIZE, limit))):
                limit -= len(chunk)
                yield chunk
            info = os.fstat(handle.fileno())
        except OSError as exc:
            raise FetchError(f"cannot read {display}: {exc.strerror}") from exc
        if (info.st_size, info.st_mtime_ns) != pin:
            raise SourceChangedError(f"{display} changed while it was being read")

    def close(self) -> None:
        pass
