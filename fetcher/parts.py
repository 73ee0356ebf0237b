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
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt

from fetcher import memory
from fetcher.backoff import wait_retry_after
from fetcher.channel import Cancelled, Channel
from fetcher.errors import FetchError, LocalFilesystemError, TransientFetchError, local_error
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
            lines = journal.read_text(encoding="utf-8").split("\n")[:-1]  # a line cut short by a kill is no record
            data = (directory / "data").stat()
            if lines and json.loads(lines[0]) == asdict(identity) and data.st_size == identity.size:
                self.done = {int(line) for line in lines[1:] if line.isdigit()}
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

    def commit(self, index: int) -> None:
        """Record a part as done, only once its bytes are on disk."""
        with self._using() as fd:
            os.fdatasync(fd)
            with self._idle:
                self._journal.write(f"{index}\n")
                self._journal.flush()
                self.done.add(index)

    def read(self, start: int, end: int) -> Iterator[bytes]:
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


class PartedDownload:
    """Fetch parts ``first``.. in parallel; iterate over the object's bytes from ``first`` in order.

    Workers are daemon threads, one future per part: when the consumer goes
    away (an error, SIGTERM) they stop at their next chunk, and a worker stuck
    on a dead connection never holds up the process's exit.
    """

    def __init__(
        self,
        source: Source,
        spool: Spool,
        *,
        concurrency: int,
        retries: int,
        backoff: float,
        channel: Channel,
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
        self._channel = channel  # the consumer's: once it is closed, everything here stops

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
        futures = self._start(missing)
        try:
            for index in range(first, self.count):
                if (future := futures.pop(index, None)) is not None:
                    self._wait(future)
                yield from self.spool.read(*self.bounds(index))
                memory.give_back()  # see fetcher.memory: without it, RSS grows with the object
        finally:
            self._cancel.set()

    def _start(self, indices: list[int]) -> dict[int, Future[None]]:
        futures: dict[int, Future[None]] = {i: Future() for i in indices}
        todo: queue.SimpleQueue[tuple[int, Future[None]]] = queue.SimpleQueue()
        for index in indices:  # in order: the parts the consumer needs next come first
            todo.put((index, futures[index]))
        for n in range(min(self._concurrency, len(indices))):
            threading.Thread(target=self._work, args=(todo,), name=f"fetcher-part-{n}", daemon=True).start()
        return futures

    def _work(self, todo: queue.SimpleQueue[tuple[int, Future[None]]]) -> None:
        while not self._stopped():
            try:
                index, future = todo.get_nowait()
            except queue.Empty:
                return
            try:
                self._fetch(index)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(None)

    def _wait(self, future: Future[None]) -> None:
        while True:
            try:
                return future.result(timeout=0.1)
            except TimeoutError:
                if self._stopped():
                    raise Cancelled from None

    def _stopped(self) -> bool:
        return self._cancel.is_set() or self._channel.cancelled

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
                    if self._stopped():
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
            if self._stopped():
                raise Cancelled
            self._channel.sleep(min(left, 0.1))

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
