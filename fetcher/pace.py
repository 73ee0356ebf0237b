"""Whether a stream came slowly because of its connection, or for want of CPU.

A stream slower than ``--split-below`` is split into ranged parts over more
connections. That pays when the connection set the pace (a CDN capping each
connection); when the CPU did (several files streaming at once on a small node,
or other work on it), more connections only add work. So a stream within
CPU_SLOWDOWN of ``--split-below`` stays whole while tasks waited for a CPU for a
STALLED share of its window: the kernel's pressure stall information (PSI), for
this container's cgroup, else for the machine.

fetcher's own CPU says less: on the OCI bench (2 cores), four shards capped at
40 MB/s each kept it 0.41-0.58 cores busy, four streaming as fast as the cores
allowed 0.8-1.3, and four fetchers at once, slow for want of CPU, 0.2-0.8. The
stalled share told them apart: 0.13-0.19 capped, 0.76-0.93 in both others. Where
the kernel keeps no such record, fetcher's CPU is the guess (BUSY_CORES).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

CPU_BOUND = "one stream: the CPU is the limit, not the connection"  # the event that says so
CPU_SLOWDOWN = 4
STALLED = 0.5
BUSY_CORES = 0.5
# Where the kernel keeps the time tasks waited for a CPU: this container's cgroup (v2), else the machine.
PRESSURE_FILES = ("/sys/fs/cgroup/cpu.pressure", "/proc/pressure/cpu")


def cpu_stalled_us() -> int | None:
    """Microseconds some task has waited for a CPU so far (PSI's cpu ``some`` total); None where
    the kernel keeps no such record (before Linux 4.20, or booted with psi=0)."""
    for path in PRESSURE_FILES:
        try:
            with open(path, encoding="ascii") as lines:
                return int(lines.readline().rsplit("total=", 1)[1])
        except (OSError, IndexError, ValueError):
            continue
    return None


@dataclass(frozen=True)
class Slow:
    """A window that came slower than ``--split-below``, and whether the CPU may be why."""

    mb_per_s: float
    cpu_bound: bool
    cores_busy: float
    cpu_stalled: float | None  # share of the window; None: no pressure record

    def fields(self) -> dict[str, float | None]:
        """What the CPU_BOUND event says about the first part."""
        return {"first_part_mb_per_s": self.mb_per_s, "cores_busy": self.cores_busy, "cpu_stalled": self.cpu_stalled}


@dataclass
class Window:
    """A stretch of one stream from byte ``start``: how long it waited for the network, and the
    clocks when it began."""

    start: int
    waited: float = 0.0
    cpu: float = field(default_factory=time.process_time)
    wall: float = field(default_factory=time.monotonic)
    stalled: int | None = field(default_factory=cpu_stalled_us)

    def slow(self, end: int, split_below: float) -> Slow | None:
        """None if bytes ``start`` to ``end`` came at ``split_below`` or faster (time spent
        waiting for the network only); else how slowly, and whether the CPU was wanting."""
        rate = (end - self.start) / max(self.waited, 1e-6)
        if rate >= split_below:
            return None
        seconds = max(time.monotonic() - self.wall, 1e-6)
        busy = (time.process_time() - self.cpu) / seconds
        now = cpu_stalled_us()
        stalled = None if now is None or self.stalled is None else (now - self.stalled) / 1e6 / seconds
        wanting = busy >= BUSY_CORES if stalled is None else stalled >= STALLED
        return Slow(
            mb_per_s=round(rate / 1e6, 1),
            cpu_bound=wanting and rate * CPU_SLOWDOWN >= split_below,
            cores_busy=round(busy, 2),
            cpu_stalled=None if stalled is None else round(stalled, 2),
        )
