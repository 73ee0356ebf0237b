"""The state directory, and the only step that writes into dest itself.

Everything is staged under ``dest/.fetcher/``; ``publish`` moves it into
dest only once the digest matched, after ownership and modes are set and
the files are flushed to disk.

Moving a tree into dest takes a rename per top-level entry, and a kill -9
can land between any two of them. So before the first rename a journal
(``.fetcher/journal.json``, fsynced) lists every move, the markers that
stop being true and the marker that will be. Each move is a rename, and
where each entry stands (in staging, in dest, in the trash) tells which
moves were made, so finishing or undoing a publish is idempotent: a kill
during recovery is recovered from too. The next run, under the lock and
before anything else, finishes an interrupted publish (its staged content
was verified and finished before the journal was written), or undoes it
when it cannot be finished. A marker is written only once dest holds what
it describes, and the journal is removed after it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import stat
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog

from fetcher import STATE_DIR, __version__
from fetcher.errors import LocalFilesystemError, UsageError, local_error
from fetcher.plan import Artifact
from fetcher.spool import ArtifactSpool

JOURNAL = "journal.json"
LOCK = "lock"
PROBE = ".fetcher-probe-"  # dest's one entry under --state-dir, for an instant: can a rename get there?
MARKER_FORMAT = 2

log = structlog.get_logger("fetcher")


@dataclass(frozen=True)
class Record:
    """What was fetched, as the marker will record it."""

    identity: str | None  # what the source was resolved to: a commit, a listing's digest (None: one object)
    sha256: str | None  # one object's digest, as streamed (None: a directory, whose files each have one)
    size: int
    format: str  # tar, tar.gz, ..., zip, file, or directory
    objects: list[dict[str, Any]]  # the manifest: path, size, digest and pin of every object
    selection: dict[str, Any]  # --include, --exclude and the digest of --sha256sums: others mean fetching again


@dataclass(frozen=True)
class Marker:
    """What was published, to skip the work when a restarted pod asks again: JSON, read back as JSON."""

    source: str
    identity: str | None
    sha256: str | None
    size: int
    format: str
    files: int
    entries: list[str]  # top-level names this artifact put in dest
    stamps: dict[str, list[int]]  # every regular file published, relative to dest: [size, mtime_ns]
    objects: list[dict[str, Any]]
    selection: dict[str, Any]
    settings: dict[str, Any]  # ownership and modes applied: other settings mean publishing again
    published_at: str
    fetcher_version: str
    marker_format: int = MARKER_FORMAT


def _marker_path(artifact: Artifact) -> Path:
    return artifact.state_dir / f"{artifact.key}.json"


def settings_of(artifact: Artifact) -> dict[str, Any]:
    owner = None if artifact.owner is None else list(artifact.owner)
    return {"owner": owner, "file_mode": artifact.file_mode, "dir_mode": artifact.dir_mode}


def _readable(settings: dict[str, Any]) -> str:
    """Settings as a person writes them."""
    owner = settings.get("owner")
    shown = [f"owner={owner[0]}{'' if owner[1] is None else f':{owner[1]}'}" if owner else "owner=None"]
    for name in ("file_mode", "dir_mode"):
        mode = settings.get(name)
        shown.append(f"{name}={mode:04o}" if isinstance(mode, int) else f"{name}=None")
    return " ".join(shown)


def read_marker(path: Path) -> Marker | None:
    return _parse_marker(_read_text(path))


def _parse_marker(text: str | None) -> Marker | None:
    """The marker, or None. A marker of an older format still says which entries fetcher published
    (so they stay fetcher's to replace), but never stands for the artifact: its settings are unknown."""
    try:
        data = json.loads(text) if text is not None else None
        if not isinstance(data, dict):
            return None
        if "marker_format" not in data:
            data = {
                name: data.get(name, default)
                for name, default in (
                    ("source", "?"),
                    ("identity", None),
                    ("sha256", None),
                    ("size", 0),
                    ("format", "?"),
                    ("files", 0),
                    ("entries", []),
                    ("stamps", {}),
                    ("objects", []),
                    ("selection", {}),
                    ("published_at", "?"),
                    ("fetcher_version", "?"),
                )
            } | {"settings": {"older marker format": True}, "marker_format": 1}
        return Marker(**data)
    except (ValueError, TypeError):
        return None


def stale(artifact: Artifact, marker: Marker) -> str | None:
    """Why this earlier publication cannot stand for the artifact asked for now, if it cannot.

    "As published" is each file's size and mtime: cheap enough for every pod
    start, and any ordinary write changes one of them. Re-hashing a 20 GB
    model on each restart would cost more than most downloads.
    """
    if marker.marker_format != MARKER_FORMAT:
        return f"published by fetcher {marker.fetcher_version}, whose marker this one does not read"
    if artifact.sha256 is not None and marker.sha256 != artifact.sha256:
        return f"published with sha256 {marker.sha256}, now {artifact.sha256} is asked for"
    if marker.settings != (settings := settings_of(artifact)):
        return f"published with {_readable(marker.settings)}, now {_readable(settings)}"
    for name in ("include", "exclude"):
        if marker.selection.get(name, []) != list(getattr(artifact, name)):
            return f"published with --{name} {marker.selection.get(name, [])}, now {list(getattr(artifact, name))}"
    if (artifact.sha256sums is None) != (marker.selection.get("sha256sums") is None):
        return "published " + ("without" if artifact.sha256sums is not None else "with") + " --sha256sums"
    for relative in marker.stamps:
        if (why := stale_file(artifact.dest, relative, marker)) is not None:
            return why
    return None


def stale_file(dest: Path, relative: str, marker: Marker) -> str | None:
    """Why a published file is no longer as published (its size or mtime), if it is not."""
    stamp = marker.stamps.get(relative)
    if stamp is None:
        return f"{relative} was not published"
    try:
        info = os.lstat(dest / relative)
    except OSError as exc:
        return f"{relative}: {exc.strerror}"
    if (info.st_size, info.st_mtime_ns) != tuple(stamp) or not stat.S_ISREG(info.st_mode):
        return f"{relative} changed since it was published (size or mtime)"
    return None


def previous(artifact: Artifact) -> Marker | None:
    """The marker of an earlier publication of this artifact, whether or not it still holds."""
    return read_marker(_marker_path(artifact))


def interrupted(artifact: Artifact) -> bool:
    """Whether a publish into this dest was interrupted: then no marker may be trusted before recovery."""
    return os.path.lexists(artifact.state_dir / JOURNAL)


def left_behind(artifact: Artifact, keep: frozenset[str]) -> bool:
    """Whether a run was killed before it removed its staging or trash, or a download spool is there
    of an artifact no longer asked for (not one of ``keep``, the keys of this dest's artifacts): the
    trash may hold a whole old version, and a spool as much, which only ``workspace`` clears,
    under the lock.

    Not while another fetcher holds the lock: they may be its own, live, and waiting for its
    whole download would hold up a run whose model is present. Whoever takes the lock next
    clears them.
    """
    state = artifact.state_dir
    try:
        staged, spools = _leftovers(state)
        if not staged and spools <= keep:
            return False
        fd = os.open(state / LOCK, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:  # no state directory, or leftovers and no lock file: no one holds it
        return os.path.isdir(state)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # let go at once, with the descriptor
    except OSError:  # held: EWOULDBLOCK
        return False
    finally:
        os.close(fd)
    return True


_SCANNED: dict[Path, tuple[int, bool, frozenset[str]]] = {}  # state directory -> (its mtime, what _leftovers found)


def _leftovers(state: Path) -> tuple[bool, frozenset[str]]:
    """Whether the state directory holds a staging or trash, and the keys of its download spools;
    scanned again only once it changed.

    Why: every artifact of a dest shares its state directory, and a restart of 1,600 artifacts
    that scanned it for each one spent 3.7 s of its 5.9 s there.

    Raises:
        OSError: the directory cannot be read (FileNotFoundError: there is none).
    """
    mtime = os.stat(state).st_mtime_ns
    if (seen := _SCANNED.get(state)) is not None and seen[0] == mtime:
        return seen[1], seen[2]
    with os.scandir(state) as entries:
        names = [entry.name for entry in entries]
    staged = any(name.startswith(_LEFTOVERS) for name in names)
    spools = frozenset(key for name in names if (key := ArtifactSpool.key_of(name)) is not None)
    if time.time_ns() - mtime > 2 * 10**9:  # a change in the same tick would keep this mtime (as git's racy index)
        _SCANNED[state] = (mtime, staged, spools)
    return staged, spools


@contextmanager
def workspace(artifact: Artifact, siblings: frozenset[str] = frozenset()) -> Iterator[Path]:
    """A locked, fresh staging directory; removed on the way out, whatever happened.

    Under the lock, first of all, an interrupted publish is finished or undone;
    only then are leftovers cleaned. On the way out the state directory goes
    too when nothing in it is worth keeping (no marker, no download to resume
    from): a failed first run leaves dest as it found it.

    ``siblings``: keys of the other artifacts this run puts in the same dest,
    whose download spools are kept for them to resume from.
    """
    state = artifact.state_dir
    lock = _lock(artifact) if artifact.state_root is None else _lock_elsewhere(artifact)
    try:
        _recover(artifact.dest, state)
        _clean_leftovers(state)
        ArtifactSpool.clean(state, keep=set(siblings | {artifact.key}))
        staging = state / f"staging-{uuid.uuid4().hex[:12]}"
        try:
            staging.mkdir()
            yield staging
        finally:
            if not os.path.lexists(state / JOURNAL):  # else the next run needs staging to finish the publish
                remove_tree(staging)
    finally:
        _unlock(state, lock)


def _lock(artifact: Artifact, state: Path | None = None) -> int:
    """Take dest's lock: one fetcher at a time in a dest.

    The lock file is removed with an empty state directory (see ``_unlock``), so
    a lock taken on a file that is no longer the one at the lock's path is no
    lock at all: try again until the file locked is the one in place.
    """
    state = state or artifact.state_dir
    while True:
        try:
            state.mkdir(parents=True, exist_ok=True)
            fd = os.open(state / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except FileNotFoundError:  # another fetcher removed the state directory in between
            continue
        except OSError as exc:
            where = f"--dest {artifact.dest}" if artifact.state_root is None else f"--state-dir {artifact.state_root}"
            raise LocalFilesystemError(f"cannot write to {where}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held, current = os.fstat(fd), os.stat(state / LOCK, follow_symlinks=False)
            if (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino):
                return fd
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _lock_elsewhere(artifact: Artifact) -> int:
    """Take dest's lock in --state-dir, once it is known that publishing from there into dest can work.

    Publishing is renames, which fail across filesystems, and across two mounts of one
    filesystem too: a rename from the state directory into dest is tried before any
    download, not after it. State a run without --state-dir left in dest moves there.

    Raises:
        UsageError: --state-dir and dest are not on one mount.
    """
    dest, state = artifact.dest, artifact.state_dir
    try:
        dest.mkdir(parents=True, exist_ok=True)
        state.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise local_error(exc, f"preparing --dest {dest} and --state-dir {artifact.state_root}") from exc
    old = dest / STATE_DIR
    if _is_dir(old) and not os.path.lexists(state):
        fd = _lock(artifact, old)
        try:
            os.rename(old, state)
        except OSError as exc:
            os.close(fd)
            if exc.errno != errno.EXDEV:
                raise local_error(exc, f"moving {old} to --state-dir {artifact.state_root}") from exc
        else:
            log.info("state moved to --state-dir", dest=str(dest), state_dir=str(state))
            _unlock(state, fd)
    fd = _lock(artifact)
    for left in dest.glob(f"{PROBE}*.tmp"):  # a kill between the probe's rename and its unlink
        left.unlink(missing_ok=True)
    probe = f"{PROBE}{uuid.uuid4().hex[:12]}.tmp"
    try:
        (state / probe).touch()
        os.rename(state / probe, dest / probe)
        os.unlink(dest / probe)
    except OSError as exc:
        (state / probe).unlink(missing_ok=True)
        _unlock(state, fd)
        if exc.errno == errno.EXDEV:
            raise UsageError(
                f"--state-dir {artifact.state_root} is not on the mount of --dest {dest}: fetcher publishes by "
                "rename; in a pod, mount one volume at a parent of both (the server mounts dest's subPath)"
            ) from exc
        raise local_error(exc, f"writing to --dest {dest} and --state-dir {artifact.state_root}") from exc
    return fd


def _unlock(state: Path, fd: int) -> None:
    """Release the lock; with it the state directory, when it holds nothing but the lock."""
    try:
        if os.listdir(state) == [LOCK]:
            os.unlink(state / LOCK)  # still holding it: a waiter finds the path gone and starts over
            with contextlib.suppress(OSError):  # another fetcher just created a new lock file: it stays
                os.rmdir(state)
    except OSError:
        pass  # the lock file stays: harmless
    finally:
        os.close(fd)


_LEFTOVERS = ("staging-", "trash-")


def _clean_leftovers(state: Path) -> None:
    """Remove what an earlier run left when it was killed mid-way.

    Called only once no publish is pending, whose staging and trash these are.
    """
    for entry in state.iterdir():
        if entry.name.endswith(".tmp"):
            entry.unlink(missing_ok=True)
        elif entry.name.startswith(_LEFTOVERS):
            remove_tree(entry)


@dataclass(frozen=True)
class Journal:
    """What a publish is about to do to dest: written and fsynced before its first rename."""

    staging: str  # the staging directory's name in the state directory; the new entries are in its tree/
    trash: str  # where the old entries go, in the state directory
    entries: list[str]  # the new version's top-level entries, moved in in this order
    replaced: list[str]  # those of them fetcher published before: the old one goes to the trash first
    removed: list[str]  # entries fetcher published before that the new version does not have
    closed: dict[str, list[int]]  # old directories opened up to leave: [mode, uid, gid] as they were
    markers: dict[str, str]  # marker files that stop being true, by name: their text, to restore on undo
    marker: str  # the new marker's file name
    marker_text: str
    owner: list[int] | None  # [uid, gid or -1], for the top-level directories once in dest
    dir_mode: int | None


def publish(artifact: Artifact, staging: Path, record: Record, siblings: frozenset[str] = frozenset()) -> Marker:
    """Set ownership and modes on what was verified, then move it into dest under a journal, marker last."""
    tree = staging / "tree"
    tree.mkdir(exist_ok=True)
    stamps = _finish_tree(artifact, tree)
    entries = sorted(os.listdir(tree))
    marker = Marker(
        source=artifact.display_source,
        identity=record.identity,
        sha256=record.sha256,
        size=record.size,
        format=record.format,
        files=len(stamps),
        entries=entries,
        stamps=stamps,
        objects=record.objects,
        selection=record.selection,
        settings=settings_of(artifact),
        published_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        fetcher_version=__version__,
    )
    journal = _plan(artifact, staging, marker, siblings)
    state, dest = artifact.state_dir, artifact.dest
    try:
        _write_atomically(state / JOURNAL, json.dumps(asdict(journal), indent=1))
    except OSError as exc:
        (state / f"{JOURNAL}.tmp").unlink(missing_ok=True)
        raise local_error(exc, f"moving files into {dest}") from exc
    try:
        _forward(dest, state, journal)
    except BaseException as exc:  # SIGTERM too: the old version must not be lost half-way
        try:
            _backward(dest, state, journal)
        except OSError:  # the journal stays, with staging and trash: the next run finishes the publish
            log.warning("publish left unfinished: the next run completes it", dest=str(dest))
        if isinstance(exc, OSError):
            raise local_error(exc, f"moving files into {dest}") from exc
        raise
    return marker


def check_nesting(artifact: Artifact, entries: list[str]) -> None:
    """Refuse to let two models share one directory: an entry of ``artifact`` (to publish, or
    published and standing) where another artifact of the run has its dest, or its own dest in
    an entry that a marker of the dest holding it lists (one no longer configured: a configured
    one ran first and refused).

    Raises:
        UsageError: naming the entry and the other artifact.
    """
    for name, holder in artifact.nested_dests:
        if name in entries:
            raise UsageError(
                f"{artifact.display_source} publishes {name!r} into {artifact.dest}, where {holder} has its dest: "
                "give that one a dest outside this one's entries"
            )
    for outer, state, name in artifact.inside:
        for path in sorted(state.glob("*.json")):
            other = _parse_marker(_read_text(path)) if path.name != JOURNAL else None
            if other is not None and name in other.entries:
                raise UsageError(
                    f"{artifact.display_source}: its dest {artifact.dest} lies in {name!r}, which {other.source} "
                    f"published into {outer} and is no longer configured: remove {outer / name}, or give this "
                    "one another dest"
                )


def _plan(artifact: Artifact, staging: Path, marker: Marker, siblings: frozenset[str]) -> Journal:
    """The journal of this publish, after the checks that must fail before anything changes.

    Only what fetcher published (entries listed by this artifact's marker, or by
    the marker of an artifact no longer configured, which this publish retires)
    is replaced or removed. Anything else in dest of a new entry's name is the
    user's: refused, as is an entry another artifact of this run publishes.
    """
    state, dest, entries = artifact.state_dir, artifact.dest, marker.entries
    check_nesting(artifact, entries)
    retired: dict[str, str] = {}
    owned: set[str] = set()
    kept: set[str] = set()
    for path in sorted(state.glob("*.json")):
        if path.name == JOURNAL:
            continue
        text = _read_text(path)
        other = _parse_marker(text)
        clash = sorted(set(other.entries) & set(entries)) if other is not None else []
        if path.stem != artifact.key and not clash:
            kept.update(other.entries if other is not None else [])
            continue
        if path.stem != artifact.key and path.stem in siblings:
            raise UsageError(
                f"{artifact.display_source} and {other.source if other else '?'} both publish {clash[0]!r} into "
                f"{artifact.dest}: give them different dests, or unpack one with --strip-components"
            )
        if text is not None:
            retired[path.name] = text
        owned.update(other.entries if other is not None else [])
    for name in entries:
        if os.path.lexists(dest / name) and name not in owned:
            raise LocalFilesystemError(
                f"{name!r} in --dest {dest} was not published by fetcher: move it away, or choose another dest"
            )
    replaced = [name for name in entries if os.path.lexists(dest / name)]
    removed = sorted(
        name
        for name in owned - set(entries) - kept
        if name != STATE_DIR and "/" not in name and os.path.lexists(dest / name)
    )
    closed = {}  # what a mover without CAP_DAC_OVERRIDE must open up, whoever recovers: as it was
    for name in replaced + removed:
        if _is_dir(target := dest / name):
            info = target.lstat()
            if info.st_uid != os.geteuid() or not info.st_mode & stat.S_IWUSR:
                closed[name] = [stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid]
    uid, gid = artifact.owner if artifact.owner is not None else (None, None)
    owner = None if uid is None else [uid, -1 if gid is None else gid]
    return Journal(
        staging=staging.name,
        trash=f"trash-{uuid.uuid4().hex[:12]}",
        entries=entries,
        replaced=replaced,
        removed=removed,
        closed=closed,
        markers=retired,
        marker=_marker_path(artifact).name,
        marker_text=json.dumps(asdict(marker), indent=1, sort_keys=True),
        owner=owner,
        dir_mode=artifact.dir_mode,
    )


def _recover(dest: Path, state: Path) -> None:
    """Finish a publish a kill interrupted, or undo it when it cannot be finished."""
    path = state / JOURNAL
    if not os.path.lexists(path):
        return
    try:
        journal = Journal(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as exc:
        raise LocalFilesystemError(
            f"{path}: the journal of an interrupted publish cannot be read ({exc}); "
            f"compare {dest} with the staging-* directory beside the journal, then remove the journal"
        ) from exc
    try:
        _forward(dest, state, journal)
        log.info("interrupted publish finished", dest=str(dest), entries=journal.entries[:10])
    except (OSError, LocalFilesystemError) as exc:  # a chown the journal asks for, without CAP_CHOWN now
        try:
            _backward(dest, state, journal)
        except OSError as undo:
            failure = exc if isinstance(exc, LocalFilesystemError) else local_error(exc, "finishing it")
            raise LocalFilesystemError(
                f"an interrupted publish into {dest} can be neither finished nor undone ({failure}; undoing it: "
                f"{undo.strerror or undo}); its journal is {path}"
            ) from undo
        reason = exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)
        log.warning("interrupted publish undone", dest=str(dest), reason=reason)


def _forward(dest: Path, state: Path, journal: Journal) -> None:
    """Do what the journal says, skipping what is done already (where each entry stands tells)."""
    tree, trash = state / journal.staging / "tree", state / journal.trash
    for name in journal.markers:  # untrue from the first rename on
        (state / name).unlink(missing_ok=True)
    _fsync_dir(state)
    trash.mkdir(exist_ok=True)
    for name in journal.entries:
        new, target, old = tree / name, dest / name, trash / name
        if name in journal.replaced and os.path.lexists(new) and not os.path.lexists(old):
            _leave(target, old, name in journal.closed)
        if os.path.lexists(new):
            os.rename(new, target)
    for name in journal.removed:
        if not os.path.lexists(trash / name):
            _leave(dest / name, trash / name, name in journal.closed)
    owner = None if journal.owner is None else (journal.owner[0], journal.owner[1])
    for name in journal.entries:
        if _is_dir(target := dest / name):
            if journal.dir_mode is not None:
                os.chmod(target, journal.dir_mode)
            _chown(str(target), owner)
    _fsync_dir(dest)
    _write_atomically(state / journal.marker, journal.marker_text)
    _done(state, journal)


def _backward(dest: Path, state: Path, journal: Journal) -> None:
    """Undo what the journal says, as far as it was done: each old entry back as it was, with its marker."""
    tree, trash = state / journal.staging / "tree", state / journal.trash
    (state / journal.marker).unlink(missing_ok=True)
    _fsync_dir(state)
    for name in reversed(journal.removed):
        if os.path.lexists(trash / name) and not os.path.lexists(dest / name):
            os.rename(trash / name, dest / name)
    for name in reversed(journal.entries):
        new, target, old = tree / name, dest / name, trash / name
        if not os.path.lexists(new) and os.path.lexists(target):  # the new entry made it in: back to staging
            _leave(target, new, False)
        if os.path.lexists(old):
            os.rename(old, target)
    for name, (mode, uid, gid) in journal.closed.items():  # opened up, whether or not it then left
        if not _is_dir(target := dest / name):
            continue
        now = target.lstat()  # changed only where it differs: a chown to the same owner still needs CAP_CHOWN
        if stat.S_IMODE(now.st_mode) != mode:
            os.chmod(target, mode)  # before the owner: ours while we own it
        if (now.st_uid, now.st_gid) != (uid, gid):
            os.chown(target, uid, gid, follow_symlinks=False)
    _fsync_dir(dest)
    for name, text in journal.markers.items():
        _write_atomically(state / name, text)
    _done(state, journal)


def _leave(path: Path, to: Path, closed: bool) -> None:
    """Move an entry out of dest (or back out of it).

    A directory moves to another parent only while its mover may write to it
    (its ".." changes), which in a pod without CAP_DAC_OVERRIDE means owning it
    with the write bit set: one that --dir-mode or --owner closed is opened up
    first. Whether the mover needs that depends on its capabilities, which may
    not be those of the run that wrote the journal: a refusal opens it up too.
    """
    if not os.path.lexists(path):
        return
    if closed:
        _open_up(str(path))
    try:
        os.rename(path, to)
    except PermissionError:
        if closed or not _is_dir(path):
            raise
        _open_up(str(path))
        os.rename(path, to)


def _done(state: Path, journal: Journal) -> None:
    """The publish is complete, one way or the other: the journal goes, then the trash."""
    (state / JOURNAL).unlink(missing_ok=True)
    _fsync_dir(state)
    remove_tree(state / journal.trash)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, ValueError):
        return None


def _is_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


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
    Top-level directories are settled by the publish once they are in dest.
    """
    stamps: dict[str, list[int]] = {}
    try:
        for directory, dirs, files in os.walk(tree, topdown=False):
            for name in files:
                path = os.path.join(directory, name)
                if not os.path.islink(path):
                    stamps[os.path.relpath(path, tree)] = _flush(path, artifact.file_mode)
                _settle(artifact, path, artifact.file_mode)
            if directory != str(tree):
                for name in dirs:
                    _settle(artifact, os.path.join(directory, name), artifact.dir_mode)
            else:  # top-level symlinks are never moved into: settle them now
                for name in dirs:
                    if os.path.islink(path := os.path.join(directory, name)):
                        _settle(artifact, path, None)
    except OSError as exc:
        raise local_error(exc, "setting ownership and modes") from exc
    return stamps


def _flush(path: str, final_mode: int | None) -> list[int]:
    """fsync a staged file; its [size, mtime_ns].

    A file the archive gave no read permission (0000, 0200) cannot be opened
    by its owner without CAP_DAC_OVERRIDE, as in a locked-down pod: it is
    opened up to owner-read for the fsync, then given back its own mode
    unless --file-mode sets another next. A mode change leaves mtime as it is.
    """
    restore = None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except PermissionError:
        restore = stat.S_IMODE(os.lstat(path).st_mode)
        os.chmod(path, restore | stat.S_IRUSR)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
        info = os.fstat(fd)
        if restore is not None and final_mode is None:
            os.fchmod(fd, restore)
        return [info.st_size, info.st_mtime_ns]
    finally:
        os.close(fd)


def _settle(artifact: Artifact, path: str, mode: int | None) -> None:
    """The mode asked for, then the owner: a symlink only gets the owner."""
    if mode is not None and not os.path.islink(path):
        os.chmod(path, mode)
    _chown(path, artifact.owner)


def check_owner(artifact: Artifact, staging: Path) -> None:
    """Fail before the download, not after it, when --owner cannot be applied here."""
    if artifact.owner is None:
        return
    probe = staging / "owner-probe"
    try:
        probe.touch()
        _chown(str(probe), artifact.owner)
        probe.unlink()
    except OSError as exc:
        raise local_error(exc, "checking --owner") from exc


def _chown(path: str, owner: tuple[int, int | None] | None) -> None:
    if owner is None:
        return
    uid, gid = owner
    try:
        os.chown(path, uid, -1 if gid is None or gid < 0 else gid, follow_symlinks=False)
    except PermissionError:
        raise LocalFilesystemError(
            f"cannot chown to {uid}{'' if gid is None or gid < 0 else f':{gid}'}: permission denied "
            "(--owner needs root or CAP_CHOWN; drop it or set fsGroup instead)"
        ) from None


def _write_atomically(path: Path, text: str) -> None:
    """A whole file or none: written aside, fsynced, renamed into place, the directory fsynced."""
    temporary = path.with_name(f"{path.name}.tmp")
    with temporary.open("w", encoding="utf-8") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.rename(temporary, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
