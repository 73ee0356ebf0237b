"""Parallel ranged GETs into a spool that survives restarts.

An object is cut into parts of ``part_size``; ``concurrency`` workers fetch
them, each its own pinned range request (If-Match / S3 VersionId), and write
them at their offsets into ``dest/.fetcher/download-<key>/data``. A part is
recorded in the journal beside it only after its bytes are fsynced, so a
kubelet restart continues from what is safely on disk: at most one part per
worker is fetched twice. The consumer reads finished parts back in order, so
hashing and unpacking still stream while later parts are in flight.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt

from fetcher import memory
from fetcher.backoff import wait_retry_after
from fetcher.channel import Cancelled
from fetcher.errors import FetchError, LocalFilesystemError, TransientFetchError
from fetcher.sources.base import CHUNK_SIZE, Source

log = structlog.get_logger("fetcher")


class RangeNotHonoured(FetchError):
    """A part request came back whole (200) or with the wrong range: use one stream."""


@dataclass(frozen=True)
class Identity:
    """What the spool holds: a later run may reuse it only for the very same object."""

    source: str
    version: str
    size: int
    part_size: int


class Spool:
    """The object's bytes at their offsets, and the journal of parts safely on disk."""

    def __init__(self, directory: Path, identity: Identity) -> None:
        self.directory = directory
        self.identity = identity
        self.done: set[int] = set()
        journal = directory / "journal"
        try:
            lines = journal.read_text(encoding="utf-8").splitlines()
            if lines and json.loads(lines[0]) == asdict(identity):
                self.done = {int(line) for line in lines[1:] if line.strip().isdigit()}
            else:
                shutil.rmtree(directory, ignore_errors=True)
        except (OSError, ValueError):
            shutil.rmtree(directory, ignore_errors=True)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(directory / "data", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.ftruncate(self._fd, identity.size)
            self._journal = journal.open("a", encoding="utf-8")
            if not self.done:
                self._journal.write(json.dumps(asdict(identity)) + "\n")
                self._journal.flush()
        except OSError as exc:
            raise LocalFilesystemError(f"preparing the download spool in {directory}: {exc.strerror}") from None
        self._lock = threading.Lock()

    def write(self, offset: int, data: bytes) -> None:
        try:
            os.pwrite(self._fd, data, offset)
        except OSError as exc:
            raise LocalFilesystemError(f"writing the download spool: {exc.strerror}") from None

    def commit(self, index: int) -> None:
        """Record a part as done, only once its bytes are on disk."""
        try:
            os.fdatasync(self._fd)
            with self._lock:
                self._journal.write(f"{index}\n")
                self._journal.flush()
                self.done.add(index)
        except OSError as exc:
            raise LocalFilesystemError(f"writing the download spool: {exc.strerror}") from None

    def read(self, start: int, end: int) -> Iterator[bytes]:
        while start < end:
            chunk = os.pread(self._fd, min(CHUNK_SIZE, end - start), start)
            if not chunk:
                raise LocalFilesystemError("the download spool is shorter than the parts it records")
            start += len(chunk)
            yield chunk

    def close(self) -> None:
        os.close(self._fd)
        self._journal.close()

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class PartedDownload:
    """Fetch parts ``first``.. in parallel; iterate over the object's bytes from ``first`` in order."""

    def __init__(
        self,
        source: Source,
        spool: Spool,
        *,
        concurrency: int,
        retries: int,
        backoff: float,
        stopped: Callable[[float], None],
    ) -> None:
        self.source = source
        self.spool = spool
        self.size = spool.identity.size
        self.part_size = spool.identity.part_size
        self.count = -(-self.size // self.part_size)
        self._concurrency = concurrency
        self._retries = retries
        self._backoff = backoff
        self._cancel = threading.Event()
        self._consumer_sleep = stopped  # sleeps, raising Cancelled once the consumer has gone

    def bounds(self, index: int) -> tuple[int, int]:
        start = index * self.part_size
        return start, min(start + self.part_size, self.size)

    def chunks(self, first: int) -> Iterator[bytes]:
        """The bytes of parts ``first``.. in order, as each part lands on disk."""
        missing = [i for i in range(first, self.count) if i not in self.spool.done]
        if first < self.count and len(missing) < self.count - first:
            log.info(
                "resuming",
                source=self.source.display,
                parts_on_disk=self.count - first - len(missing),
                parts_to_fetch=len(missing),
                part_size=self.part_size,
            )
        pool = ThreadPoolExecutor(self._concurrency, thread_name_prefix="fetcher-part")
        futures: dict[int, Future[None]] = {i: pool.submit(self._fetch, i) for i in missing}
        try:
            for index in range(first, self.count):
                if index in futures:
                    futures.pop(index).result()
                yield from self.spool.read(*self.bounds(index))
                memory.give_back()  # see fetcher.memory: without it, RSS grows with the object
        finally:
            self._cancel.set()
            pool.shutdown(wait=True, cancel_futures=True)

    def _fetch(self, index: int) -> None:
        start, end = self.bounds(index)
        position = start
        for attempt in Retrying(
            retry=retry_if_exception_type(TransientFetchError),
            stop=stop_after_attempt(self._retries + 1),
            wait=wait_retry_after(self._backoff),
            before_sleep=lambda state: self._log_retry(state, index),
            sleep=self._sleep,
            reraise=True,
        ):
            with attempt, self.source.open(position, end) as body:
                if not body.partial or body.offset != position:
                    raise RangeNotHonoured(f"{self.source.display} did not honour a range request")
                for chunk in body.chunks:
                    if self._cancel.is_set():
                        raise Cancelled
                    self.spool.write(position, chunk)
                    position += len(chunk)
                if position < end:
                    raise TransientFetchError(f"part {index} of {self.source.display} ended early")
        self.spool.commit(index)

    def _sleep(self, seconds: float) -> None:
        """Wait between retries; wake at once if this download or its consumer stops."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self._cancel.is_set():
                raise Cancelled
            self._consumer_sleep(min(left, 0.1))

    def _log_retry(self, state: RetryCallState, index: int) -> None:
        exc = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "retrying",
            source=self.source.display,
            part=index,
            reason=str(exc),
            delay_s=round(delay, 2),
            attempt=state.attempt_number,
            of=self._retries,
        )
