"""The node cache: the one owner of ``--cache-dir``, which every fetcher on a node shares.

Its layout follows huggingface_hub's cache (blobs by digest, a lock per blob):

- ``blobs/<algorithm>/<hex>``: a verified file, read-only, named by its digest:
  its sha256, or the id the hub gives a small file (``sha1-git``, content too);
- ``index/<key>.json`` (a key is ``<algorithm>-<hex>``, as the spool names its
  slots): its size and mtime when stored, which a hit must still show, and when
  it was last used (for eviction);
- ``locks/<key>``: ``flock``'d shared while a fetcher checks a blob and links it,
  exclusively while one downloads it, removes it or evicts it. The kernel lets go
  when a holder dies, in whatever PID namespace: nothing is left to clean up;
- ``download-partial/``: the downloads under way, a spool (``fetcher.spool``)
  that all fetchers share, so the next holder of a lock resumes the parts that
  a killed one journalled;
- ``manifests/<hash>.json``: for an immutable identity (a hub commit, an OCI
  digest, ETags), the sha256 fetcher computed for the files that came without one.

Keys are content, never the URI: two models that share a file share its bytes,
and a moved tag or branch is never mistaken for the old one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fetcher.errors import LocalFilesystemError, local_error
from fetcher.manifest import SHA256, Hasher
from fetcher.spool import ArtifactSpool

BLOB_MODE = 0o444  # one pod may not change what another pod's model links to
POLL = 0.1  # seconds between tries of a lock another fetcher holds
READ = 1024 * 1024

Waiting = Callable[[float], None]  # called with the seconds waited so far, while a lock is held elsewhere


class NodeCache:
    """The cache at ``root``; ``verify`` is how a hit is checked: "size" (size and mtime) or "full" (sha256)."""

    def __init__(self, root: Path, verify: str = "size") -> None:
        self.root = root
        self.verify = verify
        try:
            for sub in (f"blobs/{SHA256}", "index", "locks", "manifests"):
                (root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise local_error(exc, f"preparing the cache in {root} (--cache-dir)") from exc
        self.spool = ArtifactSpool(root, "partial")

    def blob(self, key: str) -> Path:
        algorithm, key = split_key(key)
        return self.root / "blobs" / algorithm / key

    # --- locks ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, key: str, *, exclusive: bool, waiting: Waiting) -> Iterator[None]:
        """Hold the entry's lock; ``waiting`` hears how long, while another fetcher holds it.

        Raises:
            LocalFilesystemError: the lock file cannot be opened.
        """
        fd = self.acquire(key, exclusive=exclusive, waiting=waiting)
        try:
            yield
        finally:
            os.close(fd)

    def acquire(self, key: str, *, exclusive: bool, waiting: Waiting) -> int:
        """The entry's lock, held until the returned fd is closed (by any thread: flock belongs to the file)."""
        try:
            fd = os.open(self.root / "locks" / key, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise local_error(exc, f"opening a lock in the cache {self.root}") from exc
        kind = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        began = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, kind | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                waiting(time.monotonic() - began)
                time.sleep(POLL)
            except OSError as exc:
                os.close(fd)
                raise local_error(exc, f"locking an entry of the cache {self.root}") from exc

    def arrived(self, key: str) -> int:
        """How much of an entry another fetcher has downloaded so far (for the waiters' progress)."""
        slot = key
        with contextlib.suppress(OSError):
            return os.stat(self.spool.complete(slot).with_name(f"{slot}.incomplete")).st_size
        with contextlib.suppress(OSError, ValueError):
            journal = (self.spool.directory / "parts" / slot / "journal").read_text().split("\n")
            return int(json.loads(journal[0])["part_size"]) * max(0, len(journal) - 2)
        return 0

    # --- entries (the caller holds the entry's lock) -----------------------------------------

    def check(self, key: str) -> bool | None:
        """Whether the entry is there and whole: True; absent: None; there but not as stored: False."""
        try:
            info = os.stat(self.blob(key))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise local_error(exc, f"reading the cache {self.root}") from exc
        try:
            record = json.loads((self.root / "index" / f"{key}.json").read_text())
        except (OSError, ValueError):
            return False
        if info.st_size != record.get("size") or info.st_mtime_ns != record.get("mtime_ns"):
            return False
        algorithm, hex_ = split_key(key)
        return self.verify != "full" or _digest(self.blob(key), algorithm, info.st_size) == hex_

    def remove(self, key: str) -> None:
        """Drop an entry (corrupt, or evicted): a dest that links its inode keeps it."""
        for path in (self.blob(key), self.root / "index" / f"{key}.json"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def store(self, key: str, written: Path) -> None:
        """A verified file becomes the entry ``key``: read-only, recorded as it now stands."""
        try:
            os.chmod(written, BLOB_MODE)
            self.blob(key).parent.mkdir(exist_ok=True)
            os.replace(written, self.blob(key))
            info = os.stat(self.blob(key))
            self._record(key, {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "used": time.time()})
        except OSError as exc:
            raise local_error(exc, f"writing the cache {self.root}") from exc

    def adopt(self, key: str, verified: Path) -> None:
        """A file fetcher verified elsewhere (the artifact's spool) joins the cache by a link, when it can."""
        try:
            self.blob(key).parent.mkdir(exist_ok=True)
            os.link(verified, self.blob(key))
        except FileExistsError:
            return
        except OSError:
            return  # another filesystem, or not allowed: the cache does without it
        try:
            os.chmod(self.blob(key), BLOB_MODE)
            info = os.stat(self.blob(key))
            self._record(key, {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "used": time.time()})
        except OSError as exc:
            raise local_error(exc, f"writing the cache {self.root}") from exc

    def place(self, key: str, target: Path, *, mode: int | None, owner: tuple[int, int | None] | None) -> bool:
        """Put the entry at ``target``: a hard link when it may share the inode, else a copy; whether linked.

        A link is refused where the artifact asks for a mode or owner the cached inode lacks:
        publishing applies them, and the cache and every other pod's model would change with it.
        """
        blob = self.blob(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
            info = os.stat(blob)
            same = (mode is None or stat.S_IMODE(info.st_mode) == mode) and (
                owner is None or (info.st_uid == owner[0] and owner[1] in (None, info.st_gid))
            )
            if same:
                try:
                    os.link(blob, target)
                    self.touch(key)
                    return True
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                        raise
            _copy(blob, target)
            self.touch(key)
            return False
        except OSError as exc:
            raise local_error(exc, f"placing a file from the cache {self.root}") from exc

    def touch(self, key: str) -> None:
        """Record a use: eviction goes least recently used first."""
        path = self.root / "index" / f"{key}.json"
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(path.read_text())
            record["used"] = time.time()
            self._record(key, record)

    def _record(self, key: str, record: dict[str, float]) -> None:
        path = self.root / "index" / f"{key}.json"
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(record))
        os.replace(temporary, path)

    # --- what a reference holds ------------------------------------------------------------------

    def known(self, identity: str) -> dict[str, str]:
        """The keys (of their sha256) fetcher computed for files of ``identity`` that came without a digest."""
        with contextlib.suppress(OSError, ValueError):
            found = json.loads(self._manifest(identity).read_text())
            if found.get("identity") == identity:
                return {str(k): str(v) for k, v in found.get("files", {}).items()}
        return {}

    def remember(self, identity: str, files: dict[str, str]) -> None:
        """Record them, so the next fetch of the same identity finds those files here before fetching."""
        if not files:
            return
        path = self._manifest(identity)
        with contextlib.suppress(OSError):
            temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            temporary.write_text(json.dumps({"identity": identity, "files": files}))
            os.replace(temporary, path)

    def _manifest(self, identity: str) -> Path:
        return self.root / "manifests" / f"{hashlib.sha256(identity.encode()).hexdigest()[:32]}.json"

    # --- eviction --------------------------------------------------------------------------------

    def evict(self, max_size: int) -> tuple[int, int]:
        """Remove entries, least recently used first, until the blobs fit in ``max_size``; (files, bytes) removed.

        An entry another fetcher holds (downloading, or linking it) is skipped. Files already
        linked into a pod's dest keep their inode: only the cache's name for them goes.
        """
        entries: list[tuple[float, str, int]] = []
        total = 0
        for kind in os.scandir(self.root / "blobs"):
            for entry in os.scandir(kind.path):
                key = f"{kind.name}-{entry.name}"
                with contextlib.suppress(OSError):
                    size = entry.stat().st_size
                    total += size
                    used = 0.0
                    with contextlib.suppress(OSError, ValueError):
                        used = float(json.loads((self.root / "index" / f"{key}.json").read_text())["used"])
                    entries.append((used, key, size))
        removed = freed = 0
        for _, key, size in sorted(entries):
            if total <= max_size:
                break
            try:
                fd = os.open(self.root / "locks" / key, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.remove(key)
                total, removed, freed = total - size, removed + 1, freed + size
            except OSError:
                continue  # held by a fetcher: not now
            finally:
                os.close(fd)
        return removed, freed


@dataclass
class CachedArtifact:
    """The node cache as one artifact uses it: how its files are placed, and what an earlier fetch learnt."""

    node: NodeCache
    mode: int | None  # --file-mode: a cached inode without it is copied, not linked
    owner: tuple[int, int | None] | None  # --owner: likewise
    interval: float  # seconds between "waiting for" lines
    remembered: dict[str, str] = field(default_factory=dict)  # path -> the key of the sha256 an earlier fetch computed

    def place(self, key: str, target: Path) -> bool:
        return self.node.place(key, target, mode=self.mode, owner=self.owner)


def _copy(source: Path, target: Path) -> None:
    """A copy made by the kernel: ``copy_file_range`` shares the extents on XFS or btrfs (a reflink: no
    bytes written, and a write to either side leaves the other as it was), and elsewhere copies without
    a round trip through Python. Why: in a pod, the cache (a hostPath) and dest (an emptyDir) are two
    mounts, which a hard link never crosses, even on one disk. Written aside, then renamed: a copy cut
    short never stands in the target's place.
    """
    aside = target.with_name(f"{target.name}.copying")
    with open(source, "rb") as src, open(aside, "wb") as dst:
        os.fchmod(dst.fileno(), 0o644)
        left = os.fstat(src.fileno()).st_size
        try:
            while left > 0 and (copied := os.copy_file_range(src.fileno(), dst.fileno(), left)):
                left -= copied
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        if left > 0:  # refused, or not all of it: the rest from where the kernel left off
            shutil.copyfileobj(src, dst)
    os.replace(aside, target)


def split_key(key: str) -> tuple[str, str]:
    """``sha256-<hex>`` -> (``sha256``, ``<hex>``); the algorithm may itself hold a dash (``sha1-git``)."""
    algorithm, _, hex_ = key.rpartition("-")
    return algorithm, hex_


def _digest(path: Path, algorithm: str, size: int) -> str:
    hasher = Hasher(algorithm, size)
    try:
        with open(path, "rb") as file:
            while chunk := file.read(READ):
                hasher.update(chunk)
    except OSError as exc:
        raise LocalFilesystemError(f"reading the cache: {exc.strerror or exc}") from exc
    return hasher.hexdigest()
