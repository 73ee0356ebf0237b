"""Whether a stream came slowly because of its connection, or for want of CPU.

A stream slower than ``--split-below`` is split into ranged parts over more
connections. That pays when the connection set the pace (a CDN capping each
connection); when the CPU did (several files streaming at once on a small node,
or other work on it), more connections only add work. So a stream within
CPU_SLOWDOWN of ``--split-below`` stays whole while tasks waited for a CPU for a
STALLED share of its window: the kernel's pressure stall information (PSI), for
this container's cgroup (v2), else for the machine. The machine's also counts other
pods' waits: on a cgroup v1 node, a busy node keeps a capped stream whole.

fetcher's own CPU says less: on the OCI bench (2 cores), four shards capped at
40 MB/s each kept it 0.41-0.58 cores busy, four streaming as fast as the cores
allowed 0.8-1.3, and four fetchers at once, slow for want of CPU, 0.2-0.8. The
stalled share told them apart: 0.13-0.20 capped, 0.59-1.0 in both others. Where
the kernel keeps no such record, fetcher's CPU is the guess (BUSY_CORES).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

CPU_BOUND = "one stream: the CPU is the limit, not the connection"  # the event that says so
CPU_SLOWDOWN = 4
STALLED = 0.5
BUSY_CORES = 0.5
CGROUPS = "/proc/self/cgroup"
MACHINE_PRESSURE = "/proc/pressure/cpu"


def cpu_stalled_us() -> int | None:
    """Microseconds some task has waited for a CPU so far (PSI's cpu ``some`` total), always from
    one file (``pressure_file``); None where the kernel keeps no such record."""
    path = pressure_file()
    return None if path is None else _stalled(path)


@functools.cache
def pressure_file() -> str | None:
    """This process's cgroup's cpu.pressure (cgroup v2: the container's own, whichever cgroup
    namespace it runs in), else the machine's; None before Linux 4.20, or with psi=0."""
    try:
        with open(CGROUPS, encoding="utf-8") as lines:
            own = next((line[3:].strip() for line in lines if line.startswith("0::")), None)
    except OSError:
        own = None
    candidates = ([f"/sys/fs/cgroup{own.rstrip('/')}/cpu.pressure"] if own else []) + [MACHINE_PRESSURE]
    return next((path for path in candidates if _stalled(path) is not None), None)


def _stalled(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as lines:
            return int(lines.readline().rsplit("total=", 1)[1])
    except (OSError, IndexError, ValueError):
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
