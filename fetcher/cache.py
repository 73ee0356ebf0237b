"""The node cache: the one owner of ``--cache-dir``, which every fetcher on a node shares.

Its layout follows huggingface_hub's cache (blobs by digest, a lock per entry):

- ``blobs/<algorithm>/<hex>``: a verified file, read-only, named by its digest:
  its sha256, or the id the hub gives a small file (``sha1-git``, content too);
- ``index/<key>.json`` (a key is ``<algorithm>-<hex>``, as the spool names its
  slots): its size and mtime when stored, which a hit must still show; the
  record's own mtime is when the entry was last used (for eviction);
- ``aliases/<name>``: for a file that came without a digest (an S3 object with
  no checksum, a file of a folder), the key of what it hashed to, named after
  the source and the file's path, version and size;
- ``locks/<name>``: ``flock``'d shared while a fetcher checks an entry and links
  it, exclusively while one downloads it, stores, removes or evicts it. The kernel
  lets go when a holder dies, in whatever PID namespace: nothing to clean up.
  Fetchers only ever *try* a lock: a busy one is tried again later, so no worker
  waits while it holds another, and no two fetchers can wait on each other. The one
  exception, bounded (``HOLD_WAIT``): a fetcher making a kept tree again waits, with the
  tree's lock, for a file of it that another holds; no holder of a file waits for a tree;
- ``trees/<name>.json``: what one file or archive, pinned by the sha256 given for
  it, unpacked to (its directories, symlinks, and each file's key and mode), so
  that the next fetcher of it on the node downloads and unpacks nothing;
- ``manifests/<name>.json``: the manifest of a reference resolved to an immutable
  identity (a hub commit, an OCI digest with its platform), so that a pinned
  reference is listed without a request;
- ``download-partial/``: downloads of files with a digest under way, a spool
  (``fetcher.spool``) that all fetchers share, so the next holder of an entry
  resumes the parts that a killed one journalled.

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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from fetcher.errors import ArchiveError, LocalFilesystemError, local_error
from fetcher.manifest import Digest, Entry, Hasher, Manifest, check_layout, relative_path
from fetcher.spool import FILE_MODE, ArtifactSpool

BLOB_MODE = 0o444  # one pod may not change what another pod's model links to
POLL = 0.1  # seconds before a fetcher looks again at an entry another one is downloading
# Seconds a kept tree's file that another fetcher holds is waited for, before the tree is downloaded
# again: a store or an eviction holds it a moment; a download under way may take minutes.
HOLD_WAIT = 10.0
QUIET = 0.5  # seconds a fetcher waits on another one before it says so
READ = 1024 * 1024
EVICTING = ".evicting"  # the lock one evictor holds at a time: two would count the same space twice


def key_of(algorithm: str, hex_: str) -> str:
    """An entry's key: named as the spool names its slots."""
    return f"{algorithm}-{hex_}"


def tree_name(sha256: str, how: str) -> str:
    """A tree's name: the digest given for its archive, and how it was unpacked (never the URL)."""
    return "tree-" + hashlib.sha256(f"{sha256}\0{how}".encode()).hexdigest()[:40]


def say_waiting(waited: float, last: float | None, interval: float) -> bool:
    """Whether a fetcher that has waited ``waited`` seconds on another one says so now ("waiting for"):
    not for a short wait, then once every ``interval`` after ``last`` said it."""
    return waited >= QUIET and (last is None or waited - last >= interval)


def split_key(key: str) -> tuple[str, str]:
    """``sha256-<hex>`` -> (``sha256``, ``<hex>``); the algorithm may itself hold a dash (``sha1-git``)."""
    algorithm, _, hex_ = key.rpartition("-")
    return algorithm, hex_


class Lock:
    """An entry's flock, held until closed, once, by whichever thread (flock belongs to the open file)."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd
        self._guard = threading.Lock()

    def close(self) -> None:
        with self._guard:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


class NodeCache:
    """The cache at ``root``; ``verify`` is how a hit is checked: "size" (size and mtime) or "full" (a digest)."""

    def __init__(self, root: Path, verify: str = "size") -> None:
        """
        Raises:
            LocalFilesystemError: the cache cannot be made, or this fetcher may not write it.
        """
        self.root = root
        self.verify = verify
        try:
            for sub in ("blobs", "index", "locks", "aliases", "trees", "manifests"):
                (root / sub).mkdir(parents=True, exist_ok=True)
            if not os.access(root / "locks", os.W_OK):
                raise PermissionError(errno.EACCES, "not writable by this user", str(root))
        except OSError as exc:
            raise local_error(exc, f"preparing the cache in {root} (--cache-dir)") from exc
        self.spool = ArtifactSpool(root, "partial")

    def blob(self, key: str) -> Path:
        algorithm, hex_ = split_key(key)
        return self.root / "blobs" / algorithm / hex_

    # --- locks ---------------------------------------------------------------------------------

    def try_lock(self, name: str, *, exclusive: bool) -> Lock | None:
        """The entry's lock if it is free now (shared: free of a writer), else None.

        Raises:
            LocalFilesystemError: the lock file cannot be opened.
        """
        try:
            fd = os.open(self.root / "locks" / name, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise local_error(exc, f"opening a lock in the cache {self.root}") from exc
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as exc:
            os.close(fd)
            raise local_error(exc, f"locking an entry of the cache {self.root}") from exc
        return Lock(fd)

    def arrived(self, key: str) -> int:
        """How much of an entry another fetcher has downloaded so far (for the waiters' progress)."""
        return self.spool.arrived(key)

    # --- entries (the caller holds the entry's lock) -----------------------------------------

    def resolve(self, name: str) -> str | None:
        """The key of what ``name`` holds: itself for a digest, what an alias records, else None."""
        if not name.startswith("alias-"):
            return name
        with contextlib.suppress(OSError, UnicodeDecodeError):
            return (self.root / "aliases" / name).read_text().strip() or None
        return None

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
        """Drop an entry (damaged, or evicted): a dest that links its inode keeps it."""
        for path in (self.blob(key), self.root / "index" / f"{key}.json"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def store(self, key: str, written: Path, alias: str | None = None) -> None:
        """A verified file becomes the entry ``key``: read-only, recorded as it now stands; moved in,
        or copied when it is on another filesystem. ``alias``: the name it came under, without a digest.

        Raises:
            LocalFilesystemError: the cache cannot be written.
        """
        blob = self.blob(key)
        try:
            blob.parent.mkdir(exist_ok=True)
            os.chmod(written, BLOB_MODE)
            try:
                os.replace(written, blob)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                _copy(written, blob, BLOB_MODE)
            info = os.stat(blob)
            self._record(key, {"size": info.st_size, "mtime_ns": info.st_mtime_ns})
            if alias is not None:
                _write_atomically(self.root / "aliases" / alias, key)
        except OSError as exc:
            raise local_error(exc, f"writing the cache {self.root}") from exc

    def adopt(self, key: str, verified: Path) -> None:
        """A file fetcher verified elsewhere (kept from an earlier run) joins the cache by a link, if it can
        at once: an entry being written, a file owned by another user (an earlier --owner), another
        filesystem, all leave the cache as it is. So does a file linked from the published model: made
        read-only for the cache, it would change the live model before its publish."""
        with contextlib.suppress(OSError):
            info = os.stat(verified)
            if info.st_uid != os.geteuid() or info.st_nlink > 1 or self.blob(key).exists():
                return
            lock = self.try_lock(key, exclusive=True)
            if lock is None:
                return
            with lock:
                self.blob(key).parent.mkdir(exist_ok=True)
                os.link(verified, self.blob(key))
                os.chmod(self.blob(key), BLOB_MODE)
                info = os.stat(self.blob(key))
                self._record(key, {"size": info.st_size, "mtime_ns": info.st_mtime_ns})

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
            linked = False
            if same:
                try:
                    os.link(blob, target)
                    linked = True
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                        raise
            if not linked:
                _copy(blob, target, FILE_MODE if mode is None else mode)
            self.touch(key)
            return linked
        except OSError as exc:
            raise local_error(exc, f"placing a file from the cache {self.root}") from exc

    # --- manifests: what an immutable identity lists -------------------------------------------

    def manifest(self, identity: str) -> Manifest | None:
        """The manifest kept for ``identity``, its paths checked as a source's are; None if none or unreadable."""
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError, ArchiveError):
            kept = json.loads(self._manifest_path(identity).read_text())
            if kept["identity"] != identity:
                return None
            entries = tuple(
                Entry(
                    relative_path(e["path"], "a cached manifest's file") if e["path"] else "",
                    None if e["size"] is None else int(e["size"]),
                    None if e["digest"] is None else Digest(*(str(part) for part in e["digest"])),
                    str(e["locator"]),
                    None if e["pin"] is None else str(e["pin"]),
                    bool(e["unpack"]),
                )
                for e in kept["entries"]
            )
            subtree = kept.get("image_subtree")
            if subtree is None:  # as the source checks its own (an image's layers may repeat)
                check_layout(entries, "cached file")
            return Manifest(entries, directory=True, identity=identity, image_subtree=subtree)
        return None

    def keep_manifest(self, manifest: Manifest) -> None:
        """A directory's manifest, kept by its identity; not kept if the cache cannot be written."""
        assert manifest.identity is not None
        entries = [
            {
                "path": e.path,
                "size": e.size,
                "digest": None if e.digest is None else [e.digest.algorithm, e.digest.hex, e.digest.origin],
                "locator": e.locator,
                "pin": e.pin,
                "unpack": e.unpack,
            }
            for e in manifest.entries
        ]
        kept = {"identity": manifest.identity, "image_subtree": manifest.image_subtree, "entries": entries}
        with contextlib.suppress(OSError):
            _write_atomically(self._manifest_path(manifest.identity), json.dumps(kept))

    def _manifest_path(self, identity: str) -> Path:
        return self.root / "manifests" / f"{hashlib.sha256(identity.encode()).hexdigest()[:40]}.json"

    # --- trees: one file or archive, as it unpacked ------------------------------------------

    def tree(self, name: str) -> dict[str, Any] | None:
        """A kept tree: what ``keep_tree`` was told about it, and its ``entries`` in the order they were
        made (a directory before what it holds)."""
        with contextlib.suppress(OSError, ValueError):
            kept = json.loads((self.root / "trees" / f"{name}.json").read_text())
            if isinstance(kept, dict) and isinstance(kept.get("entries"), list):
                return kept | {"entries": [e for e in kept["entries"] if isinstance(e, dict)]}
        return None

    def keep_tree(self, name: str, tree: Path, *, copy: bool, about: dict[str, Any], digests: dict[str, str]) -> None:
        """A verified, unpacked tree joins the cache: each file an entry by its sha256, then its listing.

        A file is linked in, read-only (its write bits dropped: the dest that links it shares the
        inode), or copied when ``copy`` (--owner or --file-mode will change the staged inode).
        A file the cache holds already is linked into the tree instead, so dest shares it too.
        ``digests``: the sha256 of files, by path in the tree, known from writing them; others are read.

        Raises:
            LocalFilesystemError: the tree cannot be read, or the cache written.
        """
        entries: list[dict[str, Any]] = []
        try:
            for directory, dirs, files in os.walk(tree):
                dirs.sort()  # in place: the walk then goes down in this order too
                for name_ in dirs + sorted(files):
                    path = os.path.join(directory, name_)
                    relative = os.path.relpath(path, tree)
                    info = os.lstat(path)
                    if stat.S_ISLNK(info.st_mode):
                        entries.append({"path": relative, "link": os.readlink(path)})
                    elif stat.S_ISDIR(info.st_mode):
                        entries.append({"path": relative, "dir": stat.S_IMODE(info.st_mode)})
                    else:
                        mode = stat.S_IMODE(info.st_mode) & 0o555
                        hex_ = digests.get(relative) or _digest(Path(path), "sha256", info.st_size)
                        key = key_of("sha256", hex_)
                        self._keep_file(key, Path(path), mode, copy)
                        entries.append({"path": relative, "key": key, "mode": mode})
            _write_atomically(self.root / "trees" / f"{name}.json", json.dumps(about | {"entries": entries}))
        except OSError as exc:
            raise local_error(exc, f"writing the cache {self.root}") from exc

    def _keep_file(self, key: str, staged: Path, mode: int, copy: bool) -> None:
        lock = self.try_lock(key, exclusive=True)
        if lock is None:
            return  # another fetcher writes or removes it: the next hit finds it, or fetches again
        with lock:
            blob = self.blob(key)
            held = self.check(key)
            if held and not copy and stat.S_IMODE(os.stat(blob).st_mode) == mode:
                aside = staged.with_name(f".{staged.name}.cached")
                os.link(blob, aside)
                os.replace(aside, staged)
                return
            if held:
                return  # held with another mode: that entry serves as well
            if held is False:  # damaged: what was just verified takes its place, for the next hit
                self.remove(key)
            blob.parent.mkdir(exist_ok=True)
            if copy:
                _copy(staged, blob, mode)
            else:
                os.chmod(staged, mode)
                try:
                    os.link(staged, blob)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                        raise
                    _copy(staged, blob, mode)
            info = os.stat(blob)
            self._record(key, {"size": info.st_size, "mtime_ns": info.st_mtime_ns})

    def place_tree(
        self,
        entries: list[dict[str, Any]],
        target: Path,
        *,
        mode: int | None,
        owner: tuple[int, int | None] | None,
        waiting: Callable[[float], None],
    ) -> bool:
        """Make a kept tree again at ``target`` from the cache; False when a file is missing, damaged,
        or held by another fetcher longer than ``HOLD_WAIT``.

        The listing comes from a directory other pods may write: each path is checked as a
        listed object's is, nothing is made under a symlink, and the symlinks are checked as
        an archive's are, by the caller, once the tree stands. A file another fetcher is storing
        or evicting is waited for (``waiting`` is told for how long, at each look): a moment,
        where giving up would download and unpack the whole archive again.
        """
        dirs: list[tuple[Path, int]] = []
        try:
            for entry in entries:
                path = target / relative_path(str(entry.get("path")), "a cached entry")
                if not _is_dir(path.parent):
                    return False
                if "dir" in entry:
                    path.mkdir()
                    dirs.append((path, int(entry["dir"]) & 0o7777))
                elif "link" in entry:
                    os.symlink(str(entry["link"]), path)
                else:
                    key, wanted = str(entry.get("key")), int(entry.get("mode", 0o444)) & 0o555
                    started = time.monotonic()
                    while (lock := self.try_lock(key, exclusive=False)) is None:
                        if (waited := time.monotonic() - started) > HOLD_WAIT:
                            return False
                        waiting(waited)
                        time.sleep(POLL)
                    with lock:
                        if not self.check(key):
                            return False
                        self.place(key, path, mode=wanted if mode is None else mode, owner=owner)
            for directory, dir_mode in reversed(dirs):
                os.chmod(directory, dir_mode | stat.S_IRWXU)  # ours to fill until the publish settles it
        except (OSError, ValueError, ArchiveError):
            return False
        return True

    def touch(self, key: str) -> None:
        """Record a use, for eviction (least recently used first), as the record's mtime.

        Not a rewrite of the record: ext4 flushes a file renamed over another
        (auto_da_alloc), which cost a hit of 14 files 40 ms, a fifth of its time.
        """
        with contextlib.suppress(OSError):
            os.utime(self.root / "index" / f"{key}.json")

    def _record(self, key: str, record: dict[str, int]) -> None:
        _write_atomically(self.root / "index" / f"{key}.json", json.dumps(record))

    # --- eviction --------------------------------------------------------------------------------

    def evict(self, max_size: int, keep: frozenset[str] = frozenset()) -> tuple[int, int]:
        """Remove entries, least recently used first, until the cache fits in ``max_size``; (files, bytes)
        removed. Entries in ``keep`` stay (the model about to be fetched). A file a pod's dest links
        keeps its inode there: only the cache's name for it goes. Downloads that killed fetchers left
        go last. An entry another fetcher holds is skipped; so is the whole pass while another evicts.
        """
        guard = self.try_lock(EVICTING, exclusive=True)
        if guard is None:
            return 0, 0
        with guard:
            candidates: list[tuple[float, str, int]] = []
            total = self.spool.size()
            for kind in os.scandir(self.root / "blobs"):
                for entry in os.scandir(kind.path):
                    with contextlib.suppress(OSError):
                        info = entry.stat(follow_symlinks=False)
                        key = f"{kind.name}-{entry.name}"
                        total += info.st_size
                        used = 0.0
                        with contextlib.suppress(OSError):
                            used = os.stat(self.root / "index" / f"{key}.json").st_mtime
                        if key not in keep:
                            candidates.append((used, key, info.st_size))
            removed = freed = 0
            for _, key, size in sorted(candidates):
                if total <= max_size:
                    break
                lock = self.try_lock(key, exclusive=True)
                if lock is None:
                    continue  # held by a fetcher: not now
                with lock:
                    if not self.blob(key).exists():
                        continue  # removed meanwhile (damaged, by a fetcher holding it)
                    self.remove(key)
                total, removed, freed = total - size, removed + 1, freed + size
            if total > max_size:
                freed += self.spool.drop_stale(lambda name: self.try_lock(name, exclusive=True))
            return removed, freed


@dataclass
class CachedArtifact:
    """The node cache as one artifact uses it: how its files are named there and placed from it."""

    node: NodeCache
    artifact_key: str  # the source's: what names a file that came without a digest
    mode: int | None  # --file-mode: a cached inode without it is copied, not linked
    owner: tuple[int, int | None] | None  # --owner: likewise
    interval: float  # seconds between "waiting for" lines

    def name_of(self, digest: Digest | None, slot: str) -> str:
        """What the cache calls a file: its key, or for one without a digest an alias of the source's."""
        if digest is not None:
            return key_of(digest.algorithm, digest.hex)
        return "alias-" + hashlib.sha256(f"{self.artifact_key}\0{slot}".encode()).hexdigest()[:40]

    def place(self, key: str, target: Path) -> bool:
        return self.node.place(key, target, mode=self.mode, owner=self.owner)


def _copy(source: Path, target: Path, mode: int) -> None:
    """A copy made by the kernel: ``copy_file_range`` shares the extents on XFS or btrfs (a reflink: no
    bytes written, and a write to either side leaves the other as it was), and elsewhere copies without
    a round trip through Python. Why: in a pod, the cache (a hostPath) and dest (an emptyDir) are two
    mounts, which a hard link never crosses, even on one disk. Written aside, then renamed: a copy cut
    short never stands in the target's place.
    """
    import tempfile  # with random, which a run that finds its model in place does not otherwise load

    fd, aside = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
            os.fchmod(dst.fileno(), mode)
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
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(aside)
        raise


def _write_atomically(path: Path, text: str) -> None:
    """A random name, made exclusively: every init container is PID 1, so a PID names nothing.

    Readable by all, as the blobs it describes are (mkstemp makes 0600): a fetcher running as
    another user reads the cache too, and would take an unreadable record for a damaged entry.
    """
    import tempfile

    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            os.fchmod(out.fileno(), 0o644)
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _digest(path: Path, algorithm: str, size: int) -> str:
    hasher = Hasher(algorithm, size)
    try:
        with open(path, "rb") as file:
            while chunk := file.read(READ):
                hasher.update(chunk)
    except OSError as exc:
        raise LocalFilesystemError(f"reading the cache: {exc.strerror or exc}") from exc
    return hasher.hexdigest()


def _is_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()
