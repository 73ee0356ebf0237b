"""tests/fakehub.py served standalone, counting what it sends: for bench/cache.py.

``python bench/counting_hub.py --repo org/name --dir PATH [--rate BYTES]`` prints fakehub's
{"endpoint", "cdn_endpoint", "commit"} line, then answers each ``stats`` line on its stdin with one
JSON line: every byte it has written to a client so far (status lines, headers and bodies) by server
(``hub`` or ``cdn``) and path without its query; the bytes of each file's content it sent in bodies
(by the file's sha256, counted before gzip, ranges included) and how many bodies began at its first
byte (the downloads of it: a resumed or ranged part begins elsewhere); and the requests. It stops at the end of stdin
(when the bench exits, however it exits) or on SIGTERM.

The count is taken where the handler writes to its socket (``wfile``): it is what the origin sent,
whatever the client did with it, a range or a body it dropped half way included.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import fakehub  # tests/fakehub.py (imports pytest: venvs/tools has it)


class _Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent: dict[str, int] = {}  # "server path" -> bytes written
        self.content: dict[str, int] = {}  # a file's sha256 -> bytes of it sent in bodies, before any gzip
        self.starts: dict[str, int] = {}  # a file's sha256 -> bodies that began at its first byte: downloads of it
        self.requests: dict[str, int] = {}  # "server method path" -> count
        self.ranged = 0  # requests with a Range header

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "sent": dict(self.sent),
                "content": dict(self.content),
                "starts": dict(self.starts),
                "requests": dict(self.requests),
                "ranged": self.ranged,
            }


COUNTS = _Counts()


def _key(handler: Any) -> str:
    return f"{handler.role} {str(getattr(handler, 'path', '?')).split('?', 1)[0]}"


class _CountingWriter:
    """The handler's wfile, adding what goes through it to the count of the request being answered."""

    def __init__(self, inner: Any, handler: Any) -> None:
        self._inner, self._handler = inner, handler

    def write(self, data: bytes) -> int:
        n = self._inner.write(data)
        key = _key(self._handler)
        with COUNTS.lock:
            COUNTS.sent[key] = COUNTS.sent.get(key, 0) + len(data)
        return int(n) if n is not None else len(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


_setup = fakehub._Handler.setup
_record = fakehub.FakeHub._record
_bytes = fakehub.FakeHub._bytes


def _counting_setup(self: Any) -> None:
    _setup(self)
    self.wfile = _CountingWriter(self.wfile, self)


def _counting_record(self: Any, role: str, method: str, path: str, headers: Any) -> None:
    headers = list(headers)
    key = f"{role} {method} {path.split('?', 1)[0]}"
    with COUNTS.lock:
        COUNTS.requests[key] = COUNTS.requests.get(key, 0) + 1
        COUNTS.ranged += any(k.lower() == "range" for k, _ in headers)
    _record(self, role, method, path, headers)


def _counting_bytes(self: Any, blob: Any, start: int, end: int, flip: int | None) -> bytes:
    data: bytes = _bytes(self, blob, start, end, flip)
    with COUNTS.lock:
        COUNTS.content[blob.sha256] = COUNTS.content.get(blob.sha256, 0) + len(data)
        if start == 0:  # a body's first piece (fakehub reads a body piece by piece, from its start)
            COUNTS.starts[blob.sha256] = COUNTS.starts.get(blob.sha256, 0) + 1
    return data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", required=True)
    ap.add_argument("--dir", required=True, type=Path)
    ap.add_argument("--rate", type=int, default=None, help="bytes/s per connection for file bodies")
    args = ap.parse_args()
    fakehub._Handler.setup = _counting_setup  # type: ignore[method-assign]
    fakehub.FakeHub._record = _counting_record  # type: ignore[method-assign]
    fakehub.FakeHub._bytes = _counting_bytes  # type: ignore[method-assign]
    server = fakehub.FakeHub()
    server.record = False  # fakehub's own list of requests: the counts above are all the bench needs
    server.rate_limit(args.rate)
    commit = server.add_repo_dir(args.repo, args.dir)
    print(json.dumps({"endpoint": server.endpoint, "cdn_endpoint": server.cdn_endpoint, "commit": commit}), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        for line in sys.stdin:
            if line.strip() == "stats":
                print(json.dumps(COUNTS.snapshot()), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
