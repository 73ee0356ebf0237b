"""glibc's allocator, set for threads that churn 1 MiB buffers.

Reuse, not fresh pages: by default glibc serves a 1 MiB allocation with mmap, or
trims the heap as soon as its top is free, so the next buffer lands on pages the
kernel must fault in again. Measured here on an 805 MB file: ~105,000 page faults
and 0.45 s of kernel time per run, against curl's 650 faults. Serving everything
below 8 MiB from the heap and keeping up to 16 MiB free at its top brought that to
~12,000 faults, and the run from ~0.99 s to ~0.78 s, for ~8 MiB more RSS.

Flat, not growing: a parallel fetch of a 3 GB object grew from 80 to 117 MiB RSS,
all of it free memory stranded in heap holes. Two arenas instead of one per
thread, and giving free pages back every few parts, keep it flat at a negligible
cost. Elsewhere than glibc (musl), all of this is a no-op.
"""

from __future__ import annotations

import contextlib
import ctypes
from typing import Any

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 8 * 1024 * 1024
TRIM_THRESHOLD = 16 * 1024 * 1024


def _libc() -> Any:
    with contextlib.suppress(OSError):  # by its soname: find_library would run ldconfig at every start
        libc = ctypes.CDLL("libc.so.6")
        if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim"):
            return libc
    return None


_LIBC = _libc()


def tune(arenas: int = 2) -> None:
    """Before any thread starts: fixed thresholds also stop glibc from moving them as it goes."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_ARENA_MAX, arenas)
        _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def give_back() -> None:
    """Return free heap pages to the system (malloc_trim also releases holes, not only the top)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
