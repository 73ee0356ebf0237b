"""The download spool: the one owner of ``dest/.fetcher/download-<key>/``.

Whatever a restart may resume from lives here, and only this module
creates, adopts or removes it:

- one object split into parallel parts: ``data`` at the object's offsets,
  and ``journal``, the parts safely on disk (``Parts``);
- a directory's files: ``files/<slot>``, each renamed there only once it
  is complete and verified, and ``files/<slot>.incomplete`` while it arrives;
  a large file's parts under ``parts/<slot>/``. A slot is named by the file's
  expected digest where there is one, so the files of a moved branch that did
  not change are not fetched again;
- ``no-room``: the last parallel attempt filled the disk, so the next uses one stream.

The node cache (``fetcher.cache``) keeps one of these too, ``download-partial``, shared by
every fetcher on the node, for the files being downloaded into it.

The spool goes once its artifact is published, or once its bytes are known to be
useless (a digest mismatch, an unsafe archive); a failure worth retrying keeps it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fetcher.diskwrite import DirectBuffer, FileWriter
from fetcher.errors import LocalFilesystemError, local_error
from fetcher.manifest import Entry

PREFIX = "download-"
NO_ROOM = "no-room"

FILE_MODE = 0o644
"""A downloaded file's mode in dest when no ``--file-mode`` is given: readable by a server
running as another user. Archive members keep their own."""


class ArtifactSpool:
    """One artifact's spool directory."""

    def __init__(self, state_dir: Path, key: str) -> None:
        self.directory = state_dir / f"{PREFIX}{key}"

    # --- one object, in parts ---------------------------------------------------

    def parts(self, identity: Identity) -> Parts:
        """The object's parts, resumed when an earlier run spooled the very same object."""
        return Parts(self.directory, identity)

    def holds_parts(self) -> bool:
        """Whether a restart could resume from it: its journal records a part safely on disk."""
        try:
            return bool(_journal(self.directory)[1])
        except (OSError, ValueError):
            return False

    @property
    def whole(self) -> Path:
        """The file that holds a split object's bytes once every part has landed."""
        return self.directory / "data"

    @property
    def no_room(self) -> bool:
        return (self.directory / NO_ROOM).exists()

    def mark_no_room(self) -> None:
        """Drop the parts, and tell the next run to use one stream."""
        self.discard()
        with contextlib.suppress(OSError):
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / NO_ROOM).touch()

    def adopt(self, target: Path) -> None:
        """Move the spooled object to ``target`` in staging: a plain file is not written twice."""
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(self.whole, target)
            os.chmod(target, FILE_MODE)
        except OSError as exc:
            raise local_error(exc, "moving the downloaded file into staging") from None

    # --- a directory's files --------------------------------------------------------

    def slot(self, entry: Entry) -> str:
        """A file's name in the spool: its digest, else what pins it (its path and version)."""
        if entry.digest is not None:
            return f"{entry.digest.algorithm}-{entry.digest.hex}"
        pinned = f"{entry.locator}\0{entry.pin}\0{entry.size}".encode(errors="surrogateescape")
        return "path-" + hashlib.sha256(pinned).hexdigest()[:32]

    def complete(self, slot: str) -> Path:
        return self.directory / "files" / slot

    def incomplete(self, slot: str) -> Path:
        path = self.directory / "files" / f"{slot}.incomplete"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise local_error(exc, f"preparing the download spool in {self.directory}") from exc
        return path

    def file_parts(self, slot: str, identity: Identity) -> Parts:
        return Parts(self.directory / "parts" / slot, identity)

    def finish(self, written: Path, slot: str) -> Path:
        """A verified file takes its slot: from here on a restart keeps it."""
        target = self.complete(slot)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)  # a directory of large files only has none yet
            os.chmod(written, FILE_MODE)  # a split file's ``data`` was made 0600, a streamed one under the umask
            os.rename(written, target)
        except OSError as exc:
            raise local_error(exc, f"writing the download spool in {self.directory}") from exc
        return target

    def take(self, published: Path, slot: str, *, link: bool = True) -> bool:
        """A verified file already in dest takes its slot too: a hard link, or with ``link=False`` a
        copy of its own (at FILE_MODE, as a download's); False if it cannot."""
        target = self.complete(slot)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if link:
                os.link(published, target)
            else:  # read again, from the page cache, after the caller hashed it: no second hasher
                copy = self.incomplete(slot)
                try:
                    shutil.copyfile(published, copy)
                    self.finish(copy, slot)
                except BaseException:
                    copy.unlink(missing_ok=True)  # a full disk's partial copy is no resume point
                    raise
        except FileExistsError:
            return True
        except (OSError, LocalFilesystemError):
            return False
        return True

    def link_into(self, slot: str, target: Path) -> None:
        """Put a spooled file at its place in staging (a hard link: the spool goes after the publish)."""
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(self.complete(slot), target)
        except OSError as exc:
            raise local_error(exc, "placing the downloaded files in staging") from exc

    def arrived(self, slot: str) -> int:
        """How much of a file has arrived so far: its ``.incomplete`` size, or its journalled parts."""
        with contextlib.suppress(OSError):
            return os.stat(self.directory / "files" / f"{slot}.incomplete").st_size
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            header, done = _journal(self.directory / "parts" / slot)
            return int(header["part_size"]) * len(done)
        return 0

    def size(self) -> int:
        """The bytes it holds on disk."""
        return _disk_usage(self.directory)

    def drop_stale(self, claim: Callable[[str], contextlib.AbstractContextManager[object] | None]) -> int:
        """Remove the unfinished files that ``claim`` (a free lock on the slot) says nobody is writing;
        the bytes freed. What a killed fetcher left, when the space is wanted more than its resume."""
        freed = 0
        leftovers = [(p.name.removesuffix(".incomplete"), p) for p in (self.directory / "files").glob("*.incomplete")]
        leftovers += [(p.name, p) for p in (self.directory / "parts").glob("*")]
        for slot, path in leftovers:
            held = claim(slot)
            if held is None:
                continue
            with held:
                freed += _disk_usage(path)
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        return freed

    # --- its end -------------------------------------------------------------------------

    def discard(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    @staticmethod
    def key_of(name: str) -> str | None:
        """The key of the artifact whose spool an entry of the state directory is, if it is one."""
        return name.removeprefix(PREFIX) if name.startswith(PREFIX) else None

    @staticmethod
    def clean(state_dir: Path, keep: set[str]) -> None:
        """Remove the spools of artifacts no longer asked for: they can be as large as the model."""
        for entry in state_dir.glob(f"{PREFIX}*"):
            if ArtifactSpool.key_of(entry.name) not in keep:
                shutil.rmtree(entry, ignore_errors=True)


def _disk_usage(path: Path) -> int:
    """Bytes on disk (a sparse spool file counts what it holds, not its length)."""
    if not path.is_dir():
        with contextlib.suppress(OSError):
            return path.lstat().st_blocks * 512
        return 0
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def _journal(directory: Path) -> tuple[Any, set[int]]:
    """A parts journal as written: its header (the object's identity), then the parts on disk, one a
    line; a line cut short by a kill is no record.

    Raises:
        OSError: there is no journal. ValueError: its header is not JSON.
    """
    lines = (directory / "journal").read_text(encoding="utf-8").split("\n")[:-1]
    if not lines:
        return None, set()
    return json.loads(lines[0]), {int(line) for line in lines[1:] if line.isdigit()}


@dataclass(frozen=True)
class Identity:
    """What the spool holds: a later run may reuse it only for the very same object."""

    source: str
    version: str
    size: int
    part_size: int


class Parts:
    """The object's bytes at their offsets, and the journal of parts safely on disk.

    Parts are written by several threads at once; ``close`` waits for those
    in the middle of a write, so no write can land on a recycled descriptor.
    """

    def __init__(self, directory: Path, identity: Identity) -> None:
        self.directory = directory
        self.identity = identity
        self.done: set[int] = set()
        self._busy = 0
        self._closed = False
        self._idle = threading.Condition()
        journal = directory / "journal"
        try:
            header, done = _journal(directory)
            data = (directory / "data").stat()
            if header == asdict(identity) and data.st_size == identity.size:
                self.done = done
            else:  # another object, or its data was moved out (published) or lost
                shutil.rmtree(directory, ignore_errors=True)
        except (OSError, ValueError):
            shutil.rmtree(directory, ignore_errors=True)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(directory / "data", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise local_error(exc, f"preparing the download spool in {directory}") from exc
        try:
            os.ftruncate(self._fd, identity.size)
            self._journal = journal.open("a", encoding="utf-8")
            if not self.done:
                self._journal.write(json.dumps(asdict(identity)) + "\n")
                self._journal.flush()
        except OSError as exc:
            os.close(self._fd)
            raise local_error(exc, f"preparing the download spool in {directory}") from exc

    @contextmanager
    def _using(self) -> Iterator[int]:
        with self._idle:
            if self._closed:
                from fetcher.channel import Cancelled  # not at the top: see read

                raise Cancelled
            self._busy += 1
        try:
            yield self._fd
        except OSError as exc:
            raise local_error(exc, f"writing the download spool in {self.directory}") from exc
        finally:
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()

    def write(self, offset: int, data: bytes) -> None:
        with self._using() as fd:
            view = memoryview(data)
            while view:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written

    @contextmanager
    def stream(self, offset: int) -> Iterator[FileWriter]:
        """A writer of the bytes from ``offset`` on, in order, on a descriptor of its own.

        Why: one fast stream per file is written around the page cache (see
        ``fetcher.diskwrite``), as a single object is; parallel parts keep ``write``.
        """
        where = f"writing the download spool in {self.directory}"
        with self._using():  # Cancelled once closed; OSError: a local error
            fd = os.open(self.directory / "data", os.O_WRONLY | os.O_CLOEXEC)
        buffer = DirectBuffer()
        try:
            os.lseek(fd, offset, os.SEEK_SET)
            writer = FileWriter(fd, buffer, offset)
            try:
                yield writer  # the caller maps errors of its writes: its own reads must not pass for local ones
            finally:  # on an error too: what was hashed must be in the file before a retry goes on after it
                try:
                    writer.close()
                except OSError as exc:
                    raise local_error(exc, where) from exc
        finally:
            os.close(fd)
            buffer.close()

    def commit(self, *indices: int) -> None:
        """Record parts as done, only once their bytes are on disk: one fdatasync for them all."""
        with self._using() as fd:
            os.fdatasync(fd)
            with self._idle:
                self._journal.write("".join(f"{index}\n" for index in indices))
                self._journal.flush()
                self.done.update(indices)

    def read(self, start: int, end: int) -> Iterator[bytes]:
        # Imported here, not at the top: a run that finds its model in place imports this module
        # (through publish and the cache), and need not load the sources' classes or the channel.
        from fetcher.sources.base import CHUNK_SIZE

        while start < end:
            with self._using() as fd:
                chunk = os.pread(fd, min(CHUNK_SIZE, end - start), start)
            if not chunk:
                raise LocalFilesystemError("the download spool is shorter than the parts it records")
            start += len(chunk)
            yield chunk

    def close(self) -> None:
        with self._idle:
            if self._closed:
                return
            self._closed = True
            self._idle.wait_for(lambda: self._busy == 0)
        os.close(self._fd)
        self._journal.close()

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
