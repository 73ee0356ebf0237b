"""A directory's transfer: every file of a manifest over one pool of ``--concurrency`` connections.

Small files go whole, in parallel with each other. A large one starts as one
stream, hashed and written around the page cache as it arrives; only when its
first part came slower than ``--split-below`` is the rest fetched in ranged
parts as a single object's are (``parts.fill_part``), sharing the same workers,
so one pool serves a tokenizer and four shards alike. Each worker holds one
chunk at a time: the whole run's memory is bounded by the pool, not by the files.

Every file is hashed in order as it lands: streams as they arrive, split files
by whichever worker completes the next part in sequence, reading it back from
the spool while it is still in the page cache. A file takes its place in the
spool (``spool.ArtifactSpool``) only once its size and digest match, so a
restart after a kill keeps every verified file, and the journalled parts of the others.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from tenacity import RetryCallState, Retrying, retry_if_exception_type

from fetcher import memory
from fetcher.backoff import InARow
from fetcher.cache import POLL, CachedArtifact, Lock, key_of, say_waiting, split_key
from fetcher.channel import Cancelled
from fetcher.diskwrite import FileWriter
from fetcher.errors import IntegrityError, TransientFetchError, local_error
from fetcher.manifest import SHA256, Digest, Entry, Hasher, Manifest
from fetcher.pace import CPU_BOUND, Window
from fetcher.parts import RangeNotHonoured, fill_part
from fetcher.sources.base import CHUNK_SIZE, Body, One, Source
from fetcher.spool import ArtifactSpool, Identity, Parts

log = structlog.get_logger("fetcher")

Task = Callable[[], None]


# A stream journals its parts this many at a time (64 MiB at the default --part-size): an
# fdatasync per part held each stream up on the disk, while a restart after a kill fetches
# again at most this much of a file that was arriving at LAN speed.
COMMIT_EVERY = 8

# Seconds a failed or stopped transfer waits for its workers before letting go of the cache entries
# it holds: another fetcher may take one at once, and must not find this one still writing it.
LET_GO_WAIT = 5.0


@dataclass(frozen=True)
class PoolSettings:
    concurrency: int
    part_size: int
    retries: int
    backoff: float
    split_below: float  # bytes/s: a large file whose first part arrives slower is split (--split-below)


@dataclass(frozen=True)
class Published:
    """A file the last publish of this artifact left in dest, as its marker records it."""

    path: Path
    digest: str | None  # "algorithm:hex" of its bytes when published
    verified: bool  # then checked against a digest its source vouched for (S3's checksum, the hub's)
    linkable: bool  # already with the mode and owner this publish gives: hard-linked, else copied


@dataclass
class _File:
    """One file on its way: its parts, and how far its hash has got."""

    entry: Entry
    reader: One
    slot: str
    count: int = 1  # parts
    parts: Parts | None = None
    hasher: Hasher | None = None
    hashed: int = 0  # parts hashed, in order
    digest: Digest | None = None  # the entry's, or what the source vouched for when it answered
    lock: threading.Lock = field(default_factory=threading.Lock)
    cached: str | None = None  # its name in the node cache (a key, or an alias): fetched through the cache
    spool: ArtifactSpool | None = None  # where it downloads to: the cache's shared spool while its lock is held
    held: Lock | None = None  # the cache entry's exclusive lock, while this fetcher downloads it
    waiting_since: float | None = None  # when it first found another fetcher downloading it


class DirectoryTransfer:
    """Fetch the files of ``manifest`` into ``spool``; ``run`` returns each entry's slot there."""

    def __init__(
        self,
        source: Source,
        manifest: Manifest,
        spool: ArtifactSpool,
        settings: PoolSettings,
        on_bytes: Callable[[int], None],
        on_file: Callable[[int | None, bool], None],
        published: dict[tuple[str, str], Published] | None = None,
        cache: CachedArtifact | None = None,
    ) -> None:
        self._source = source
        self._manifest = manifest
        self._spool = spool
        self._settings = settings
        self._on_bytes = on_bytes
        self._on_file = on_file
        self._published = published or {}
        self._cache = cache
        self._tasks: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self._pending = 0  # files not yet verified
        self._lock = threading.Lock()
        self._finished = threading.Event()
        self._error: BaseException | None = None
        self.unverified: list[str] = []
        self.digests: dict[str, str] = {}  # path -> "algorithm:hex" of what arrived, verified or not
        self.kept = 0  # files verified by an earlier run, or left in dest by the last publish: not fetched
        self.copies = 0  # files whose slot (digest) another file of the manifest already fills: not fetched
        self.kept_bytes = 0
        self.from_cache = 0  # files the node cache held (or another fetcher put there while this one waited)
        self._waits: dict[str, float] = {}  # path -> when its wait was last logged

    def run(self) -> dict[str, str]:
        slots: dict[str, str] = {}
        todo: list[_File] = []
        planned: dict[str, str] = {}  # slot -> the path that fetches it
        twins: dict[str, str] = {}  # path -> the path whose fetch also fills its slot
        for entry in self._manifest.entries:
            reader = One(self._source, entry, directory=True)
            slot = self._spool.slot(entry)
            slots[entry.path] = slot
            if _whole(self._spool.complete(slot), entry.size) or self._reuse(entry, slot):
                self.kept += 1
                self.kept_bytes += entry.size or 0
                self._on_file(entry.size, False)
                continue
            if slot in planned:  # the same bytes under another path: fetched once, linked to both
                twins[entry.path] = planned[slot]
                self.copies += 1
                self.kept_bytes += entry.size or 0
                self._on_file(entry.size, False)
                continue
            cached = self._cache.name_of(entry.digest, slot) if self._cache is not None else None
            if cached is not None and self._from_cache(entry, slot, cached):
                self._on_file(entry.size, False)
                continue
            planned[slot] = entry.path
            todo.append(_File(entry, reader, slot, digest=entry.digest, cached=cached))
        if self.kept:
            log.info("resuming", source=self._source.display, files_verified_before=self.kept, files_to_fetch=len(todo))
        if not todo:
            return slots
        self._pending = len(todo)
        for job in sorted(todo, key=lambda job: -(job.entry.size or 0)):  # the longest first: they set the end
            self._schedule(job)
        workers = [
            threading.Thread(target=self._work, name=f"fetcher-pool-{n}", daemon=True)
            for n in range(self._settings.concurrency)
        ]
        for worker in workers:
            worker.start()
        try:
            while not self._finished.wait(0.1):  # short waits: SIGTERM is handled in this thread
                pass
        finally:
            self._finished.set()
            for _ in workers:
                self._tasks.put(None)
            for job in todo:
                if job.parts is not None:
                    job.parts.close()  # a write in flight ends first; later ones are Cancelled
            deadline = time.monotonic() + LET_GO_WAIT
            for worker in workers:  # a cache entry is let go only once nobody here writes it
                worker.join(max(0.0, deadline - time.monotonic()))
            for job in todo:
                if job.held is not None:
                    job.held.close()
        if self._error is not None:
            raise self._error
        for path, fetched in twins.items():  # verified, or not, as the file fetched for both was
            if fetched in self.digests:
                self.digests[path] = self.digests[fetched]
            if fetched in self.unverified:
                self.unverified.append(path)
        return slots

    def _reuse(self, entry: Entry, slot: str) -> bool:
        """A file the last publish of this artifact left in dest, unchanged at the source (a branch
        moved, the shards did not; one object of a prefix changed, the others did not): hashed again
        where it stands, then put in the spool, not downloaded.

        A file with an expected digest must have it; one without must be the same version
        (its ETag or mtime) and still hash to what was recorded when it was published, and
        stays verified if it was (an S3 object checked against its checksum). It is hard-linked
        when it already has this run's mode and owner, else copied: the publish sets them on
        what it stages, and through a link that would change the live model before the publish.
        """
        key = str(entry.digest) if entry.digest is not None else f"pin:{entry.pin}"
        if (found := self._published.get((entry.path, key))) is None or (entry.digest is None and entry.pin is None):
            return False
        algorithm, _, expected = (str(entry.digest) if entry.digest is not None else found.digest or "").partition(":")
        if not expected:
            return False
        hasher = Hasher(algorithm, entry.size)
        try:
            with open(found.path, "rb") as file:
                while chunk := file.read(CHUNK_SIZE):
                    hasher.update(chunk)
        except OSError:
            return False
        if hasher.hexdigest() != expected or (entry.size is not None and hasher.size != entry.size):
            return False
        if not self._spool.take(found.path, slot, link=found.linkable):
            return False
        if entry.digest is None:
            self.digests[entry.path] = f"{algorithm}:{expected}"
            if not found.verified:
                self.unverified.append(entry.path)
        return True

    # --- the node cache ----------------------------------------------------------------

    def _from_cache(self, entry: Entry, slot: str, name: str) -> bool | None:
        """Whether the node cache holds the file, checked and now in its slot; None while another
        fetcher is downloading it (then it is looked at again later). Never waits."""
        assert self._cache is not None
        node = self._cache.node
        lock = node.try_lock(name, exclusive=False)
        if lock is None:
            return None
        with lock:
            key = node.resolve(name)
            if key is None:
                return False
            with self._key_held(name, key) as held:
                if not held:
                    return None
                if not node.check(key):
                    return False
                self._hit(entry, slot, key)
        return True

    @contextlib.contextmanager
    def _key_held(self, name: str, key: str, *, exclusive: bool = False) -> Iterator[bool]:
        """The entry an alias names, held too while it is read (shared) or written (``exclusive``):
        an eviction locks keys, not aliases, and must not remove the blob between a check and a
        placing. False if busy."""
        assert self._cache is not None
        if key == name:  # the caller's lock is the key's
            yield True
            return
        lock = self._cache.node.try_lock(key, exclusive=exclusive)
        if lock is None:
            yield False
            return
        with lock:
            yield True

    def _hit(self, entry: Entry, slot: str, key: str) -> None:
        """A file the cache holds (the caller holds its lock): placed in its slot, and counted."""
        assert self._cache is not None
        self._cache.place(key, self._spool.complete(slot))
        with self._lock:
            if entry.digest is None:  # what it hashed to, not what any source vouched for
                self.digests[entry.path] = ":".join(split_key(key))
                self.unverified.append(entry.path)
            self.from_cache += 1
            self.kept_bytes += entry.size or 0

    def _through_cache(self, job: _File) -> None:
        """Take the file from the node cache, or download it into the cache under its exclusive lock
        (``_verified`` stores it and lets go). A lock another fetcher holds is tried again later,
        by whichever worker is free: no worker ever waits while holding one."""
        assert self._cache is not None and job.cached is not None
        node, name = self._cache.node, job.cached
        found = self._from_cache(job.entry, job.slot, name)
        if found:
            return self._file_done(job, fetched=False)
        lock = None if found is None else node.try_lock(name, exclusive=True)
        if lock is None:
            return self._later(job)
        try:
            key = node.resolve(name)  # another fetcher may have stored it meanwhile
            with self._key_held(name, key or name) as held:
                state = node.check(key) if key is not None and held else None
                if key is not None and state:
                    self._hit(job.entry, job.slot, key)
                    lock.close()
                    return self._file_done(job, fetched=False)
            if key is not None and state is False:  # not as it was stored: fetched again, never served
                log.warning("cache entry damaged: fetching it again", file=job.reader.display, key=key)
                with self._key_held(name, key, exclusive=True) as held:
                    if held:  # else another fetcher reads it: the download's store replaces it
                        node.remove(key)
        except BaseException:
            lock.close()
            raise
        job.held = lock
        if job.digest is not None:  # pinned by its digest: the next holder may resume its parts
            job.spool = node.spool
        return self._plan(job, now=True)  # this worker, holding the lock, downloads it

    def _later(self, job: _File) -> None:
        """Another fetcher is downloading the file: say so now and then, and look again a moment later."""
        assert self._cache is not None and job.cached is not None
        now = time.monotonic()
        job.waiting_since = job.waiting_since or now
        waited, last = now - job.waiting_since, self._waits.get(job.entry.path)
        if say_waiting(waited, last, self._cache.interval):
            self._waits[job.entry.path] = waited
            log.info(
                "waiting for",
                file=job.reader.display,
                held_by="another fetcher on this node",
                arrived=self._cache.node.arrived(job.cached),
                size=job.entry.size,
                waited_s=round(waited, 1),
            )
        if self._finished.wait(POLL):
            raise Cancelled
        self._tasks.put(lambda: self._through_cache(job))

    def _spool_of(self, job: _File) -> ArtifactSpool:
        return job.spool or self._spool

    # --- scheduling -----------------------------------------------------------------

    def _schedule(self, job: _File) -> None:
        if job.cached is not None:
            self._tasks.put(lambda: self._through_cache(job))
        else:
            self._plan(job)

    def _plan(self, job: _File, *, now: bool = False) -> None:
        """Queue the file's first task, or with ``now`` run it in this worker."""
        size, part_size = job.entry.size, self._settings.part_size
        if size is None or size < 2 * part_size:
            return self._run(lambda: self._whole_file(job), now)
        job.count = -(-size // part_size)
        pin = "" if job.spool is not None else job.entry.pin or ""  # in the cache, the digest pins it
        job.parts = self._spool_of(job).file_parts(job.slot, Identity(job.slot, pin, size, part_size))
        if 0 in job.parts.done:  # an earlier run got this far: go straight to every part
            return self._queue_parts(job)
        return self._run(lambda: self._stream(job), now)

    def _run(self, task: Task, now: bool) -> None:
        if now:
            task()
        else:
            self._tasks.put(task)

    def _queue_parts(self, job: _File) -> None:
        assert job.parts is not None
        missing = [i for i in range(job.count) if i not in job.parts.done]
        for index in missing:
            self._tasks.put(lambda index=index: self._part(job, index))  # type: ignore[misc]
        if not missing or missing[0] > 0:
            self._advance(job)

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            if self._finished.is_set():
                continue
            try:
                task()
            except Cancelled:
                continue
            except BaseException as exc:
                self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = exc
        self._finished.set()

    def _stopped(self) -> bool:
        return self._finished.is_set()

    # --- a whole file ---------------------------------------------------------------------

    def _whole_file(self, job: _File) -> None:
        """One stream; a retry goes on from the byte where the last one broke, when the source
        pins the file's version (else it starts again, hashing from 0)."""
        path = self._spool_of(job).incomplete(job.slot)
        job.hasher = None
        pinned = [False]

        def attempt() -> None:
            hasher, start = self._begin(job, pinned[0])
            try:
                with open(path, "r+b" if start else "wb") as out, job.reader.open(start) as body:
                    pinned[0] = False  # until the server is seen to have resumed
                    self._answered(job, body, start)
                    pinned[0] = body.info.version is not None
                    out.seek(start)
                    out.truncate()
                    for chunk in body.chunks:
                        if self._stopped():
                            raise Cancelled
                        out.write(chunk)
                        hasher.update(chunk)
                        self._on_bytes(len(chunk))
                    out.flush()
                    os.fsync(out.fileno())
            except OSError as exc:
                raise local_error(exc, f"writing the download spool in {self._spool_of(job).directory}") from exc
            self._check_whole(job, hasher)

        self._retrying(attempt, job.reader.display, lambda: _resume_point(job, pinned[0]))
        self._verified(job, path)

    # --- a file in parts -----------------------------------------------------------------

    def _stream(self, job: _File) -> None:
        """One stream from byte 0, hashed and written (around the page cache) as it arrives.

        If the first part came slower than ``split_below``, the stream ends there and
        the rest of the file is fetched in parallel parts; else it carries on to the end.
        Why: at LAN speed one stream per file already keeps two cores busy, and
        splitting only adds requests, a read-back to hash, and thread hand-offs
        (measured on the hf bench row: 1.6 s of CPU in parts, 1.0 s streamed). A slow
        connection, such as a capped CDN, is where parallel parts pay off.

        The stream's parts are journalled COMMIT_EVERY at a time, so a restart
        resumes a pinned file in parts; a cut resumes at its byte.
        """
        parts, size, part_size = job.parts, job.entry.size, self._settings.part_size
        assert parts is not None and size is not None
        split: list[int] = []  # [parts streamed] once the stream came too slowly: the rest goes in parts
        resumable = [False]  # a retry may go on from the byte where the last attempt broke

        def attempt() -> None:
            hasher, start = self._begin(job, resumable[0])
            with job.reader.open(start) as body, parts.stream(start) as out:
                resumable[0] = False  # until the server is seen to have resumed
                self._answered(job, body, start)
                pinned = resumable[0] = body.info.ranges and body.info.version is not None
                may_split = pinned and self._settings.concurrency > 1
                committed = start // part_size
                first = start == 0  # the first decision comes after part 0; then one at each commit
                mark = part_size if first else (committed + COMMIT_EVERY) * part_size  # where the next is
                window = Window(start)
                chunks = iter(body.chunks)
                while True:
                    began = time.monotonic()
                    chunk = next(chunks, None)
                    window.waited += time.monotonic() - began
                    if chunk is None:
                        break
                    if self._stopped():
                        raise Cancelled
                    while pinned and mark < size and hasher.size + len(chunk) >= mark:
                        head, chunk = chunk[: mark - hasher.size], chunk[mark - hasher.size :]
                        self._take(job, out, hasher, head)
                        done = mark // part_size
                        if may_split and self._worth_splitting(job, window, mark, first=first):
                            out.flush()
                            parts.commit(*range(committed, done))
                            split.append(done)
                            return
                        if not first:
                            out.flush()
                            parts.commit(*range(committed, done))
                            committed = done
                        first, mark, window = False, (committed + COMMIT_EVERY) * part_size, Window(mark)
                    self._take(job, out, hasher, chunk)
            self._check_whole(job, hasher)

        self._retrying(attempt, job.reader.display, lambda: _resume_point(job, resumable[0]))
        if split:
            job.hashed = split[0]
            self._queue_parts(job)
            return
        job.hashed = job.count
        parts.close()
        self._verified(job, parts.directory / "data", parts)

    def _worth_splitting(self, job: _File, window: Window, mark: int, *, first: bool) -> bool:
        """Whether the stream's last window (its first part, then each COMMIT_EVERY parts) came slowly
        because of its connection, not for want of CPU.

        Slower than ``split_below`` is split, unless the CPU may have set the pace
        (``fetcher.pace``). Measured on the S3 bench row: a first run whose four streams
        came at 78-141 MB/s each on a busy two-core host took 2.1 s split, 0.9 s when not.

        Decided again at each commit: a first part that came while fetcher was busiest
        starting up (or before a CDN's burst allowance ran out) no longer holds a capped
        stream to one connection for the rest of the file (the OCI bench's capped row: 5.7 s
        on one stream against 2.2 s split).
        """
        slow = window.slow(mark, self._settings.split_below)
        if slow is None:
            return False
        if slow.cpu_bound:
            if first:
                log.info(CPU_BOUND, file=job.reader.display, **slow.fields())
            return False
        log.info(
            "splitting",
            file=job.reader.display,
            at_byte=mark,
            mb_per_s=slow.mb_per_s,
            concurrency=self._settings.concurrency,
            part_size=self._settings.part_size,
        )
        return True

    def _begin(self, job: _File, resume: bool) -> tuple[Hasher, int]:
        """The hasher an attempt goes on with, and the byte it asks from: where the last one broke, if it may."""
        start = job.hasher.size if job.hasher is not None and resume else 0
        if start == 0 or job.hasher is None:
            job.hasher = Hasher(job.digest.algorithm if job.digest else SHA256, job.entry.size)
        return job.hasher, start

    def _answered(self, job: _File, body: Body, start: int) -> None:
        """Refuse a resume the server sent whole again (the next attempt starts over); take the
        digest the source vouches for (S3 ChecksumSHA256) when there is no other."""
        if start and (body.offset != start or not body.partial):
            raise TransientFetchError(f"{job.reader.display} did not resume at byte {start}")
        if body.info.digest is not None and job.digest is None:
            job.digest = body.info.digest

    def _check_whole(self, job: _File, hasher: Hasher) -> None:
        if job.entry.size is not None and hasher.size < job.entry.size:
            raise TransientFetchError(f"{job.reader.display} ended early, at byte {hasher.size} of {job.entry.size}")

    def _take(self, job: _File, out: FileWriter, hasher: Hasher, chunk: bytes) -> None:
        try:
            out.write(chunk)
        except OSError as exc:
            raise local_error(exc, f"writing the download spool in {self._spool_of(job).directory}") from exc
        hasher.update(chunk)
        self._on_bytes(len(chunk))

    def _part(self, job: _File, index: int) -> None:
        parts, size = job.parts, job.entry.size
        if parts is None:  # the file went back to one stream
            return
        assert size is not None
        start = index * self._settings.part_size
        end = min(start + self._settings.part_size, size)
        position = [start]

        def attempt() -> None:
            info = fill_part(job.reader, parts, index, position, end, self._stopped, self._on_bytes)
            if info.digest is not None and job.digest is None:
                job.digest = info.digest

        try:
            self._retrying(attempt, job.reader.display, lambda: position[0], part=index)
        except RangeNotHonoured:
            self._unsplit(job)
            return
        parts.commit(index)  # Cancelled if the file went back to one stream meanwhile
        self._advance(job)

    def _unsplit(self, job: _File) -> None:
        """A server that said it serves ranges sent a part whole after all: the file goes on one stream."""
        with job.lock:
            if job.parts is None:  # another part found out first
                return
            log.info("one stream: the server does not serve ranges of this file", file=job.reader.display)
            job.parts.close()  # parts still in flight stop at their next write
            job.parts.remove()
            job.parts = None
        self._tasks.put(lambda: self._whole_file(job))

    def _advance(self, job: _File) -> None:
        """Hash the parts that are next in order; the worker that completes the file verifies it.

        A worker that finds the hash taken by another leaves its part to that one, which
        looks again after letting go: no part is left unhashed.
        """
        if (parts := job.parts) is None:
            return
        while True:
            if not job.lock.acquire(blocking=False):
                return
            try:
                if job.parts is not parts:  # the file went back to one stream, which hashes it itself
                    return
                if job.hasher is None:
                    job.hasher = Hasher(job.digest.algorithm if job.digest else SHA256, job.entry.size)
                while job.hashed < job.count and job.hashed in parts.done:
                    start = job.hashed * self._settings.part_size
                    end = min(start + self._settings.part_size, job.entry.size or 0)
                    for chunk in parts.read(start, end):
                        job.hasher.update(chunk)
                    job.hashed += 1
                    memory.give_back()  # see fetcher.memory: without it, RSS grows with every part
                if job.hashed == job.count:
                    parts.close()
                    self._verified(job, parts.directory / "data", parts)
                    return
            finally:
                job.lock.release()
            if not (job.hashed < job.count and job.hashed in parts.done):
                return

    # --- the end of a file ------------------------------------------------------------------

    def _verified(self, job: _File, written: os.PathLike[str] | str, parts: Parts | None = None) -> None:
        """Check size and digest; only then does the file take its slot."""
        assert job.hasher is not None
        entry, got = job.entry, job.hasher
        if entry.size is not None and got.size != entry.size:
            self._drop(written, parts)
            raise IntegrityError(
                f"{job.reader.display}: size mismatch: listed as {entry.size} bytes, {got.size} arrived"
            )
        if job.digest is not None:
            if job.digest.algorithm != got.algorithm:  # vouched for by the source only once it answered
                self._drop(written, parts)
                raise TransientFetchError(f"{job.reader.display}: its checksum arrived after its bytes; fetching again")
            if got.hexdigest() != job.digest.hex:
                self._drop(written, parts)
                raise IntegrityError(
                    f"{job.reader.display}: {got.algorithm} mismatch: expected {job.digest.hex} "
                    f"(from {job.digest.origin}), got {got.hexdigest()} ({got.size} bytes)"
                )
        else:
            self.unverified.append(entry.path)
        self.digests[entry.path] = f"{got.algorithm}:{got.hexdigest()}"
        finished = self._spool_of(job).finish(written, job.slot)  # type: ignore[arg-type]
        if parts is not None:
            parts.remove()
        if job.held is not None and self._cache is not None and job.cached is not None:
            key = key_of(got.algorithm, got.hexdigest())
            with self._key_held(job.cached, key, exclusive=True) as held:
                if held:  # else another fetcher reads or evicts that entry: this file stays in the spool
                    self._cache.node.store(key, finished, alias=job.cached if job.cached != key else None)
                    self._cache.place(key, self._spool.complete(job.slot))
            job.held.close()
        self._file_done(job, fetched=True)

    def _file_done(self, job: _File, *, fetched: bool) -> None:
        self._on_file(job.entry.size, fetched)
        with self._lock:
            self._pending -= 1
            if self._pending == 0:
                self._finished.set()

    def _drop(self, written: os.PathLike[str] | str, parts: Parts | None) -> None:
        with contextlib.suppress(OSError):
            os.unlink(written)
        if parts is not None:
            parts.remove()

    # --- retries ------------------------------------------------------------------------------

    def _retrying(
        self, attempt: Callable[[], None], display: str, reached: Callable[[], int], part: int | None = None
    ) -> None:
        """``attempt`` until it succeeds, --retries failures in a row with ``reached`` (the byte the
        next attempt goes on from) no further, or a failure that is not transient."""
        failures = InARow(self._settings.retries, self._settings.backoff, reached)

        def log_retry(state: RetryCallState) -> None:
            if self._stopped():  # another file failed and its failure is the one reported: no noise after it
                raise Cancelled
            exc = state.outcome.exception() if state.outcome else None
            delay = state.next_action.sleep if state.next_action else 0.0
            log.warning(
                "retrying",
                file=display,
                part=part,
                reason=str(exc),
                delay_s=round(delay, 2),
                attempt=failures.count,
                of=self._settings.retries,
            )

        for retry in Retrying(
            retry=retry_if_exception_type(TransientFetchError),
            stop=failures.stop,
            wait=failures.wait,
            before_sleep=log_retry,
            sleep=self._sleep,
            reraise=True,
        ):
            with retry:
                attempt()

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self._finished.wait(min(left, 0.1)):
                raise Cancelled


def _resume_point(job: _File, resumable: bool) -> int:
    """The byte a retry of ``job``'s stream goes on from."""
    return job.hasher.size if resumable and job.hasher is not None else 0


def _whole(path: os.PathLike[str], size: int | None) -> bool:
    """A file an earlier run verified and put in its slot (named by its digest or version): it stands."""
    try:
        info = os.stat(path)
        return size is None or info.st_size == size
    except OSError:
        return False
