"""A bounded hand-off between two threads: chunks, then an end or an error.

Each pipeline stage that runs in its own thread (the network read, the
decompression) feeds the next one through a Channel, so stages overlap
while memory stays capped at ``depth`` chunks. Either side can stop the
other: the consumer by ``close()``, the producer by sending an error.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator

_END = object()


class Cancelled(Exception):
    """The consumer went away; the producer should stop quietly."""


class Channel:
    def __init__(self, depth: int) -> None:
        self._queue: queue.Queue[object] = queue.Queue(depth)
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def sleep(self, seconds: float) -> None:
        """Wait between retries, but wake up at once if the consumer goes away."""
        if self._cancelled.wait(seconds):
            raise Cancelled

    def put(self, chunk: bytes) -> None:
        """Block until there is room; raise Cancelled if the consumer has gone."""
        while True:
            if self._cancelled.is_set():
                raise Cancelled
            try:
                self._queue.put(chunk, timeout=0.1)
                return
            except queue.Full:
                continue

    def finish(self, error: BaseException | None = None) -> None:
        """Send the end of the stream, or the error the consumer should raise."""
        with contextlib.suppress(Cancelled):
            self.put(error if error is not None else _END)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[bytes]:
        while True:
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._cancelled.is_set():  # closed under a thread still reading it: let it end
                    raise Cancelled from None
                continue
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]

    def close(self) -> None:
        """Stop the producer: it sees Cancelled at its next put."""
        self._cancelled.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()


def produce_in_thread(produce: Callable[[Channel], None], depth: int, name: str) -> tuple[Channel, threading.Thread]:
    """Run ``produce(channel)`` in a daemon thread; its exceptions reach the consumer."""
    channel = Channel(depth)

    def run() -> None:
        try:
            produce(channel)
        except Cancelled:
            return
        except BaseException as exc:
            channel.finish(exc)
            return
        channel.finish()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return channel, thread
