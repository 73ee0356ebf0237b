"""A directory's transfer: every file of a manifest over one pool of ``--concurrency`` connections.

Small files go whole, in parallel with each other; a large one is split into
ranged parts as a single object is (``parts.fill_part``), its parts sharing the
same workers, so one pool serves a tokenizer and four shards alike. Each
worker holds one chunk at a time: the whole run's memory is bounded by the
pool, not by the files.

Every file is hashed in order as it lands: whole files as they stream, split
ones by whichever worker completes the next part in sequence, reading it back
from the spool while it is still in the page cache. A file takes its place in
the spool (``spool.ArtifactSpool``) only once its size and digest match, so a
restart after a kill keeps every verified file, and the parts of the others.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt

from fetcher.backoff import wait_retry_after
from fetcher.channel import Cancelled
from fetcher.errors import IntegrityError, TransientFetchError, local_error
from fetcher.manifest import SHA256, Digest, Entry, Hasher, Manifest
from fetcher.parts import RangeNotHonoured, fill_part
from fetcher.sources.base import CHUNK_SIZE, One, Source
from fetcher.spool import ArtifactSpool, Identity, Parts

log = structlog.get_logger("fetcher")

Task = Callable[[], None]


@dataclass(frozen=True)
class PoolSettings:
    concurrency: int
    part_size: int
    retries: int
    backoff: float


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
        published: dict[tuple[str, str], tuple[Path, str | None]] | None = None,
    ) -> None:
        self._source = source
        self._manifest = manifest
        self._spool = spool
        self._settings = settings
        self._on_bytes = on_bytes
        self._on_file = on_file
        self._published = published or {}
        self._tasks: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self._pending = 0  # files not yet verified
        self._lock = threading.Lock()
        self._finished = threading.Event()
        self._error: BaseException | None = None
        self.unverified: list[str] = []
        self.digests: dict[str, str] = {}  # path -> "algorithm:hex" of what arrived, verified or not
        self.kept = 0  # files verified by an earlier run, or left in dest by the last publish: not fetched
        self.kept_bytes = 0

    def run(self) -> dict[str, str]:
        slots: dict[str, str] = {}
        todo: list[_File] = []
        for entry in self._manifest.entries:
            reader = One(self._source, entry, directory=True)
            slot = self._spool.slot(entry)
            slots[entry.path] = slot
            if _whole(self._spool.complete(slot), entry.size) or self._reuse(entry, slot):
                self.kept += 1
                self.kept_bytes += entry.size or 0
                self._on_file(entry.size, False)
                continue
            todo.append(_File(entry, reader, slot, digest=entry.digest))
        if self.kept:
            log.info("resuming", source=self._source.display, files_verified_before=self.kept, files_to_fetch=len(todo))
        if not todo:
            return slots
        self._pending = len(todo)
        for job in sorted(todo, key=lambda job: -(job.entry.size or 0)):  # the longest first: they set the end
            self._plan(job)
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
                    job.parts.close()
        if self._error is not None:
            raise self._error
        return slots

    def _reuse(self, entry: Entry, slot: str) -> bool:
        """A file the last publish of this artifact left in dest, unchanged at the source (a branch
        moved, the shards did not; one object of a prefix changed, the others did not): hashed again
        where it stands, then linked into the spool, not downloaded.

        A file with an expected digest must have it; one without must be the same version
        (its ETag or mtime) and still hash to what was recorded when it was published.
        """
        key = str(entry.digest) if entry.digest is not None else f"pin:{entry.pin}"
        if (found := self._published.get((entry.path, key))) is None or (entry.digest is None and entry.pin is None):
            return False
        path, recorded = found
        algorithm, _, expected = (str(entry.digest) if entry.digest is not None else recorded or "").partition(":")
        if not expected:
            return False
        hasher = Hasher(algorithm, entry.size)
        try:
            with open(path, "rb") as file:
                while chunk := file.read(CHUNK_SIZE):
                    hasher.update(chunk)
        except OSError:
            return False
        if hasher.hexdigest() != expected or (entry.size is not None and hasher.size != entry.size):
            return False
        if entry.digest is None:
            self.digests[entry.path] = f"{algorithm}:{expected}"
            self.unverified.append(entry.path)
        return self._spool.take(path, slot)

    # --- scheduling -----------------------------------------------------------------

    def _plan(self, job: _File) -> None:
        size, part_size = job.entry.size, self._settings.part_size
        if size is None or size < 2 * part_size or self._settings.concurrency < 2:
            self._tasks.put(lambda: self._whole_file(job))
            return
        job.count = -(-size // part_size)
        identity = Identity(job.slot, job.entry.pin or "", size, part_size)
        job.parts = self._spool.file_parts(job.slot, identity)
        if 0 in job.parts.done:  # an earlier run got this far: ranges work, go straight to every part
            self._queue_parts(job)
        else:
            self._tasks.put(lambda: self._part(job, 0))  # the others once ranges are seen to work

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
        path = self._spool.incomplete(job.slot)
        job.hasher = None
        pinned = [False]

        def attempt() -> None:
            start = job.hasher.size if job.hasher is not None and pinned[0] else 0
            if start == 0:
                job.hasher = Hasher(job.digest.algorithm if job.digest else SHA256, job.entry.size)
            hasher = job.hasher
            assert hasher is not None
            try:
                with open(path, "r+b" if start else "wb") as out, job.reader.open(start) as body:
                    if start and (body.offset != start or not body.partial):
                        pinned[0] = False  # the server sent it all again: start over
                        raise TransientFetchError(f"{job.reader.display} did not resume at byte {start}")
                    pinned[0] = body.info.version is not None
                    if body.info.digest is not None and job.digest is None:
                        job.digest = body.info.digest
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
                raise local_error(exc, f"writing the download spool in {self._spool.directory}") from exc
            if job.entry.size is not None and hasher.size < job.entry.size:
                raise TransientFetchError(
                    f"{job.reader.display} ended early, at byte {hasher.size} of {job.entry.size}"
                )

        self._retrying(attempt, job.reader.display)
        self._verified(job, path)

    # --- a file in parts -----------------------------------------------------------------

    def _part(self, job: _File, index: int) -> None:
        assert job.parts is not None and job.entry.size is not None
        start = index * self._settings.part_size
        end = min(start + self._settings.part_size, job.entry.size)
        position = [start]

        def attempt() -> None:
            info = fill_part(job.reader, job.parts, index, position, end, self._stopped, self._on_bytes)  # type: ignore[arg-type]
            if info.digest is not None and job.digest is None:
                job.digest = info.digest

        try:
            self._retrying(attempt, job.reader.display, part=index)
        except RangeNotHonoured:
            if index != 0:
                raise
            log.info("one stream: the server does not serve ranges of this file", file=job.reader.display)
            job.parts.close()
            job.parts.remove()
            job.parts = None
            self._whole_file(job)
            return
        job.parts.commit(index)
        if index == 0:
            self._queue_parts(job)
        else:
            self._advance(job)

    def _advance(self, job: _File) -> None:
        """Hash the parts that are next in order; the worker that completes the file verifies it.

        A worker that finds the hash taken by another leaves its part to that one, which
        looks again after letting go: no part is left unhashed.
        """
        assert job.parts is not None
        parts = job.parts
        while True:
            if not job.lock.acquire(blocking=False):
                return
            try:
                if job.hasher is None:
                    job.hasher = Hasher(job.digest.algorithm if job.digest else SHA256, job.entry.size)
                while job.hashed < job.count and job.hashed in parts.done:
                    start = job.hashed * self._settings.part_size
                    end = min(start + self._settings.part_size, job.entry.size or 0)
                    for chunk in parts.read(start, end):
                        job.hasher.update(chunk)
                    job.hashed += 1
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
        self._spool.finish(written, job.slot)  # type: ignore[arg-type]
        if parts is not None:
            parts.remove()
        self._on_file(entry.size, True)
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

    def _retrying(self, attempt: Callable[[], None], display: str, part: int | None = None) -> None:
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
                attempt=state.attempt_number,
                of=self._settings.retries,
            )

        for retry in Retrying(
            retry=retry_if_exception_type(TransientFetchError),
            stop=stop_after_attempt(self._settings.retries + 1),
            wait=wait_retry_after(self._settings.backoff),
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


def _whole(path: os.PathLike[str], size: int | None) -> bool:
    """A file an earlier run verified and put in its slot (named by its digest or version): it stands."""
    try:
        info = os.stat(path)
        return size is None or info.st_size == size
    except OSError:
        return False
