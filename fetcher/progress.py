"""Periodic progress lines for long transfers: bytes, %, MB/s and ETA."""

from __future__ import annotations

import threading
import time

import structlog

log = structlog.get_logger("fetcher")


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024:
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} TiB"


class Progress:
    """Called with each chunk's length (from any thread); logs at most once per ``interval`` seconds.

    A directory's transfer also counts its files: ``files`` of ``files_total`` done.
    """

    def __init__(self, source: str, total: int | None, interval: float, files_total: int | None = None) -> None:
        self.source = source
        self.total = total
        self.interval = interval
        self.done = 0
        self.files = 0
        self.kept = 0  # bytes an earlier run fetched: done, but not at this run's rate
        self.files_total = files_total
        self.started = time.monotonic()
        self._next = self.started + interval
        self._lock = threading.Lock()

    def __call__(self, count: int) -> None:
        with self._lock:
            self.done += count
            now = time.monotonic()
            if now < self._next:
                return
            self._next = now + self.interval
        log.info("progress", source=self.source, **self.figures(now))

    def file_done(self, size: int | None, fetched: bool) -> None:
        """A file is in place; one kept from an earlier run counts as done, but not toward the rate."""
        with self._lock:
            self.files += 1
            if not fetched and size:
                self.done += size
                self.kept += size

    def figures(self, now: float | None = None) -> dict[str, object]:
        elapsed = max((now or time.monotonic()) - self.started, 1e-9)
        rate = (self.done - self.kept) / elapsed
        shown: dict[str, object] = {"files": f"{self.files}/{self.files_total}"} if self.files_total else {}
        shown |= {
            "bytes": self.done,
            "done": human_bytes(self.done),
            "mb_per_s": round(rate / 1e6, 1),
        }
        if self.total:
            shown["percent"] = round(100 * self.done / self.total, 1)
            shown["total"] = human_bytes(self.total)
            if rate > 0:
                shown["eta_s"] = round((self.total - self.done) / rate, 1)
        return shown
