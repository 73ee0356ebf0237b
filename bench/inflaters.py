"""Which gzip inflater fetcher uses, chosen by this measurement: zlib, zlib-ng and isal.

Weight-like data as in the benchmark (fp16 drawn from N(0, 0.02), gzip -6), inflated in 1 MiB
input chunks through each library's streaming decompressobj, as fetcher's pipeline does.
Run it after `bench/run` has made its tools venv:

    bench/.cache/venvs/tools/bin/python bench/inflaters.py
"""

from __future__ import annotations

import gzip
import statistics
import time
import zlib
from types import ModuleType

import numpy as np
from isal import isal_zlib
from zlib_ng import zlib_ng

CHUNK = 1 << 20
ROUNDS = 5


def inflate_mb_per_s(module: ModuleType, compressed: bytes, size: int) -> float:
    inflater = module.decompressobj(wbits=31)
    start = time.perf_counter()
    produced = sum(len(inflater.decompress(compressed[i : i + CHUNK])) for i in range(0, len(compressed), CHUNK))
    produced += len(inflater.flush())
    elapsed = time.perf_counter() - start
    assert produced == size, (module.__name__, produced, size)
    return size / elapsed / 1e6


def main() -> None:
    raw = np.random.default_rng(1).normal(0.0, 0.02, 100_000_000).astype(np.float16).tobytes()
    compressed = gzip.compress(raw, 6)
    print(
        f"{len(raw) / 1e6:.0f} MB of fp16 weights, {len(compressed) / 1e6:.0f} MB gzipped ({1 - len(compressed) / len(raw):.1%} saved)"
    )
    libraries = {"zlib": zlib, "zlib-ng": zlib_ng, "isal": isal_zlib}
    speeds: dict[str, list[float]] = {name: [] for name in libraries}
    for _ in range(ROUNDS):  # interleaved, so a noisy neighbour hurts each library alike
        for name, module in libraries.items():
            speeds[name].append(inflate_mb_per_s(module, compressed, len(raw)))
    print("| inflater | median MB/s (output) | min | max |\n|---|---:|---:|---:|")
    for name, values in speeds.items():
        print(f"| {name} | {statistics.median(values):.0f} | {min(values):.0f} | {max(values):.0f} |")


if __name__ == "__main__":
    main()
