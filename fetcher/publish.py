"""The state directory, and the only step that writes into dest itself.

Everything is staged under ``dest/.fetcher/``; ``publish`` moves it into
dest only once the digest matched, after ownership and modes are set and
the files are flushed to disk. The marker is written last, so a marker that
exists describes files that are all there. A crash at any point before it
leaves at most staging leftovers, removed by the next run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from fetcher import __version__
from fetcher.errors import IntegrityError, LocalFilesystemError, UsageError, local_error
from fetcher.plan import Artifact

STATE_DIR = ".fetcher"
SPOOL_PREFIX = "download-"


@dataclass(frozen=True)
class Marker:
    """What was published, to skip the work when a restarted pod asks again."""

    source: str
    sha256: str
    size: int
    format: str
    files: int
    entries: list[str]  # top-level names this artifact put in dest
    stamps: dict[str, list[int]]  # every regular file published, relative to dest: [size, mtime_ns]
    settings: str  # ownership and modes applied: other settings mean publishing again
    published_at: str
    fetcher_version: str


def spool_dir(artifact: Artifact) -> Path:
    """Where a parallel download of this artifact keeps its parts, to resume from after a restart."""
    return artifact.state_dir / f"{SPOOL_PREFIX}{artifact.key}"


def _marker_path(artifact: Artifact) -> Path:
    return artifact.state_dir / f"{artifact.key}.json"


def _settings(artifact: Artifact) -> str:
    return f"owner={artifact.owner} file_mode={artifact.file_mode} dir_mode={artifact.dir_mode}"


def _readable(settings: str) -> str:
    """Settings as a person writes them: the marker keeps its own spelling, as it always has."""
    settings = re.sub(
        r"owner=\((\d+), (\d+|None)\)", lambda m: f"owner={m[1]}{'' if m[2] == 'None' else ':' + m[2]}", settings
    )
    return re.sub(r"(mode=)(\d+)", lambda m: f"{m[1]}{int(m[2]):04o}", settings)


def read_marker(path: Path) -> Marker | None:
    try:
        return Marker(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def already_present(artifact: Artifact) -> Marker | None:
    """The marker, if it matches this artifact and every file it lists is as published."""
    marker = previous(artifact)
    return marker if marker is not None and stale(artifact, marker) is None else None


def stale(artifact: Artifact, marker: Marker) -> str | None:
    """Why this earlier publication cannot stand for the artifact asked for now, if it cannot.

    "As published" is each file's size and mtime: cheap enough for every pod
    start, and any ordinary write changes one of them. Re-hashing a 20 GB
    model on each restart would cost more than most downloads.
    """
    if artifact.sha256 is not None and marker.sha256 != artifact.sha256:
        return f"published with sha256 {marker.sha256}, now {artifact.sha256} is asked for"
    if marker.settings != (settings := _settings(artifact)):
        return f"published with {_readable(marker.settings)}, now {_readable(settings)}"
    for relative, (size, mtime_ns) in marker.stamps.items():
        try:
            info = (artifact.dest / relative).stat()
        except OSError as exc:
            return f"{relative}: {exc.strerror}"
        if (info.st_size, info.st_mtime_ns) != (size, mtime_ns):
            return f"{relative} changed since it was published (size or mtime)"
    return None


def previous(artifact: Artifact) -> Marker | None:
    """The marker of an earlier publication of this artifact, whether or not it still holds."""
    return read_marker(_marker_path(artifact))


@contextmanager
def workspace(artifact: Artifact, siblings: frozenset[str] = frozenset()) -> Iterator[Path]:
    """A locked, fresh staging directory; removed on the way out, whatever happened.

    ``siblings``: keys of the other artifacts this run puts in the same dest,
    whose download spools are kept for them to resume from.
    """
    state = artifact.state_dir
    try:
        state.mkdir(parents=True, exist_ok=True)
        lock = os.open(state / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise LocalFilesystemError(f"cannot write to --dest {artifact.dest}: {exc.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _clean_leftovers(state, keep={f"{SPOOL_PREFIX}{key}" for key in siblings | {artifact.key}})
        staging = state / f"staging-{uuid.uuid4().hex[:12]}"
        try:
            staging.mkdir()
            yield staging
        finally:
            remove_tree(staging)
    finally:
        os.close(lock)


def _clean_leftovers(state: Path, keep: set[str]) -> None:
    """Remove what an earlier run left when it was killed mid-way.

    That includes the download spools of objects no longer asked for (an
    older version of the model, say): they can be as large as the model.
    """
    for entry in state.iterdir():
        if entry.name.startswith(("staging-", "trash-")) or (
            entry.name.startswith(SPOOL_PREFIX) and entry.name not in keep
        ):
            remove_tree(entry)


def publish(
    artifact: Artifact,
    staging: Path,
    *,
    sha256: str,
    size: int,
    fmt: str,
    expected_size: int | None,
    siblings: frozenset[str] = frozenset(),
) -> Marker:
    """Verify, set ownership and modes, move into dest, write the marker."""
    if artifact.sha256 is not None and sha256 != artifact.sha256:
        raise IntegrityError(f"sha256 mismatch: expected {artifact.sha256}, got {sha256} ({size} bytes)")
    if expected_size is not None and size != expected_size:
        raise IntegrityError(f"size mismatch: the source announced {expected_size} bytes, {size} arrived")
    tree = staging / "tree"
    tree.mkdir(exist_ok=True)
    stamps = _finish_tree(artifact, tree)
    entries = sorted(os.listdir(tree))
    _claim(artifact, entries, siblings)
    _move_into_place(artifact, tree, entries)
    marker = Marker(
        source=artifact.display_source,
        sha256=sha256,
        size=size,
        format=fmt,
        files=len(stamps),
        entries=entries,
        stamps=stamps,
        settings=_settings(artifact),
        published_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        fetcher_version=__version__,
    )
    _write_marker(artifact, marker)
    return marker


def _claim(artifact: Artifact, entries: list[str], siblings: frozenset[str]) -> None:
    """Refuse to replace what another artifact of this run published; retire stale markers.

    A marker of an artifact no longer configured (an older version of this
    model, under another URL) stops being true once its files are replaced,
    so it is removed with them.
    """
    for path in artifact.state_dir.glob("*.json"):
        if path.stem == artifact.key:
            continue
        other = read_marker(path)
        clash = sorted(set(other.entries) & set(entries)) if other is not None else []
        if not clash:
            continue
        if path.stem in siblings:
            raise UsageError(
                f"{artifact.display_source} and {other.source if other else '?'} both publish {clash[0]!r} into "
                f"{artifact.dest}: give them different dests, or unpack one with --strip-components"
            )
        path.unlink(missing_ok=True)


def _move_into_place(artifact: Artifact, tree: Path, entries: list[str]) -> None:
    """Swap each top-level entry into dest; on failure, put the old ones back.

    A directory moves to another parent only while its mover may write to it (its
    ".." changes), which in a pod without CAP_DAC_OVERRIDE means owning it with the
    write bit set. So top-level directories get --dir-mode and --owner once in
    place, and an old one that --dir-mode or --owner closed is opened up to leave.
    """
    trash = artifact.state_dir / f"trash-{uuid.uuid4().hex[:12]}"
    moved: list[str] = []
    closed: dict[str, os.stat_result] = {}  # old entries opened up to leave, as they were
    clear_trash = False
    try:
        # Without a marker, a crash in the middle of this loop means "fetch again".
        _marker_path(artifact).unlink(missing_ok=True)
        trash.mkdir()
        for name in entries:
            moved.append(name)  # first: a signal may land between the two renames
            target = artifact.dest / name
            if os.path.lexists(target):
                if _is_dir(target) and not os.access(target, os.W_OK):
                    closed[name] = target.lstat()
                    _open_up(str(target))
                os.rename(target, trash / name)
            os.rename(tree / name, target)
        for name in entries:
            if _is_dir(target := artifact.dest / name):
                _settle(artifact, str(target), artifact.dir_mode)
    except BaseException as exc:  # SIGTERM too: the old version must not be lost half-way
        # What could not be put back stays in the trash, for a person to find; the next run clears it.
        clear_trash = _roll_back(artifact, tree, trash, reversed(moved), closed)
        if isinstance(exc, OSError):
            raise local_error(exc, f"moving files into {artifact.dest}") from None
        raise
    else:
        clear_trash = True
    finally:
        if clear_trash:
            remove_tree(trash)


def _roll_back(
    artifact: Artifact, tree: Path, trash: Path, names: Iterable[str], closed: dict[str, os.stat_result]
) -> bool:
    """Put the old entries back, each as it was; whether every one of them made it."""
    complete = True
    for name in names:
        target, old = artifact.dest / name, trash / name
        try:
            if not os.path.lexists(tree / name):  # the new entry made it in: take it out
                _remove(target)
            if os.path.lexists(old):
                os.rename(old, target)
            if name in closed:  # opened up, whether or not it then left
                os.chmod(target, stat.S_IMODE(closed[name].st_mode))
                os.chown(target, closed[name].st_uid, closed[name].st_gid, follow_symlinks=False)
        except OSError:
            complete = False
    return complete


def _is_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _remove(path: Path) -> None:
    if _is_dir(path):
        remove_tree(path, ignore_errors=False)
    else:
        path.unlink(missing_ok=True)


def _open_up(directory: str) -> None:
    """Make a directory fetcher published writable again: as its owner, or by owning it first."""
    try:
        os.chmod(directory, stat.S_IRWXU)
    except PermissionError:  # --owner gave it away; CAP_CHOWN, which that took, takes it back
        os.chown(directory, os.geteuid(), -1, follow_symlinks=False)
        os.chmod(directory, stat.S_IRWXU)


def remove_tree(path: Path, *, ignore_errors: bool = True) -> None:
    """shutil.rmtree, after opening up directories that --dir-mode or --owner closed.

    Without CAP_DAC_OVERRIDE, as in a pod, nothing can be removed from a 0555
    directory, or from one --owner gave to another user.
    """
    if not _is_dir(path):
        return
    with contextlib.suppress(OSError):  # what stays shut, rmtree reports, or ignores as asked
        _open_up(str(path))
    for directory, dirs, _files in os.walk(path):  # top-down: opened before it is listed
        for child in (os.path.join(directory, name) for name in dirs):
            if not os.path.islink(child):
                with contextlib.suppress(OSError):
                    _open_up(child)
    shutil.rmtree(path, ignore_errors=ignore_errors)


def _finish_tree(artifact: Artifact, tree: Path) -> dict[str, list[int]]:
    """Flush and stamp files, then apply --file-mode, --dir-mode and --owner, in that order.

    Modes before owner: once given away, a file's mode is no longer ours to change.
    Bottom-up: a directory is closed only after everything under it is done.
    Top-level directories are left to ``_settle`` once they are in dest.
    """
    stamps: dict[str, list[int]] = {}
    try:
        for directory, dirs, files in os.walk(tree, topdown=False):
            for name in files:
                path = os.path.join(directory, name)
                if not os.path.islink(path):
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
                    try:
                        os.fsync(fd)
                        info = os.fstat(fd)
                        stamps[os.path.relpath(path, tree)] = [info.st_size, info.st_mtime_ns]
                    finally:
                        os.close(fd)
                _settle(artifact, path, artifact.file_mode)
            if directory != str(tree):
                for name in dirs:
                    _settle(artifact, os.path.join(directory, name), artifact.dir_mode)
            else:  # top-level symlinks are never moved into: settle them now
                for name in dirs:
                    if os.path.islink(path := os.path.join(directory, name)):
                        _settle(artifact, path, None)
    except OSError as exc:
        raise local_error(exc, "setting ownership and modes") from None
    return stamps


def _settle(artifact: Artifact, path: str, mode: int | None) -> None:
    """The mode asked for, then the owner: a symlink only gets the owner."""
    if mode is not None and not os.path.islink(path):
        os.chmod(path, mode)
    _own(artifact, path)


def check_owner(artifact: Artifact, staging: Path) -> None:
    """Fail before the download, not after it, when --owner cannot be applied here."""
    if artifact.owner is None:
        return
    probe = staging / "owner-probe"
    try:
        probe.touch()
        _own(artifact, str(probe))
        probe.unlink()
    except OSError as exc:
        raise local_error(exc, "checking --owner") from None


def _own(artifact: Artifact, path: str) -> None:
    if artifact.owner is None:
        return
    uid, gid = artifact.owner
    try:
        os.chown(path, uid, -1 if gid is None else gid, follow_symlinks=False)
    except PermissionError:
        raise LocalFilesystemError(
            f"cannot chown to {uid}{'' if gid is None else f':{gid}'}: permission denied "
            "(--owner needs root or CAP_CHOWN; drop it or set fsGroup instead)"
        ) from None


def _write_marker(artifact: Artifact, marker: Marker) -> None:
    path = _marker_path(artifact)
    temporary = path.with_suffix(".tmp")
    try:
        with temporary.open("w", encoding="utf-8") as out:
            json.dump(asdict(marker), out, indent=1, sort_keys=True)
            out.flush()
            os.fsync(out.fileno())
        os.rename(temporary, path)
        _fsync_dir(artifact.state_dir)
    except OSError as exc:
        raise local_error(exc, "writing the marker") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
