"""Move an object's bytes from a source to the pipeline, exactly once and in order.

The network side runs in its own thread so that reading overlaps hashing
and unpacking; a bounded queue between them caps memory at a few chunks
whatever the artifact's size. Transient failures are retried by tenacity,
resuming at the byte where the stream broke (a Range request), and the retry
budget is refilled whenever a retry made progress, so a long download over a
flaky link is not failed by drops that are each recovered from.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import structlog
from tenacity import RetryCallState, Retrying, retry_if_exception_type

from fetcher.backoff import InARow
from fetcher.channel import Channel, produce_in_thread
from fetcher.errors import FetchError, IntegrityError, SourceChangedError, TransientFetchError
from fetcher.pace import CPU_BOUND, Window
from fetcher.parts import PartedDownload, RangeNotHonoured
from fetcher.pipeline import SNIFF_BYTES
from fetcher.sources.base import Body, ObjectInfo, ObjectReader
from fetcher.spool import ArtifactSpool, Identity, Parts

log = structlog.get_logger("fetcher")

WINDOW_CHUNKS = 4  # chunks in flight between the network and the pipeline
_HTML_TYPES = ("text/html", "application/xhtml+xml")


@dataclass(frozen=True)
class Parallelism:
    """How an object may be split: into ``part_size`` parts over ``concurrency`` connections."""

    concurrency: int
    part_size: int
    spool: ArtifactSpool
    # A single connection at least this fast (bytes/s) already outruns unpacking on a
    # small node: more connections would only add the cost of spooling to disk.
    split_below: float
    # How many times its size an object starting with these bytes takes on the volume while it is
    # spooled: 1 for a plain file (moved out of the spool), 2 for a tar (spool and files), 3 for a zip.
    copies: Callable[[bytes], int]


class Download:
    """Iterate over an object's bytes, in order; network I/O happens in background threads.

    One stream first. If the source serves pinned ranges, the object is big
    enough, and the first part arrived slower than ``split_below`` (and not for
    want of CPU: ``fetcher.pace``), the rest is fetched in parallel parts
    through a spool on disk, which also lets a restarted run continue where
    this one stopped.
    """

    def __init__(
        self,
        source: ObjectReader,
        *,
        retries: int,
        backoff: float = 1.0,
        expect_html: bool = False,
        parallelism: Parallelism | None = None,
    ) -> None:
        self.source = source
        self.info: ObjectInfo | None = None
        self.received = 0
        self.mode = "stream"
        self._retries = retries
        self._backoff = backoff
        self._expect_html = expect_html
        self._parallelism = parallelism
        self._spool: Parts | None = None
        self._fill_spool = False  # after a fallback to one stream, keep the spool whole
        self._failures = InARow(retries, backoff, lambda: self.received)
        self._answered = threading.Event()
        self._early_error: BaseException | None = None
        self._channel: Channel | None = None
        self._prefix: Any = None  # sha256 of the bytes passed on, for an object nothing pins

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

    @property
    def spooled(self) -> bool:
        """Whether the object goes through the spool, which holds all of it once it has arrived."""
        return self._spool is not None

    def close(self, *, keep_spool: bool, disk_full: bool = False) -> None:
        """Stop the network threads; keep the spool only where a later run can resume from it.

        Without it, any spool of this artifact goes, an earlier run's included. If the disk
        filled up while parts were spooled, the next run is told to use one stream.
        """
        if self._channel is not None:
            self._channel.close()
        spooled = self._spool is not None
        if self._spool is not None:
            self._spool.close()
        if self._parallelism is None:
            return
        spool = self._parallelism.spool
        if keep_spool and not disk_full and (spool.holds_parts() or spool.no_room):
            return  # else no resume point: no part of it on disk (stopped while its first part was timed)
        if disk_full and spooled:
            spool.mark_no_room()
        else:
            spool.discard()

    # --- the network thread ------------------------------------------------

    def _produce(self, channel: Channel) -> None:
        try:
            if self._stream(channel, may_split=self._parallelism is not None):
                self._parts(channel)
        except BaseException as exc:
            if not self._answered.is_set():
                self._early_error = exc
            raise
        finally:
            self._answered.set()

    def _stream(self, channel: Channel, *, may_split: bool) -> bool:
        """One stream from ``received`` on, resumed after transient failures; True: go parallel."""
        for attempt in Retrying(
            retry=retry_if_exception_type(TransientFetchError),
            stop=self._out_of_retries,
            wait=self._failures.wait,
            before_sleep=self._log_retry,
            sleep=channel.sleep,
            reraise=True,
        ):
            with attempt:
                return self._read_from(self.received, channel, may_split=may_split and self.received == 0)
        return False  # not reached: tenacity returns or raises

    def _parts(self, channel: Channel) -> None:
        assert self._spool is not None and self._parallelism is not None
        self.mode = "parallel"
        parts = PartedDownload(
            self.source,
            self._spool,
            concurrency=self._parallelism.concurrency,
            retries=self._retries,
            backoff=self._backoff,
            channel=channel,
        )
        try:
            for chunk in parts.chunks(first=self.received // self._spool.identity.part_size):
                self.received += len(chunk)
                channel.put(chunk)
        except RangeNotHonoured as exc:
            log.warning("falling back to one stream", source=self.source.display, reason=str(exc))
            self.mode = "stream"
            self._fill_spool = True
            self._stream(channel, may_split=False)

    def _read_from(self, start: int, channel: Channel, *, may_split: bool) -> bool:
        with self.source.open(start if self._pinned else 0) as body:
            if self.info is None:
                self.info = body.info
                if not self._pinned:  # a retry must re-read from 0: keep what to compare it with
                    self._prefix = hashlib.sha256()
                self._refuse_html(body.info)
                if body.info.encoding not in (None, "identity"):
                    log.warning(
                        "the server compressed the response although asked not to",
                        source=self.source.display,
                        content_encoding=body.info.encoding,
                        effect="the bytes are hashed and saved as sent, still compressed",
                    )
            self._answered.set()
            if may_split and self._split_worthwhile(body.info):
                spool = self._open_spool()
                if spool.done:  # a run before this one got this far: go on from there
                    self._spool = spool
                    return True
                if self._first_part_slow(body, channel, spool):
                    return True
            skip = start - body.offset  # a server that ignored Range resends from 0
            if skip < 0:
                raise FetchError(f"{self.source.display} answered from byte {body.offset}, not {start} as asked")
            chunks = iter(body.chunks)
            if skip:
                chunks = self._skip(chunks, skip)
            for chunk in chunks:
                self._deliver(chunk, channel)
        if self.info.size is not None and self.received < self.info.size:
            raise TransientFetchError(f"{self.source.display} ended early, at byte {self.received} of {self.info.size}")
        return False

    @property
    def _pinned(self) -> bool:
        """Whether a later request can be pinned to the version first seen (see ``Source.open``)."""
        return self.info is None or self.info.version is not None

    def _skip(self, chunks: Iterator[bytes], count: int) -> Iterator[bytes]:
        """The chunks past the first ``count`` bytes, which were passed on before.

        Unpinned, those bytes are compared with the ones passed on: a server may since
        hold another version, and its first bytes must not be the start of what it sends now.
        """
        check = hashlib.sha256() if self._prefix is not None else None
        left = count
        for chunk in chunks:
            if left:
                if check is not None:
                    check.update(memoryview(chunk)[:left])
                taken = min(left, len(chunk))
                left -= taken
                if not left and check is not None and check.digest() != self._prefix.digest():
                    raise SourceChangedError(
                        f"{self.source.display} changed during the download (its first {count} bytes differ from "
                        "those received before, and it has no strong ETag or Last-Modified to pin a resume to)"
                    )
                if taken == len(chunk):
                    continue
                chunk = chunk[taken:]
            yield chunk

    def _split_worthwhile(self, info: ObjectInfo) -> bool:
        settings = self._parallelism
        if (
            settings is None
            or settings.concurrency < 2
            or not info.ranges
            or info.version is None
            or info.size is None
            or info.size < 2 * settings.part_size
        ):
            return False
        if settings.spool.no_room:
            log.info("one stream: the last parallel attempt filled the disk", source=self.source.display)
            return False
        return True

    def _open_spool(self) -> Parts:
        assert self._parallelism is not None and self.info is not None
        assert self.info.size is not None and self.info.version is not None
        identity = Identity(self.source.display, self.info.version, self.info.size, self._parallelism.part_size)
        return self._parallelism.spool.parts(identity)

    def _room_to_spool(self, held: list[bytes]) -> bool:
        """Whether the volume holds the spool, besides the unpacked files when there are any."""
        assert self._parallelism is not None and self.info is not None and self.info.size is not None
        head = b"".join(held)[:SNIFF_BYTES]
        needed = self.info.size * self._parallelism.copies(head)
        free = shutil.disk_usage(self._parallelism.spool.directory).free
        if free < needed:
            log.info(
                "one stream: too little free space to spool parallel parts",
                source=self.source.display,
                free=free,
                needed=needed,
            )
        return free >= needed

    def _first_part_slow(self, body: Body, channel: Channel, spool: Parts) -> bool:
        """Pass the first part on while timing the network; if it was slow, spool it and say so.

        Only the time spent waiting for the network counts, not the time the
        pipeline took to accept each chunk. The chunks are held (no copy) until
        the decision, so memory stays within one part.
        """
        assert self._parallelism is not None
        part_size = self._parallelism.part_size
        held: list[bytes] = []
        have, window, rest = 0, Window(0), b""
        try:
            chunks = iter(body.chunks)
            while have < part_size:
                began = time.monotonic()
                chunk = next(chunks, None)
                window.waited += time.monotonic() - began
                if chunk is None:
                    break
                if have + len(chunk) > part_size:
                    chunk, rest = chunk[: part_size - have], chunk[part_size - have :]
                held.append(chunk)
                have += len(chunk)
                self._deliver(chunk, channel)
            slow = window.slow(have, self._parallelism.split_below) if have == part_size else None
            if slow is not None and slow.cpu_bound:
                log.info(CPU_BOUND, source=self.source.display, **slow.fields())
            if slow is None or slow.cpu_bound or not self._room_to_spool(held):
                spool.close()
                spool.remove()
                if rest:
                    self._deliver(rest, channel)
                return False
            self._spool = spool  # from here on, close() is in charge of it
            offset = 0
            for chunk in held:
                spool.write(offset, chunk)
                offset += len(chunk)
            spool.commit(0)
        except BaseException:  # a retry starts from where the stream broke, on one stream
            self._spool = None
            spool.close()
            spool.remove()
            raise
        log.info(
            "splitting",
            source=self.source.display,
            first_part_mb_per_s=slow.mb_per_s,
            concurrency=self._parallelism.concurrency,
            part_size=part_size,
        )
        return True

    def _deliver(self, chunk: bytes, channel: Channel) -> None:
        if self._fill_spool and self._spool is not None:
            self._spool.write(self.received, chunk)
        if self._prefix is not None:
            self._prefix.update(chunk)
        self.received += len(chunk)
        self._check_size()
        channel.put(chunk)

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
        return self._failures.stop(state)

    def _log_retry(self, state: RetryCallState) -> None:
        exc: Any = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "retrying",
            source=self.source.display,
            reason=str(exc),
            delay_s=round(delay, 2),
            attempt=self._failures.count,
            of=self._retries,
            resume_at=self.received if self._pinned else 0,
        )
