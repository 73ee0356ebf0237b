"""moto's S3 server on loopback, in a process of its own (no GIL shared with anything measured).

Usage: python moto_server.py PORT   -- prints "ready" once it listens; stops on SIGTERM/SIGINT or stdin EOF.

One patch, for the benchmark only: stock moto reads an object's whole value from its spooled
temp file on *every* GET, under a per-key lock, and then slices out the requested range. For an
800 MB object fetched in 8 MiB ranges (``aws s3 cp``) that is ~100 serialized 800 MB copies, so the
benchmark would measure moto, not the client. Here an object's bytes are read once and kept in
memory; a ranged GET then costs one slice of its range. Responses are otherwise unchanged.
"""

from __future__ import annotations

import signal
import sys
import threading

from moto.s3 import models
from moto.server import ThreadedMotoServer

_stock_value = models.FakeKey.value


def _get_value(self: models.FakeKey) -> bytes:
    cached = self.__dict__.get("_bench_value")
    if cached is None:
        cached = _stock_value.fget(self)
        self.__dict__["_bench_value"] = cached
    return cached


def _set_value(self: models.FakeKey, new_value: bytes) -> None:
    self.__dict__.pop("_bench_value", None)
    _stock_value.fset(self, new_value)


models.FakeKey.value = property(_get_value, _set_value)  # type: ignore[method-assign,assignment]


def main() -> None:
    port = int(sys.argv[1])
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    def watch_stdin() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    print("ready", flush=True)
    stop.wait()
    server.stop()


if __name__ == "__main__":
    main()
