"""One artifact, end to end: skip if present, else resolve → transfer → pipeline → publish.

The source resolves the artifact into a manifest; one object (a file or an
archive) streams through the pipeline, a directory's files go through one
pool of connections, and either way the staged tree is published atomically
with a marker that records the manifest.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from fetcher.cache import POLL, CachedArtifact, NodeCache, key_of, say_waiting, tree_name
from fetcher.errors import ArchiveError, DiskFullError, IntegrityError, LocalFilesystemError, TransientFetchError
from fetcher.manifest import Manifest, select
from fetcher.plan import Artifact, check_directory_options
from fetcher.progress import Progress, human_bytes
from fetcher.publish import (
    Marker,
    Record,
    check_nesting,
    check_owner,
    interrupted,
    left_behind,
    previous,
    publish,
    remove_tree,
    stale,
    stale_file,
    workspace,
)
from fetcher.spool import ArtifactSpool
from fetcher.unpack import Budget, check_links, show

if TYPE_CHECKING:
    from fetcher import pipeline
    from fetcher.pool import DirectoryTransfer, Published
    from fetcher.sources import Source

log = structlog.get_logger("fetcher")
T = TypeVar("T")


@dataclass(frozen=True)
class Result:
    artifact: Artifact
    skipped: bool
    size: int
    files: int
    seconds: float


def fetch(artifact: Artifact, siblings: frozenset[str] = frozenset()) -> Result:
    """``siblings``: keys of the other artifacts of this run that publish into the same dest.

    A dest that this call created is removed again when the call fails and
    leaves it empty: a failed first run leaves the filesystem as it found it.
    """
    created = _ensure_dest(artifact)
    try:
        return _Fetch(artifact, siblings).run()
    except BaseException:
        for directory in reversed(created):
            try:
                directory.rmdir()
            except OSError:  # not empty (another fetcher, a resumable download): it stays
                break
        raise


class _Fetch:
    """One artifact's run: its source, resolved at most once, and the checks that may skip it."""

    def __init__(self, artifact: Artifact, siblings: frozenset[str], *, dry_run: bool = False) -> None:
        """``dry_run``: nothing is written, not even into --cache-dir."""
        self.artifact = artifact
        self.siblings = siblings
        self.started = time.monotonic()
        self._source: Source | None = None
        self._manifest: Manifest | None = None
        self._sums: dict[str, str] | None = None
        self._sums_read = False
        self._node_cache: NodeCache | None = None  # --cache-dir, as sums: read once, when first asked for
        self._node_read = dry_run  # a dry run writes nothing, not even into the cache

    def run(self) -> Result:
        artifact = self.artifact
        try:
            # A marker is trusted without the lock only when no publish is pending in dest: else the
            # workspace finishes or undoes that one first, and looks again. What a killed run left
            # (an old version in the trash) is cleared there too, then the marker looked at again.
            if (
                not interrupted(artifact)
                and not left_behind(artifact, self.siblings | {artifact.key})
                and (earlier := previous(artifact)) is not None
            ):
                if (why := self._changed(earlier)) is None:
                    return self._skip(earlier)
                log.info("fetching again", source=artifact.display_source, dest=str(artifact.dest), reason=why)
            return self._fetch()
        finally:
            if self._source is not None:
                self._source.close()

    # --- whether what is in dest still stands ------------------------------------------

    def _changed(self, marker: Marker) -> str | None:
        """Why the earlier publication cannot stand for the artifact now, if it cannot.

        Local checks first (settings, each file's size and mtime). Then, for a directory:
        a pinned manifest (a commit, --sha256sums) needs no request; a mutable one (a
        branch, a prefix) costs one small one (a revision lookup, a listing), never a download.
        """
        if (why := stale(self.artifact, marker)) is not None or marker.format != "directory":
            return why
        if self.artifact.sha256sums is not None:
            if marker.selection.get("sha256sums") != _digest_of(self.sums()):
                return "--sha256sums lists other files or digests than those published"
            return None
        identity = self._identity()
        if identity != marker.identity:
            return f"{self.artifact.display_source} is now {identity}, published was {marker.identity}"
        return None

    def _identity(self) -> str | None:
        identify: Callable[[], str | None] | None = getattr(self.source, "identity", None)
        if identify is not None:
            return self._retrying(identify)
        return self.manifest().identity

    # --- resolving, once ---------------------------------------------------------------------

    @property
    def source(self) -> Source:
        if self._source is None:
            from fetcher.sources import open_source  # imported here: a run that skips never loads httpx or boto3

            self._source = open_source(self.artifact)
        return self._source

    def sums(self) -> dict[str, str] | None:
        if not self._sums_read and self.artifact.sha256sums is not None:
            from fetcher.sources import read_sha256sums

            self._sums = self._retrying(lambda: read_sha256sums(self.artifact))
        self._sums_read = True
        return self._sums

    def manifest(self) -> Manifest:
        if self._manifest is None:
            artifact = self.artifact
            sums = self.sums()  # before any listing: a mistake in it is the user's, found without the network
            resolved = self._resolved()
            check_directory_options(artifact, resolved.directory)
            origin = f"--sha256sums {Path(artifact.sha256sums).name}" if artifact.sha256sums else ""
            self._manifest = select(resolved, artifact.include, artifact.exclude, sums, origin, artifact.display_source)
            if resolved.note:
                log.info("resolved", source=artifact.display_source, note=resolved.note)
        return self._manifest

    def _resolved(self) -> Manifest:
        """The source's manifest; with --cache-dir, the one kept for its immutable identity (a hub
        commit, an OCI digest), which a pinned reference then finds without a request."""
        identify: Callable[[], str] | None = getattr(self.source, "identity", None)
        node = self._node() if identify is not None else None
        if identify is None or node is None:
            return self._retrying(self.source.resolve)
        identity = self._retrying(identify)
        kept = node.manifest(identity)
        if kept is not None and kept.image_subtree is not None and (self.artifact.include or self.artifact.exclude):
            kept = None  # refused by the source, which says why
        if kept is not None:
            log.info("manifest from the cache", source=self.artifact.display_source, identity=identity)
            return kept
        resolved = self._retrying(self.source.resolve)
        if resolved.identity == identity:
            node.keep_manifest(resolved)
        return resolved

    def _retrying(self, call: Callable[[], T]) -> T:
        """A small request (a listing, a revision lookup), retried like a download."""
        from tenacity import Retrying, retry_if_exception_type, stop_after_attempt  # not loaded by a run that skips

        from fetcher.backoff import wait_retry_after

        for attempt in Retrying(
            retry=retry_if_exception_type(TransientFetchError),
            stop=stop_after_attempt(self.artifact.retries + 1),
            wait=wait_retry_after(self.artifact.retry_backoff),
            before_sleep=lambda state: log.warning(
                "retrying",
                source=self.artifact.display_source,
                reason=str(state.outcome.exception() if state.outcome else None),
                attempt=state.attempt_number,
            ),
            reraise=True,
        ):
            with attempt:
                return call()
        raise AssertionError("not reached: tenacity returns or raises")

    # --- fetching -----------------------------------------------------------------------------

    def _fetch(self) -> Result:
        artifact = self.artifact
        with workspace(artifact, self.siblings) as staging:
            present = previous(artifact)  # read again under the lock: another pod may just have published
            if present is not None and self._changed(present) is None:
                return self._skip(present)
            check_owner(artifact, staging)
            if artifact.cache_dir is not None and artifact.sha256 is not None:
                node = self._node()
                if node is not None:
                    return self._single_through(node, staging, artifact.sha256)
            manifest = self.manifest()
            check_nesting(self.artifact, _named_entries(manifest))  # what the listing names: before any download
            if manifest.directory:
                return self._directory(manifest, staging, present)
            if artifact.cache_dir is not None:
                log.warning(
                    "not cached",
                    source=artifact.display_source,
                    reason="one file or archive is kept in --cache-dir when its --sha256 is given",
                )
            return self._single(manifest, staging)

    def _single_through(self, node: NodeCache, staging: Path, sha256: str) -> Result:
        """One file or archive pinned by --sha256, downloaded and unpacked once per node.

        What it unpacked to is the cache's entry, under one lock: the fetcher holding it
        downloads, the others wait, then make their dest from it, by links, without a request.
        """
        artifact = self.artifact
        name = tree_name(sha256, json.dumps([artifact.extract, artifact.filename, artifact.strip_components]))
        said: list[float] = []

        def waiting(waited: float) -> None:
            if said and waited < said[-1]:  # another wait began: said anew once it is long enough
                said.clear()
            if say_waiting(waited, said[-1] if said else None, artifact.progress_interval):
                said.append(waited)
                held_by = "another fetcher on this node"
                log.info("waiting for", source=artifact.display_source, held_by=held_by, waited_s=round(waited, 1))

        started = time.monotonic()
        while (lock := node.try_lock(name, exclusive=True)) is None:
            waiting(time.monotonic() - started)
            time.sleep(POLL)
        with lock:
            kept = node.tree(name)
            tree = staging / "tree"
            if kept is not None:
                tree.mkdir()
                why = "a file of it is missing, damaged, or held by another fetcher"
                placed = node.place_tree(
                    kept["entries"], tree, mode=artifact.file_mode, owner=artifact.owner, waiting=waiting
                )
                if placed:
                    if kept.get("format") != "file":  # what unpacking the archive would refuse, a hit refuses
                        _check_limits(kept, artifact)
                    try:
                        check_links(tree)  # the cache is a hostPath: what another pod wrote there is checked
                        return self._from_tree(node, kept, staging)
                    except ArchiveError as exc:
                        why = str(exc)
                log.warning("cache entry unusable: fetching again", source=artifact.display_source, reason=why)
                remove_tree(tree)
            copy = artifact.owner is not None or artifact.file_mode is not None
            digests: dict[str, str] = {}

            def keep(record: Record, outcome: pipeline.Outcome) -> None:
                about = {"format": record.format, "size": record.size, "objects": record.objects}
                about |= {"members": outcome.members, "unpacked": outcome.unpacked}
                if record.format == "file" and record.sha256 is not None:  # the file is the stream hashed
                    digests[artifact.filename] = record.sha256
                try:
                    node.keep_tree(name, tree, copy=copy, about=about, digests=digests)
                except LocalFilesystemError as exc:  # the model is verified and staged: the cache is a bonus
                    log.warning("cache not written", source=artifact.display_source, reason=str(exc))

            result = self._single(self.manifest(), staging, keep=keep, digests=digests)
        if artifact.cache_max_size is not None:
            self._evicted(node.evict(artifact.cache_max_size))
        return result

    def _from_tree(self, node: NodeCache, kept: dict[str, Any], staging: Path) -> Result:
        """A dest made from a kept tree, published as the download it stands for would have been."""
        artifact = self.artifact
        files = sum(1 for e in kept["entries"] if "key" in e)
        log.info("cache hit", source=artifact.display_source, files=files, of=files, cache=str(node.root))
        size, form, sha256 = int(kept.get("size", 0)), str(kept.get("format", "file")), artifact.sha256
        record = Record(None, sha256, size, form, list(kept.get("objects", [])), self._selection())
        marker = publish(artifact, staging, record, self.siblings)
        seconds = time.monotonic() - self.started
        log.info(
            "published",
            source=artifact.display_source,
            dest=str(artifact.dest),
            format=form,
            transfer="cache",
            sha256=sha256,
            verified=True,
            size=size,
            files=marker.files,
            entries=marker.entries[:10],
            seconds=round(seconds, 2),
        )
        return Result(artifact, False, size, marker.files, seconds)

    def _single(
        self,
        manifest: Manifest,
        staging: Path,
        keep: Callable[[Record, pipeline.Outcome], None] | None = None,
        digests: dict[str, str] | None = None,
    ) -> Result:
        """One object, streamed through the pipeline: hashed, and unpacked when it is an archive.

        ``keep``: called once the object is verified and unpacked, before the publish (the node cache),
        with ``digests`` filled by the unpacking.
        """
        from fetcher import pipeline
        from fetcher.sources import One
        from fetcher.transfer import Download, Parallelism

        artifact = self.artifact
        (entry,) = manifest.entries
        expected = entry.digest.hex if entry.digest is not None else None
        if expected is None:
            log.warning(
                "no sha256 given: the download will not be verified",
                source=artifact.display_source,
                hint="set --sha256 / FETCHER_SHA256",
            )
        elif entry.digest is not None and entry.digest.origin != "--sha256":
            log.info(
                "verifying against the source's checksum", source=artifact.display_source, origin=entry.digest.origin
            )
        spool = ArtifactSpool(artifact.state_dir, artifact.key)
        progress = Progress(artifact.display_source, None, artifact.progress_interval)
        download = Download(
            One(self.source, entry, directory=False),
            retries=artifact.retries,
            backoff=artifact.retry_backoff,
            expect_html=artifact.filename.endswith((".html", ".htm")),
            parallelism=Parallelism(
                concurrency=artifact.concurrency,
                part_size=artifact.part_size,
                spool=spool,
                split_below=artifact.split_below,
                copies=lambda head: {"file": 1, "zip": 3}.get(pipeline.detect_format(head, artifact.extract), 2),
            ),
        )
        keep_spool = True  # a later run resumes from it, unless its bytes are known to be useless
        disk_full = False
        try:
            info = download.start()
            total = info.size if info else None
            log.info(
                "downloading", source=artifact.display_source, size=total, size_h=human_bytes(total) if total else None
            )
            progress.total = total
            outcome = pipeline.run(
                download,
                extract=artifact.extract,
                filename=artifact.filename,
                staging=staging,
                limits=pipeline.Limits(artifact.strip_components, artifact.max_unpacked_size, artifact.max_members),
                expected_sha256=expected,
                on_bytes=progress,
                spool=spool,
                spooled=lambda: download.spooled,
                digests=digests,
            )
            if expected is not None and outcome.sha256 != expected:
                raise IntegrityError(
                    f"sha256 mismatch: expected {expected}, got {outcome.sha256} ({outcome.size} bytes)"
                    + ("" if entry.digest is None or entry.digest.origin == "--sha256" else f" ({entry.digest.origin})")
                )
            if total is not None and outcome.size != total:
                raise IntegrityError(f"size mismatch: the source announced {total} bytes, {outcome.size} arrived")
            obj = {
                "path": entry.path,
                "size": outcome.size,
                "digest": f"sha256:{outcome.sha256}",
                "pin": info.version if info else None,
            }
            record = Record(None, outcome.sha256, outcome.size, outcome.format, [obj], self._selection())
            if keep is not None:
                keep(record, outcome)
            marker = publish(artifact, staging, record, self.siblings)
            keep_spool = False
        except (IntegrityError, ArchiveError):
            keep_spool = False
            raise
        except DiskFullError:
            disk_full = True
            raise
        finally:
            download.close(keep_spool=keep_spool, disk_full=disk_full)
        seconds = time.monotonic() - self.started
        log.info(
            "published",
            source=artifact.display_source,
            dest=str(artifact.dest),
            format=outcome.format,
            transfer=download.mode,
            sha256=outcome.sha256,
            verified=expected is not None,
            size=outcome.size,
            files=marker.files,
            entries=marker.entries[:10],
            seconds=round(seconds, 2),
            mb_per_s=round(outcome.size / max(seconds, 1e-9) / 1e6, 1),
        )
        return Result(artifact, False, outcome.size, marker.files, seconds)

    def _directory(self, manifest: Manifest, staging: Path, earlier: Marker | None) -> Result:
        """Many files over one pool of connections, each verified, then published as one tree."""
        from fetcher import pipeline
        from fetcher.pool import DirectoryTransfer, PoolSettings

        artifact = self.artifact
        entries = manifest.entries
        total = manifest.size or 0
        log.info(
            "downloading",
            source=artifact.display_source,
            identity=manifest.identity,
            files=len(entries),
            left_out=manifest.left_out,
            size=total,
            size_h=human_bytes(total),
        )
        spool = ArtifactSpool(artifact.state_dir, artifact.key)
        progress = Progress(artifact.display_source, total, artifact.progress_interval, files_total=len(entries))
        cache = self._cache(manifest)
        transfer = DirectoryTransfer(
            self.source,
            manifest,
            spool,
            PoolSettings(
                artifact.concurrency, artifact.part_size, artifact.retries, artifact.retry_backoff, artifact.split_below
            ),
            on_bytes=progress,
            on_file=progress.file_done,
            published=self._published(earlier),
            cache=cache,
        )
        try:
            slots = transfer.run()
            unverified = set(transfer.unverified)
            objects = [
                {
                    "path": e.path,
                    "size": e.size,
                    "digest": str(e.digest) if e.digest else transfer.digests.get(e.path),
                    "verified": e.path not in unverified and (e.digest is not None or e.path in transfer.digests),
                    "pin": e.pin,
                }
                for e in entries
            ]
            if not_verified := [o["path"] for o in objects if not o["verified"]]:
                log.warning(
                    "files not verified",
                    source=artifact.display_source,
                    count=len(not_verified),
                    of=len(entries),
                    first=not_verified[:3],
                    hint="give --sha256sums; S3 objects uploaded with a SHA-256 checksum are checked against it",
                )
            if cache is not None:
                self._fill_cache(cache, manifest, transfer, spool, slots)
            tree = staging / "tree"
            limits = pipeline.Limits(0, artifact.max_unpacked_size, artifact.max_members)
            packed = [(spool.complete(slots[e.path]), f"layer {e.locator}") for e in entries if e.unpack]
            if manifest.image_subtree is not None:  # a model inside an image: its layers as one filesystem
                pipeline.unpack_image(packed, manifest.image_subtree, staging, limits)
            elif packed:  # a registry's tar layers unpack at the root, before the files beside them
                pipeline.unpack_layers(packed, staging, limits)
            for entry in entries:
                if not entry.unpack:
                    _check_free(tree, entry.path)
                    spool.link_into(slots[entry.path], tree / entry.path)
            record = Record(manifest.identity, None, total, "directory", objects, self._selection())
            marker = publish(artifact, staging, record, self.siblings)
        except BaseException as exc:
            # Kept for a restart to resume from, unless its bytes are useless or there are none:
            # a failed first run leaves dest as it found it.
            if isinstance(exc, ArchiveError) or spool.size() == 0:
                spool.discard()
            raise
        spool.discard()
        if cache is not None and artifact.cache_max_size is not None:
            self._evicted(cache.node.evict(artifact.cache_max_size))
        seconds = time.monotonic() - self.started
        log.info(
            "published",
            source=artifact.display_source,
            dest=str(artifact.dest),
            format="directory",
            identity=manifest.identity,
            files=marker.files,
            fetched=len(entries) - transfer.kept - transfer.copies - transfer.from_cache,
            verified=len(entries) - len(not_verified),
            size=total,
            entries=marker.entries[:10],
            seconds=round(seconds, 2),
            mb_per_s=round((total - transfer.kept_bytes) / max(seconds, 1e-9) / 1e6, 1),
        )
        return Result(artifact, False, total, marker.files, seconds)

    def _cache(self, manifest: Manifest) -> CachedArtifact | None:
        """The node cache (--cache-dir, see ``_node``) as this artifact uses it; room made first for what it lacks."""
        artifact = self.artifact
        node = self._node()
        if node is None:
            return None
        if artifact.cache_max_size is not None:
            keep = frozenset(key_of(e.digest.algorithm, e.digest.hex) for e in manifest.entries if e.digest is not None)
            self._evicted(node.evict(max(0, artifact.cache_max_size - (manifest.size or 0)), keep))
        return CachedArtifact(node, artifact.key, artifact.file_mode, artifact.owner, artifact.progress_interval)

    def _node(self) -> NodeCache | None:
        """--cache-dir, if given and usable: a cache this fetcher cannot write (another user's, a
        read-only mount) is named in a warning and done without; the model still arrives, verified."""
        if self._node_read:
            return self._node_cache
        node = None
        if self.artifact.cache_dir is not None:
            try:
                node = NodeCache(self.artifact.cache_dir, self.artifact.cache_verify)
            except LocalFilesystemError as exc:
                cache = str(self.artifact.cache_dir)
                log.warning("cache unusable: fetching without it", cache=cache, reason=str(exc))
        self._node_cache, self._node_read = node, True
        return node

    def _evicted(self, removed: tuple[int, int]) -> None:
        files, freed = removed
        if files or freed:
            cache = str(self.artifact.cache_dir)
            log.info("cache evicted", files=files, size=freed, size_h=human_bytes(freed), cache=cache)

    def _fill_cache(
        self,
        cache: CachedArtifact,
        manifest: Manifest,
        transfer: DirectoryTransfer,
        spool: ArtifactSpool,
        slots: dict[str, str],
    ) -> None:
        """Files with a digest that did not come through the cache (kept from an earlier run of this
        artifact) join it, by a link. Not with --owner or --file-mode: the publish changes the
        spooled inode, which the cache would then share.
        """
        artifact = self.artifact
        if artifact.owner is None and artifact.file_mode is None:
            for entry in manifest.entries:
                if entry.digest is not None:
                    cache.node.adopt(
                        key_of(entry.digest.algorithm, entry.digest.hex), spool.complete(slots[entry.path])
                    )
        if transfer.from_cache:
            log.info(
                "cache hit",
                source=artifact.display_source,
                files=transfer.from_cache,
                of=len(manifest.entries),
                cache=str(cache.node.root),
            )

    def _published(self, earlier: Marker | None) -> dict[tuple[str, str], Published]:
        """The files the last publish left in dest as it made them.

        Keyed by (path, expected digest) for a verified file, and by (path, "pin:" its version)
        for any with a version: a listing may give the version alone (S3's does not carry the
        checksum a GET then verified).
        """
        from fetcher.pool import Published

        if earlier is None or earlier.format != "directory":
            return {}
        found: dict[tuple[str, str], Published] = {}
        for o in earlier.objects:
            if stale_file(self.artifact.dest, o["path"], earlier) is not None:
                continue
            path = self.artifact.dest / o["path"]
            linkable = _settled_as_asked(path, self.artifact, earlier.settings)
            kept = Published(path, o.get("digest"), bool(o.get("verified")), linkable)
            if o.get("verified"):
                found[(o["path"], str(o["digest"]))] = kept
            if o.get("pin") is not None or not o.get("verified"):
                found[(o["path"], f"pin:{o.get('pin')}")] = kept
        return found

    def _selection(self) -> dict[str, Any]:
        sums = self.sums() if self._manifest is not None and self._manifest.directory else None
        return {
            "include": list(self.artifact.include),
            "exclude": list(self.artifact.exclude),
            "sha256sums": _digest_of(sums),
        }

    def _skip(self, present: Marker) -> Result:
        check_nesting(self.artifact, present.entries)  # what stands may be where a dest added since is
        log.info(
            "already present",
            source=self.artifact.display_source,
            dest=str(self.artifact.dest),
            sha256=present.sha256,
            identity=present.identity,
            files=present.files,
            published_at=present.published_at,
        )
        return Result(self.artifact, True, present.size, present.files, time.monotonic() - self.started)


def preview(artifact: Artifact) -> dict[str, Any]:
    """What a dry run shows of a source that may be a directory: its manifest, resolved now."""
    run = _Fetch(artifact, frozenset(), dry_run=True)
    try:
        manifest = run.manifest()
    finally:
        if run._source is not None:
            run._source.close()
    check_nesting(artifact, _named_entries(manifest))  # what the real run would refuse, before its download
    shown: dict[str, Any] = {"directory": manifest.directory}
    if manifest.identity is not None:
        shown["identity"] = manifest.identity
    if manifest.directory:
        shown["size"] = manifest.size
        shown["left_out"] = manifest.left_out
    shown["files"] = [entry.describe() for entry in manifest.entries]
    return shown


def _digest_of(sums: dict[str, str] | None) -> str | None:
    if sums is None:
        return None
    return hashlib.sha256(json.dumps(sums, sort_keys=True).encode()).hexdigest()


def _settled_as_asked(path: Path, artifact: Artifact, earlier: dict[str, Any]) -> bool:
    """Whether a published file is as this publish would leave it, so that it may be kept by a hard
    link into staging (else it is copied).

    The publish sets --owner and --file-mode on what it stages, which through a link would change
    the live model before the publish (even one that then fails): one this run sets, the file must
    have already. One it does not set, the publish leaves as it is, so the link keeps it (a cache's
    0444 inode, an fsGroup's group), unless the last publish set it: an owner or mode no longer asked
    for goes with the copy.
    """
    try:
        info = os.lstat(path)
    except OSError:
        return False
    if artifact.owner is None:
        owner_kept = earlier.get("owner") is None
    else:
        uid, gid = artifact.owner
        owner_kept = info.st_uid == uid and gid in (None, info.st_gid)
    if artifact.file_mode is None:
        mode_kept = earlier.get("file_mode") is None
    else:
        mode_kept = stat.S_IMODE(info.st_mode) == artifact.file_mode
    return owner_kept and mode_kept


def _check_limits(kept: dict[str, Any], artifact: Artifact) -> None:
    """A cached archive's tree against --max-members and --max-unpacked-size, by what its unpack
    counted (members before --strip-components, bytes as written): as a download would be.

    Raises:
        ArchiveError: the archive had more members, or unpacked to more bytes, than this run allows (exit 5).
    """
    budget = Budget(artifact.max_unpacked_size, artifact.max_members)
    members, unpacked = kept.get("members"), kept.get("unpacked")
    if not isinstance(members, int) or not isinstance(unpacked, int):  # kept by an older fetcher: not checked
        return
    budget.member(members)
    budget.take(unpacked)


def _check_free(tree: Path, path: str) -> None:
    """A file beside an artifact's packed layers lands where they put nothing: not on one of their
    entries, and never through one of their links (or under one of their files) on its way there.

    Raises:
        ArchiveError: a packed layer's entry is in the way (exit 5).
    """
    parts = path.split("/")
    for depth in range(1, len(parts) + 1):
        try:
            info = os.lstat(tree.joinpath(*parts[:depth]))
        except FileNotFoundError:
            return
        if depth == len(parts):
            raise ArchiveError(f"refused {show(path)}: a packed layer of the artifact holds it too")
        if not stat.S_ISDIR(info.st_mode):
            raise ArchiveError(
                f"refused {show(path)}: a packed layer of the artifact made {show('/'.join(parts[:depth]))} "
                "a link or a file, not a directory"
            )


def _named_entries(manifest: Manifest) -> list[str]:
    """The entries of dest a manifest names before anything is fetched (an unpacked one's are known
    only once it is unpacked, and checked then, at the publish)."""
    return sorted({entry.path.split("/")[0] for entry in manifest.entries if entry.path and not entry.unpack})


def _ensure_dest(artifact: Artifact) -> list[Path]:
    """Create dest if need be; the directories this created, outermost first."""
    missing = list(itertools.takewhile(lambda path: not path.exists(), (artifact.dest, *artifact.dest.parents)))[::-1]
    try:
        artifact.dest.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise LocalFilesystemError(f"--dest {artifact.dest} exists and is not a directory") from None
    except OSError as exc:
        raise LocalFilesystemError(f"cannot create --dest {artifact.dest}: {exc.strerror}") from exc
    return missing
