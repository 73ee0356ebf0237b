"""The floor: the least work any client that verifies what it saves does, in Python, on this host.

One thread per file, all at once; each sends one plain GET on a raw socket, reads
the body into one reused 1 MiB buffer, feeds it to sha256 and writes it (no fsync,
no spool, no retries, no startup beyond the interpreter's), then compares the digest
with SHA256SUMS. Whole 1 MiB buffers go out with O_DIRECT, as fetcher writes a large
file: through the page cache, writing costs more kernel time than anything else here
(bench/results-dirs.md), and the floor must not pay what fetcher does not. No real tool can do less
and still verify: bench/dirs.py times it beside fetcher and the others, so a target
below it is visibly one no verifying client reaches on this machine.

Usage: floor_client.py URLS DEST, where each line of URLS is "SHA256 PATH URL" (bench/dirs.py
writes it, untimed, with S3 presigned URLs: signing is not the floor's work).
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import socket
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

BUFFER = 1024 * 1024


def fetch(link: str, path: str, expected: str, dest: Path, failures: list[str]) -> None:
    url = urlsplit(link)
    target = f"{url.path}?{url.query}" if url.query else url.path
    with socket.create_connection((url.hostname, url.port or 80)) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {url.netloc}\r\nConnection: close\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            more = sock.recv(65536)
            if not more:
                failures.append(f"{path}: no response")
                return
            head += more
        raw, body = head.split(b"\r\n\r\n", 1)
        lines = raw.decode("latin-1").split("\r\n")
        if " 200 " not in lines[0] + " ":
            failures.append(f"{path}: {lines[0]}")
            return
        length = next(int(v) for k, _, v in (ln.partition(": ") for ln in lines[1:]) if k.lower() == "content-length")
        digest = hashlib.sha256(body)
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(mmap.mmap(-1, BUFFER))  # page-aligned, as O_DIRECT wants
            view[: len(body)] = body
            filled, left = len(body), length - len(body)
            direct = False
            while left > 0 or filled:
                while filled < BUFFER and left > 0:
                    n = sock.recv_into(view[filled:], min(BUFFER - filled, left))
                    if not n:
                        failures.append(f"{path}: cut short")
                        return
                    digest.update(view[filled : filled + n])
                    filled, left = filled + n, left - n
                if filled == BUFFER and not direct:
                    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
                    direct = True
                elif filled < BUFFER and direct:  # the last, partial block: buffered
                    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                    direct = False
                os.write(fd, view[:filled])
                filled = 0
        finally:
            os.close(fd)
    if digest.hexdigest() != expected:
        failures.append(f"{path}: sha256 mismatch")


def main() -> int:
    urls, dest = Path(sys.argv[1]), Path(sys.argv[2])
    files = [line.split(" ", 2) for line in urls.read_text().splitlines() if line.strip()]
    failures: list[str] = []
    threads = [
        threading.Thread(target=fetch, args=(link, path, digest, dest, failures)) for digest, path, link in files
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for failure in failures:
        print(failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
