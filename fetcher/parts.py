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

import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import structlog
from tenacity import RetryCallState, Retrying, retry_if_exception_type

from fetcher import memory
from fetcher.backoff import InARow
from fetcher.channel import Cancelled, Channel
from fetcher.errors import FetchError, TransientFetchError
from fetcher.sources.base import ObjectInfo, ObjectReader
from fetcher.spool import Parts

log = structlog.get_logger("fetcher")


class RangeNotHonoured(FetchError):
    """A part request came back whole (200) or with the wrong range: use one stream."""


def fill_part(
    reader: ObjectReader,
    spool: Parts,
    index: int,
    position: list[int],
    end: int,
    stopped: Callable[[], bool],
    on_bytes: Callable[[int], None] | None = None,
) -> ObjectInfo:
    """One attempt at bytes ``position[0]`` to ``end`` of a part, written at their offsets.

    ``position[0]`` moves as bytes land, so that a retry asks only for the rest. The
    caller commits the part once it is whole.
    """
    with reader.open(position[0], end) as body:
        if not body.partial or body.offset != position[0]:
            raise RangeNotHonoured(f"{reader.display} did not honour a range request")
        for chunk in body.chunks:
            if stopped():
                raise Cancelled
            spool.write(position[0], chunk)
            position[0] += len(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
        if position[0] < end:
            raise TransientFetchError(f"part {index} of {reader.display} ended early")
        return body.info


class PartedDownload:
    """Fetch parts ``first``.. in parallel; iterate over the object's bytes from ``first`` in order.

    Workers are daemon threads, one future per part: when the consumer goes
    away (an error, SIGTERM) they stop at their next chunk, and a worker stuck
    on a dead connection never holds up the process's exit.
    """

    def __init__(
        self,
        source: ObjectReader,
        spool: Parts,
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
        done = [start]  # where a retry goes on from: what landed before a cut is kept
        failures = InARow(self._retries, self._backoff, lambda: done[0])
        for attempt in Retrying(
            retry=retry_if_exception_type(TransientFetchError),
            stop=failures.stop,
            wait=failures.wait,
            before_sleep=lambda state: self._log_retry(state, index, failures.count),
            sleep=self._sleep,
            reraise=True,
        ):
            with attempt:
                fill_part(self.source, self.spool, index, done, end, self._stopped)
        self.spool.commit(index)

    def _sleep(self, seconds: float) -> None:
        """Wait between retries; wake at once if this download or its consumer stops."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self._stopped():
                raise Cancelled
            self._channel.sleep(min(left, 0.1))

    def _log_retry(self, state: RetryCallState, index: int, attempt: int) -> None:
        exc = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "retrying",
            source=self.source.display,
            part=index,
            reason=str(exc),
            delay_s=round(delay, 2),
            attempt=attempt,
            of=self._retries,
        )
