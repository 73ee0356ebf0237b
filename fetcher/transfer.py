"""Move an object's bytes from a source to the pipeline, exactly once and in order.

The network side runs in its own thread so that reading overlaps hashing
and unpacking; a bounded queue between them caps memory at a few chunks
whatever the artifact's size. Transient failures are retried by tenacity,
resuming at the byte where the stream broke (a Range request), and the retry
budget is refilled whenever a retry made progress, so a long download over a
flaky link is not failed by drops that are each recovered from.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import structlog
from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential_jitter

from fetcher.channel import Channel, produce_in_thread
from fetcher.errors import FetchError, IntegrityError, TransientFetchError
from fetcher.sources.base import ObjectInfo, Source

log = structlog.get_logger("fetcher")

WINDOW_CHUNKS = 8  # chunks in flight between the network and the pipeline
MAX_RETRY_AFTER = 300.0
_HTML_TYPES = ("text/html", "application/xhtml+xml")


class wait_retry_after:
    """Honour a server's Retry-After; otherwise back off exponentially with jitter."""

    def __init__(self, initial: float) -> None:
        self._backoff = wait_exponential_jitter(initial=initial, max=60, jitter=initial)

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, TransientFetchError) and exc.retry_after is not None:
            return min(exc.retry_after, MAX_RETRY_AFTER)
        return float(self._backoff(state))


class Download:
    """Iterate over an object's bytes; network I/O happens in a background thread."""

    def __init__(self, source: Source, *, retries: int, backoff: float = 1.0, expect_html: bool = False) -> None:
        self.source = source
        self.info: ObjectInfo | None = None
        self.received = 0
        self._retries = retries
        self._backoff = backoff
        self._expect_html = expect_html
        self._failures = 0
        self._offset_at_failure = 0
        self._answered = threading.Event()
        self._early_error: BaseException | None = None
        self._channel: Channel | None = None

    def start(self) -> ObjectInfo | None:
        """Start reading; wait until the source has answered, and return what it said."""
        self._channel, _thread = produce_in_thread(self._produce, WINDOW_CHUNKS, "fetcher-download")
        self._answered.wait()
        if self._early_error is not None:
            raise self._early_error
        return self.info

    def __iter__(self) -> Iterator[bytes]:
        assert self._channel is not None, "start() first"
        return iter(self._channel)

    def close(self) -> None:
        """Stop the network thread, after success or failure."""
        if self._channel is not None:
            self._channel.close()
        self.source.close()

    # --- the network thread ------------------------------------------------

    def _produce(self, channel: Channel) -> None:
        try:
            for attempt in Retrying(
                retry=retry_if_exception_type(TransientFetchError),
                stop=self._out_of_retries,
                wait=wait_retry_after(self._backoff),
                before_sleep=self._log_retry,
                reraise=True,
            ):
                with attempt:
                    self._read_from(self.received, channel)
        except BaseException as exc:
            if not self._answered.is_set():
                self._early_error = exc
            raise
        finally:
            self._answered.set()

    def _read_from(self, start: int, channel: Channel) -> None:
        with self.source.open(start) as body:
            if self.info is None:
                self.info = body.info
                self._refuse_html(body.info)
            self._answered.set()
            skip = start - body.offset  # a server that ignored Range resends from 0
            for chunk in body.chunks:
                if skip:
                    if len(chunk) <= skip:
                        skip -= len(chunk)
                        continue
                    chunk, skip = chunk[skip:], 0
                self.received += len(chunk)
                self._check_size()
                channel.put(chunk)
        if self.info.size is not None and self.received < self.info.size:
            raise TransientFetchError(f"{self.source.display} ended early, at byte {self.received} of {self.info.size}")

    def _refuse_html(self, info: ObjectInfo) -> None:
        content_type = (info.content_type or "").split(";", 1)[0].strip().lower()
        if content_type in _HTML_TYPES and not self._expect_html:
            raise FetchError(
                f"{self.source.display} sent an HTML page (Content-Type: {content_type}) instead of the file: "
                "a login, error or directory page? Check the URL and credentials"
            )

    def _check_size(self) -> None:
        assert self.info is not None
        if self.info.size is not None and self.received > self.info.size:
            raise IntegrityError(f"{self.source.display} sent more than its announced {self.info.size} bytes")

    def _out_of_retries(self, state: RetryCallState) -> bool:
        if self._channel is not None and self._channel.cancelled:
            return True
        if self.received > self._offset_at_failure:
            self._failures = 0
        self._offset_at_failure = self.received
        self._failures += 1
        return self._failures > self._retries

    def _log_retry(self, state: RetryCallState) -> None:
        exc: Any = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "retrying",
            source=self.source.display,
            reason=str(exc),
            delay_s=round(delay, 2),
            attempt=self._failures,
            of=self._retries,
            resume_at=self.received,
        )
