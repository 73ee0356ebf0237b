"""A fake Hugging Face Hub on loopback, for tests and benchmarks without the internet.

Why a fake at all: an hf:// source has to be tested against the places where a client gets the
real hub wrong, and those are protocol details, not happy paths. So, as on huggingface.co (and as
tests/test_fakehub.py proves with the real huggingface_hub client):

- LFS files answer ``/resolve`` with a 302 to a CDN on *another host* (127.0.0.2) whose signed URL
  expires; the file's metadata (X-Repo-Commit, X-Linked-Etag = sha256, X-Linked-Size) is on the 302
  only. The CDN needs no token and must never see one; its own ETag is a 64-hex value that is *not*
  the sha256 (the real CDN answers with a Xet hash).
- Small files of public repos answer ``/resolve`` with a 307 to a *relative*, commit-pinned
  ``/api/resolve-cache/...`` URL on the same host, whose 200 carries ETag (git blob id) and
  X-Repo-Commit; private and gated repos, and empty files, are served directly. Text files come
  back gzip-compressed and chunked (no Content-Length) to a GET that accepts gzip.
- A tree listing's ``oid`` is the git blob id of what git stores: for an LFS file that is the
  pointer file, not the content; the content's sha256 is ``lfs.oid``. Commit and directory ids are
  real git object ids. Listings are paginated with a ``Link: <...&cursor=...>; rel="next"`` header.
- Errors carry X-Error-Code / X-Error-Message and {"error": ...}: a missing (or hidden private)
  repo is 401 RepoNotFound without a token, 404 with one; a gated repo's *files* are 401/403
  GatedRepo (its info and listing are public, as on the hub); RevisionNotFound and EntryNotFound
  are 404s.
- No Xet headers are ever sent, so clients take the plain HTTP path.

Run standalone for benchmarks: ``python tests/fakehub.py --repo org/name --dir PATH [--rate BYTES]``
prints {"endpoint", "cdn_endpoint", "commit"} as one JSON line and serves until killed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gzip
import hashlib
import hmac
import json
import secrets
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import pytest

MiB = 1024 * 1024
# The suffixes the hub's default .gitattributes sends to LFS (the brief's four, and their usual company).
LFS_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".h5", ".msgpack", ".model",
    ".pkl", ".npy", ".npz", ".tflite", ".parquet", ".arrow", ".zip", ".tar", ".gz", ".zst",
)  # fmt: skip
# What the hub's front compresses for a client that accepts gzip.
TEXT_SUFFIXES = (".json", ".txt", ".md", ".py", ".yaml", ".yml", ".csv", ".jsonl", ".gitattributes", ".html")
_LFS_SPEC = "version https://git-lfs.github.com/spec/v1\n"
_EPOCH = 1_700_000_000  # the fake's clock: commits are deterministic, so a benchmark's commit is stable


@dataclass
class Request:
    """One request as a server received it; header names lowercased."""

    server: str  # "hub" or "cdn"
    method: str
    path: str  # with its query
    headers: dict[str, str]


@dataclass(frozen=True)
class _Blob:
    size: int
    sha256: str
    git_oid: str  # the blob git stores: the content, or for LFS the pointer file
    lfs: bool
    pointer_size: int
    data: bytes | None = None  # in memory, or
    path: Path | None = None  # on disk (the standalone server's directory)

    def read(self, start: int, end: int) -> bytes:
        if self.data is not None:
            return self.data[start:end]
        assert self.path is not None
        with self.path.open("rb") as handle:
            handle.seek(start)
            return handle.read(end - start)

    @property
    def cdn_etag(self) -> str:
        """The CDN's own ETag: 64 hex like a sha256, and deliberately not the sha256 (the real one is a Xet hash)."""
        return hashlib.sha256(b"xet-merkle:" + bytes.fromhex(self.sha256)).hexdigest()


@dataclass(frozen=True)
class _Commit:
    sha: str
    parent: str | None
    time: int
    title: str
    files: dict[str, _Blob]
    trees: dict[str, str]  # directory ("" = root) -> git tree id
    listing: list[str]  # every file and directory, in git's recursive order (a directory before its content)


@dataclass
class _Repo:
    kind: str  # "model" | "dataset"
    repo_id: str
    private: bool
    gated: bool
    default_branch: str
    created: int
    object_id: str  # 24 hex, as the hub's repo ids; names the repo on the CDN
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)
    blobs: dict[str, _Blob] = field(default_factory=dict)  # by sha256
    corrupted: dict[str, int] = field(default_factory=dict)  # sha256 -> offset of the flipped byte


@dataclass
class _Reply:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    blob: _Blob | None = None  # or: this blob's bytes [start, end)
    start: int = 0
    end: int = 0
    flip: int | None = None  # offset of a corrupted byte
    paced: bool = False  # under rate_limit()
    compressed: bool = False  # body is gzip, sent chunked


class _Unsatisfiable(Exception):
    pass


def _git_id(kind: str, payload: bytes) -> str:
    return hashlib.sha1(b"%s %d\0" % (kind.encode(), len(payload)) + payload).hexdigest()


def _iso(when: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(when))


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """[start, end) asked for by a single-range Range header; None: the whole body (no, several or bad ranges)."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, dash, last = header[6:].strip().partition("-")
    if not dash or not (first.isdigit() or last.isdigit()) or (first and not first.isdigit()):
        return None
    if last and not last.isdigit():
        return None
    if not first:  # the last N bytes
        if int(last) == 0 or size == 0:
            raise _Unsatisfiable
        return max(0, size - int(last)), size
    start = int(first)
    end = min(size, int(last) + 1) if last else size
    if start >= size or (last and int(last) < start):
        raise _Unsatisfiable
    return start, end


def _disposition(name: str) -> str:
    return f"inline; filename*=UTF-8''{quote(name)}; filename=\"{name}\";"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes: no 40 ms delayed-ACK stall
    hub: FakeHub
    role: str

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def _refuse(self) -> None:
        self.hub._record(self.role, self.command, self.path, self.headers.items())
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self._send(self.hub._error(405, None, "Method not allowed"))

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse

    def _handle(self) -> None:
        self.hub._record(self.role, self.command, self.path, self.headers.items())
        try:
            reply = self.hub._hub(self) if self.role == "hub" else self.hub._cdn(self)
            self._send(reply)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send(self, reply: _Reply) -> None:
        body = reply.body
        if reply.blob is not None:
            if reply.compressed:
                body = self.hub._bytes(reply.blob, reply.start, reply.end, reply.flip)
                body = gzip.compress(body, mtime=0)
            length = reply.end - reply.start
        else:
            length = len(body)
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if reply.compressed:
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Transfer-Encoding", "chunked")
        elif reply.status != 304:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command == "HEAD" or reply.status == 304:
            return
        rate = self.hub._rate if reply.paced else None
        if reply.compressed:
            self._write_chunked(body, rate)
        elif reply.blob is None:
            self.wfile.write(body)
        else:
            step = MiB if rate is None else max(1, min(256 * 1024, rate // 20))
            burst = self.hub._burst if rate is not None else 0  # sent at once, before the rate applies
            began: float | None = None
            sent = 0
            for offset in range(reply.start, reply.end, step):
                piece = self.hub._bytes(reply.blob, offset, min(reply.end, offset + step), reply.flip)
                sent += len(piece)
                if sent > burst:
                    began = began or time.monotonic()
                    self._pace(began, sent - burst, rate)
                self.wfile.write(piece)

    @staticmethod
    def _pace(began: float, sent: int, rate: int | None) -> None:
        """Hold a piece back until the rate allows all bytes up to its end: n bytes take n / rate seconds."""
        if rate and (ahead := began + sent / rate - time.monotonic()) > 0:
            time.sleep(ahead)

    def _write_chunked(self, body: bytes, rate: int | None) -> None:
        step = 64 * 1024 if rate is None else max(1, min(64 * 1024, rate // 20))
        began = time.monotonic()
        for offset in range(0, len(body), step):
            piece = body[offset : offset + step]
            self._pace(began, offset + len(piece), rate)
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")


def _serve(host: str, hub: FakeHub, role: str) -> ThreadingHTTPServer:
    handler = type(f"_{role.title()}Handler", (_Handler,), {"hub": hub, "role": role})
    server = ThreadingHTTPServer((host, 0), handler)
    server.daemon_threads = True
    # A short poll: shutdown() waits for it, and every test closes two servers.
    threading.Thread(target=server.serve_forever, args=(0.02,), name=f"fakehub-{role}", daemon=True).start()
    return server


class FakeHub:
    """Two ThreadingHTTPServers: the hub API on 127.0.0.1 and a CDN (blob server) on a different
    host, 127.0.0.2 (another loopback address, so really another origin; "localhost" if it cannot bind)."""

    page_size: int = 1000  # tree entries per page (50 with expand=true, as the hub); tests make it small
    lfs_threshold: int = MiB  # files this big or bigger go to LFS, as do names ending in lfs_suffixes
    lfs_suffixes: tuple[str, ...] = LFS_SUFFIXES
    url_ttl: float = 3600  # seconds a signed CDN URL stays valid (the hub's are ~1 h)
    resolve_cache: bool = True  # small public files: 307 to /api/resolve-cache/... (False: served by /resolve)
    compress_text: bool = True  # gzip text files to a GET that accepts it, as the hub does
    record: bool = True  # append every request to .requests (the standalone server turns it off)

    def __init__(self, *, token: str | None = None, page_size: int = 1000) -> None:
        self.token = token  # when set, private and gated repos need "Authorization: Bearer <token>"
        self.page_size = page_size
        self.ignore_ranges = False  # say Accept-Ranges, then answer a Range with the whole file (200)
        self.requests: list[Request] = []
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._cdn_repos: dict[str, _Repo] = {}
        self._lock = threading.Lock()
        self._clock = _EPOCH
        self._rate: int | None = None
        self._burst = 0
        self._secret = secrets.token_bytes(32)
        self._hub_server = _serve("127.0.0.1", self, "hub")
        try:
            self._cdn_server = _serve("127.0.0.2", self, "cdn")
            cdn_host = "127.0.0.2"
        except OSError:  # no 127.0.0.2 here (macOS): another name for this host is still another origin
            self._cdn_server = _serve("127.0.0.1", self, "cdn")
            cdn_host = "localhost"
        self.endpoint = f"http://127.0.0.1:{self._hub_server.server_address[1]}"
        self.cdn_endpoint = f"http://{cdn_host}:{self._cdn_server.server_address[1]}"
        self._closed = False

    # --- the test's side -------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        repo_type: str = "model",
        gated: bool = False,
        private: bool = False,
        branch: str = "main",
    ) -> str:
        """Create a repo with one commit holding files on branch; return the 40-hex commit sha."""
        return self._add_repo(repo_id, self._blobs(files), repo_type, gated, private, branch)

    def add_repo_dir(self, repo_id: str, directory: Path, *, repo_type: str = "model", **options: Any) -> str:
        """A repo of a local directory's files, read from disk when served (for benchmarks with big files)."""
        files: dict[str, _Blob] = {}
        for path in sorted(directory.rglob("*")):
            relative = path.relative_to(directory)
            if not path.is_file() or relative.parts[0] == ".git" or relative.parts[:2] == (".cache", "huggingface"):
                continue
            files[relative.as_posix()] = self._blob(relative.as_posix(), path=path)
        return self._add_repo(repo_id, files, repo_type, options.get("gated", False), options.get("private", False),
                              options.get("branch", "main"))  # fmt: skip

    def commit(self, repo_id: str, files: dict[str, bytes], *, repo_type: str = "model", branch: str = "main") -> str:
        """A new commit on branch with exactly these files (moves the branch); returns its sha. Old commits stay."""
        with self._lock:
            repo = self._get(repo_type, repo_id)
            return self._commit(repo, self._blobs(files), branch)

    def corrupt(self, repo_id: str, path: str, *, repo_type: str = "model") -> None:
        """From now on that file's bytes (at the default branch's head) are served with one byte flipped,
        same length, while every hash and ETag still names the original: a client that verifies notices."""
        with self._lock:
            repo = self._get(repo_type, repo_id)
            blob = repo.commits[repo.branches[repo.default_branch]].files[path]
            if blob.size == 0:
                raise ValueError(f"{path} is empty: there is no byte to corrupt")
            repo.corrupted[blob.sha256] = blob.size // 2

    def rate_limit(self, bytes_per_second: int | None, *, burst: int = 0) -> None:
        """Cap each connection's CDN and /resolve bodies at this rate (for benchmarks); None: unlimited.

        ``burst``: the first bytes of each file body go at once, as a CDN's token bucket lets them.
        """
        self._rate = bytes_per_second
        self._burst = burst

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for server in (self._hub_server, self._cdn_server):
            server.shutdown()
            server.server_close()

    def __enter__(self) -> FakeHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- repos and git objects ---------------------------------------------------------

    def _get(self, repo_type: str, repo_id: str) -> _Repo:
        try:
            return self._repos[repo_type, repo_id]
        except KeyError:
            raise KeyError(f"no {repo_type} repo {repo_id!r}") from None

    def _blobs(self, files: dict[str, bytes]) -> dict[str, _Blob]:
        return {name: self._blob(name, data=data) for name, data in files.items()}

    def _blob(self, name: str, *, data: bytes | None = None, path: Path | None = None) -> _Blob:
        size = len(data) if data is not None else path.stat().st_size  # type: ignore[union-attr]
        lfs = name != ".gitattributes" and (size >= self.lfs_threshold or name.lower().endswith(self.lfs_suffixes))
        sha256, sha1 = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % size)
        if data is not None:
            sha256.update(data)
            sha1.update(data)
        else:
            assert path is not None
            with path.open("rb") as handle:
                while piece := handle.read(8 * MiB):
                    sha256.update(piece)
                    if not lfs:
                        sha1.update(piece)
        digest = sha256.hexdigest()
        if not lfs:
            return _Blob(size, digest, sha1.hexdigest(), False, 0, data, path)
        pointer = f"{_LFS_SPEC}oid sha256:{digest}\nsize {size}\n".encode()
        return _Blob(size, digest, _git_id("blob", pointer), True, len(pointer), data, path)

    def _gitattributes(self, files: dict[str, _Blob]) -> bytes:
        """Like a new repo's: LFS by suffix, plus a line for each file that went to LFS for its size."""
        lines = [f"*{suffix} filter=lfs diff=lfs merge=lfs -text" for suffix in self.lfs_suffixes]
        lines += [
            f"{name.replace(' ', '[[:space:]]')} filter=lfs diff=lfs merge=lfs -text"
            for name, blob in sorted(files.items())
            if blob.lfs and not name.lower().endswith(self.lfs_suffixes)
        ]
        return ("\n".join(lines) + "\n").encode()

    def _add_repo(
        self, repo_id: str, files: dict[str, _Blob], repo_type: str, gated: bool, private: bool, branch: str
    ) -> str:
        if repo_type not in ("model", "dataset"):
            raise ValueError(f"repo_type must be 'model' or 'dataset', not {repo_type!r}")
        if repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise ValueError(f"repo_id must be 'namespace/name', not {repo_id!r}")
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                raise ValueError(f"{repo_type} repo {repo_id} already exists")
            object_id = hashlib.sha256(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24]
            repo = _Repo(repo_type, repo_id, private, gated, branch, self._clock, object_id)
            self._repos[repo_type, repo_id] = repo
            self._cdn_repos[object_id] = repo
            return self._commit(repo, files, branch)

    def _commit(self, repo: _Repo, files: dict[str, _Blob], branch: str) -> str:
        if ".gitattributes" not in files:
            files = {**files, ".gitattributes": self._blob(".gitattributes", data=self._gitattributes(files))}
        for name in files:
            if not name or name.startswith("/") or any(part in ("", ".", "..") for part in name.split("/")):
                raise ValueError(f"not a repo path: {name!r}")
        self._clock += 60
        # Directory tree -> git tree ids, bottom up; and git's recursive listing order.
        children: dict[str, dict[str, str | None]] = {"": {}}  # dir -> name -> blob path (None: a directory)
        for name in files:
            parts = name.split("/")
            for depth in range(len(parts)):
                parent = "/".join(parts[:depth])
                children.setdefault(parent, {})
                if depth < len(parts) - 1:
                    children[parent][parts[depth]] = None
                    children.setdefault("/".join(parts[: depth + 1]), {})
                else:
                    children[parent][parts[depth]] = name
        trees: dict[str, str] = {}
        listing: list[str] = []

        def order(directory: str) -> list[str]:
            return sorted(children[directory], key=lambda n: n + ("/" if children[directory][n] is None else ""))

        def tree(directory: str) -> str:
            payload = b""
            for child in order(directory):
                full = f"{directory}/{child}" if directory else child
                blob_path = children[directory][child]
                if blob_path is None:
                    payload += b"40000 %s\0" % child.encode() + bytes.fromhex(tree(full))
                else:
                    payload += b"100644 %s\0" % child.encode() + bytes.fromhex(files[blob_path].git_oid)
            trees[directory] = _git_id("tree", payload)
            return trees[directory]

        def walk(directory: str) -> None:
            for child in order(directory):
                full = f"{directory}/{child}" if directory else child
                listing.append(full)
                if children[directory][child] is None:
                    walk(full)

        root = tree("")
        walk("")
        previous = repo.branches.get(branch) or repo.branches.get(repo.default_branch)
        title = f"Upload {len(files)} files"
        stamp = f"Fake Hub <hub@fakehub.invalid> {self._clock} +0000"
        text = f"tree {root}\n" + (f"parent {previous}\n" if previous else "")
        text += f"author {stamp}\ncommitter {stamp}\n\n{title}\n"
        sha = _git_id("commit", text.encode())
        ordered = {name: files[name] for name in listing if name in files}
        repo.commits[sha] = _Commit(sha, previous, self._clock, title, ordered, trees, listing)
        for blob in files.values():
            repo.blobs.setdefault(blob.sha256, blob)
        repo.branches[branch] = sha
        return sha

    def _bytes(self, blob: _Blob, start: int, end: int, flip: int | None) -> bytes:
        data = blob.read(start, end)
        if flip is not None and start <= flip < end:
            spoiled = bytearray(data)
            spoiled[flip - start] ^= 0xFF
            data = bytes(spoiled)
        return data

    # --- serving ---------------------------------------------------------------------

    def _record(self, role: str, method: str, path: str, headers: Any) -> None:
        if self.record:
            self.requests.append(Request(role, method, path, {k.lower(): v for k, v in headers}))

    def _error(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None) -> _Reply:
        extra = {"X-Error-Code": code} if code else {}
        return _Reply(
            status,
            {
                "Content-Type": "application/json; charset=utf-8",
                **extra,
                "X-Error-Message": message,
                "X-Request-Id": f"Root=1-{int(time.time()):08x}-{secrets.token_hex(12)}",
                **(headers or {}),
            },
            json.dumps({"error": message}).encode(),
        )

    def _json(self, payload: Any, headers: dict[str, str] | None = None) -> _Reply:
        return _Reply(200, {"Content-Type": "application/json; charset=utf-8", **(headers or {})},
                      json.dumps(payload).encode())  # fmt: skip

    def _access(self, handler: _Handler, kind: str, repo_id: str, *, files: bool) -> _Repo | _Reply:
        """The repo, or the hub's refusal: hidden private repos look missing, gated repos guard their files."""
        sent = handler.headers.get("Authorization")
        allowed = self.token is None or sent == f"Bearer {self.token}"
        repo = self._repos.get((kind, repo_id))
        if repo is None or (repo.private and not allowed):
            if sent is None:
                return self._error(401, "RepoNotFound", "Invalid username or password.")
            return self._error(404, "RepoNotFound", "Repository not found")
        if files and repo.gated and not allowed:
            if sent is None:
                message = (
                    f"Access to {kind} {repo_id} is restricted. You must have access to it and be authenticated"
                    " to access it. Please log in."
                )
                return self._error(401, "GatedRepo", message)
            prefix = "datasets/" if kind == "dataset" else ""
            message = (
                f"Access to {kind} {repo_id} is restricted and you are not in the authorized list."
                f" Visit {self.endpoint}/{prefix}{repo_id} to ask for access."
            )
            return self._error(403, "GatedRepo", message)
        return repo

    def _revision(self, repo: _Repo, revision: str) -> _Commit | _Reply:
        sha = repo.branches.get(revision) or (revision if revision in repo.commits else None)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo.commits[sha]

    def _hub(self, handler: _Handler) -> _Reply:
        url = urlsplit(handler.path)
        query = parse_qs(url.query, keep_blank_values=True)
        parts = [unquote(part) for part in url.path.split("/")[1:]]  # split first: %2F stays inside a segment
        if parts[:1] == ["api"] and len(parts) >= 4:
            if parts[1] == "resolve-cache" and len(parts) >= 7 and parts[2] in ("models", "datasets"):
                return self._resolve(handler, parts[2][:-1], "/".join(parts[3:5]), parts[5], "/".join(parts[6:]),
                                     pinned=True)  # fmt: skip
            if parts[1] in ("models", "datasets"):
                kind, repo_id, rest = parts[1][:-1], "/".join(parts[2:4]), parts[4:]
                if not rest or (rest[0] == "revision" and len(rest) >= 2):
                    return self._info(handler, kind, repo_id, "/".join(rest[1:]) or None, query)
                if rest[0] == "tree" and len(rest) >= 2:
                    revision, path = self._split_revision(rest[1:])
                    return self._tree(handler, kind, repo_id, revision, path, query, url.path)
        else:
            kind = "dataset" if parts[:1] == ["datasets"] else "model"
            parts = parts[1:] if kind == "dataset" else parts
            if len(parts) >= 5 and parts[2] == "resolve":
                revision, path = self._split_revision(parts[3:])
                if path:
                    return self._resolve(handler, kind, "/".join(parts[:2]), revision, path, pinned=False)
        return self._error(404, None, "Not Found")

    @staticmethod
    def _split_revision(parts: list[str]) -> tuple[str, str]:
        """Revision and path from URL segments; the hub also takes refs/pr/N and refs/convert/X unencoded."""
        if parts[0] == "refs" and len(parts) >= 3:
            return "/".join(parts[:3]), "/".join(parts[3:])
        return parts[0], "/".join(parts[1:])

    def _info(
        self, handler: _Handler, kind: str, repo_id: str, revision: str | None, query: dict[str, list[str]]
    ) -> _Reply:
        repo = self._access(handler, kind, repo_id, files=False)
        if isinstance(repo, _Reply):
            return repo
        commit = self._revision(repo, revision or repo.default_branch)
        if isinstance(commit, _Reply):
            return commit
        blobs = query.get("blobs", [""])[0].lower() == "true"
        siblings: list[dict[str, Any]] = []
        for name, blob in commit.files.items():
            sibling: dict[str, Any] = {"rfilename": name}
            if blobs:
                sibling |= {"blobId": blob.git_oid, "size": blob.size}
                if blob.lfs:
                    sibling["lfs"] = {"sha256": blob.sha256, "size": blob.size, "pointerSize": blob.pointer_size}
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": repo.object_id,
            "id": repo_id,
            **({"modelId": repo_id} if kind == "model" else {}),
            "author": repo_id.split("/")[0],
            "sha": commit.sha,
            "lastModified": _iso(commit.time),
            "createdAt": _iso(repo.created),
            "private": repo.private,
            "gated": "auto" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            **({"library_name": None, "spaces": []} if kind == "model" else {}),
            "siblings": siblings,
            "usedStorage": sum(blob.size for blob in repo.blobs.values()),
        }
        expand = query.get("expand", []) + query.get("expand[]", [])
        if expand:
            info = {key: value for key, value in info.items() if key in ("_id", "id", *expand)}
        return self._json(info)

    def _last_commit(self, repo: _Repo, commit: _Commit, path: str) -> _Commit:
        """The oldest commit back from this one in which path was already what it is here."""

        def oid(at: _Commit) -> str | None:
            blob = at.files.get(path)
            return blob.git_oid if blob is not None else at.trees.get(path)

        mine = oid(commit)
        while commit.parent is not None and oid(repo.commits[commit.parent]) == mine:
            commit = repo.commits[commit.parent]
        return commit

    def _tree(
        self,
        handler: _Handler,
        kind: str,
        repo_id: str,
        revision: str,
        path: str,
        query: dict[str, list[str]],
        url_path: str,
    ) -> _Reply:
        repo = self._access(handler, kind, repo_id, files=False)
        if isinstance(repo, _Reply):
            return repo
        commit = self._revision(repo, revision)
        if isinstance(commit, _Reply):
            return commit
        path = path.strip("/")
        if path and path not in commit.trees:
            return self._error(404, "EntryNotFound", f'{path} does not exist on "{revision}"')
        recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
        expand = query.get("expand", ["false"])[0].lower() in ("true", "1")
        prefix = f"{path}/" if path else ""
        chosen = [
            name for name in commit.listing if name.startswith(prefix) and (recursive or "/" not in name[len(prefix) :])
        ]
        start = 0
        if cursor := query.get("cursor", [""])[0]:
            try:
                last = json.loads(base64.urlsafe_b64decode(cursor.encode()).decode().rpartition(":")[0])["file_name"]
                start = chosen.index(last) + 1
            except (ValueError, KeyError, TypeError):
                return self._error(400, None, "Invalid cursor")
        size = min(self.page_size, 50) if expand else self.page_size
        page = chosen[start : start + size]
        entries: list[dict[str, Any]] = []
        for name in page:
            blob = commit.files.get(name)
            entry: dict[str, Any]
            if blob is None:
                entry = {"type": "directory", "oid": commit.trees[name], "size": 0, "path": name}
            else:
                entry = {"type": "file", "oid": blob.git_oid, "size": blob.size}
                if blob.lfs:
                    entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": blob.pointer_size}
                entry["path"] = name
            if expand:
                last_commit = self._last_commit(repo, commit, name)
                entry["lastCommit"] = {"id": last_commit.sha, "title": last_commit.title,
                                       "date": _iso(last_commit.time)}  # fmt: skip
            entries.append(entry)
        headers = {}
        if start + size < len(chosen):
            token = json.dumps({"file_name": page[-1]}) + f":{start + size}"
            params = [(k, v) for k, values in query.items() if k != "cursor" for v in values]
            params.append(("cursor", base64.urlsafe_b64encode(token.encode()).decode()))
            headers["Link"] = f'<{self.endpoint}{url_path}?{urlencode(params)}>; rel="next"'
        return self._json(entries, headers)

    def _resolve(self, handler: _Handler, kind: str, repo_id: str, revision: str, path: str, *, pinned: bool) -> _Reply:
        repo = self._access(handler, kind, repo_id, files=True)
        if isinstance(repo, _Reply):
            return repo
        commit = self._revision(repo, revision)
        if isinstance(commit, _Reply):
            return commit
        base = {"X-Repo-Commit": commit.sha, "X-Request-Id": f"Root=1-{secrets.token_hex(12)}"}
        blob = commit.files.get(path)
        if blob is None:
            return self._error(404, "EntryNotFound", "Entry not found", base)
        name = path.rsplit("/", 1)[-1]
        if blob.lfs:
            location = self._cdn_url(repo, blob, name)
            return _Reply(
                302,
                {
                    "Content-Type": "text/plain; charset=utf-8",
                    "Location": location,
                    **base,
                    "Accept-Ranges": "bytes",
                    "X-Linked-Size": str(blob.size),
                    "X-Linked-Etag": f'"{blob.sha256}"',
                    "Vary": "Origin, Accept",
                },
                f"Found. Redirecting to {location}".encode(),
            )
        public = not repo.private and not repo.gated
        if not pinned and self.resolve_cache and public and blob.size > 0:
            prefix = "datasets/" if kind == "dataset" else ""
            origin = f"/{prefix}{repo_id}/resolve/{quote(revision, safe='')}/{path}"
            target = f"/api/resolve-cache/{kind}s/{repo_id}/{commit.sha}/{quote(path)}?"
            target += urlencode([(origin, ""), ("etag", f'"{blob.git_oid}"')])
            return _Reply(
                307,
                {"Content-Type": "text/plain; charset=utf-8", "Location": target, "Vary": "Origin, Accept"},
                f"Temporary Redirect. Redirecting to {target}".encode(),
            )
        text = name.lower().endswith(TEXT_SUFFIXES) or name == ".gitattributes"
        headers = {
            "Content-Type": "text/plain; charset=utf-8" if text else "application/octet-stream",
            **base,
            "ETag": f'"{blob.git_oid}"',
            "Content-Disposition": _disposition(name),
            "Vary": "Origin, Accept",
        }
        reply = self._content(handler, repo, blob, headers, blob.git_oid)
        accepts = handler.headers.get("Accept-Encoding", "").lower()
        if (
            reply.status == 200
            and handler.command == "GET"
            and text
            and self.compress_text
            and "gzip" in accepts
            and reply.blob is not None
        ):
            reply.compressed = True
            reply.headers.pop("Accept-Ranges", None)
        return reply

    def _content(self, handler: _Handler, repo: _Repo, blob: _Blob, headers: dict[str, str], etag: str) -> _Reply:
        """A blob's bytes as a cache or a CDN answers them: validators, one byte range, the rate limit."""
        headers = {**headers, "Accept-Ranges": "bytes"}
        match = handler.headers.get("If-Match")
        if match is not None and match.strip() not in ("*", f'"{etag}"'):
            return _Reply(412, headers, b"")
        if handler.headers.get("If-None-Match", "").strip() in ("*", f'"{etag}"'):
            return _Reply(304, headers)
        try:
            wanted = None if self.ignore_ranges else _byte_range(handler.headers.get("Range"), blob.size)
        except _Unsatisfiable:
            return _Reply(416, {**headers, "Content-Range": f"bytes */{blob.size}"}, b"")
        start, end = wanted if wanted is not None else (0, blob.size)
        if wanted is not None:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{blob.size}"
        flip = repo.corrupted.get(blob.sha256)
        return _Reply(206 if wanted else 200, headers, blob=blob, start=start, end=end, flip=flip, paced=True)

    # --- the CDN ---------------------------------------------------------------------

    def _signature(self, path: str, disposition: str, expires: int) -> str:
        signed = hmac.new(self._secret, f"{path}\n{disposition}\n{expires}".encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(signed.digest()).decode().rstrip("=")

    def _cdn_url(self, repo: _Repo, blob: _Blob, name: str) -> str:
        """A signed, expiring URL as CloudFront's: the file's name rides in response-content-disposition."""
        path = f"/repos/{repo.object_id}/{blob.sha256}"
        expires = int(time.time() + self.url_ttl)
        disposition = _disposition(name)
        query = urlencode(
            [
                ("response-content-disposition", disposition),
                ("Expires", str(expires)),
                ("Signature", self._signature(path, disposition, expires)),
                ("Key-Pair-Id", "KFAKEHUB0000000"),
            ]
        )
        return f"{self.cdn_endpoint}{path}?{query}"

    def _cdn(self, handler: _Handler) -> _Reply:
        url = urlsplit(handler.path)
        query = parse_qs(url.query, keep_blank_values=True)
        parts = url.path.split("/")[1:]

        def refuse(status: int, code: str, message: str) -> _Reply:
            body = f"<?xml version='1.0' encoding='UTF-8'?>\n<Error><Code>{code}</Code><Message>{message}</Message>"
            body += "</Error>"
            return _Reply(status, {"Content-Type": "application/xml"}, body.encode())

        disposition = query.get("response-content-disposition", [""])[0]
        expires, signature = query.get("Expires", [""])[0], query.get("Signature", [""])[0]
        if not expires.isdigit() or not hmac.compare_digest(
            signature, self._signature(url.path, disposition, int(expires))
        ):
            return refuse(403, "AccessDenied", "Access denied")
        if int(expires) < time.time():
            return refuse(403, "AccessDenied", "Request has expired")
        repo = self._cdn_repos.get(parts[1]) if len(parts) == 3 and parts[0] == "repos" else None
        blob = repo.blobs.get(parts[2]) if repo is not None else None
        if repo is None or blob is None:
            return refuse(404, "NoSuchKey", "The specified key does not exist.")
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{blob.cdn_etag}"',
            "Last-Modified": formatdate(repo.created, usegmt=True),
            **({"Content-Disposition": disposition} if disposition else {}),
        }
        return self._content(handler, repo, blob, headers, blob.cdn_etag)


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    """A started FakeHub, closed after the test."""
    server = FakeHub()
    yield server
    server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve a local directory as a Hugging Face Hub repo on loopback.")
    parser.add_argument("--repo", required=True, help="namespace/name")
    parser.add_argument("--dir", required=True, type=Path, help="the repo's files")
    parser.add_argument("--rate", type=int, default=None, help="bytes/s per connection for file bodies")
    parser.add_argument("--repo-type", default="model", choices=("model", "dataset"))
    parser.add_argument("--token", default=None, help="make the repo private, readable with this token")
    args = parser.parse_args(argv)
    server = FakeHub(token=args.token)
    server.record = False  # a benchmark's thousands of requests need not be kept
    server.rate_limit(args.rate)
    commit = server.add_repo_dir(args.repo, args.dir, repo_type=args.repo_type, private=args.token is not None)
    print(json.dumps({"endpoint": server.endpoint, "cdn_endpoint": server.cdn_endpoint, "commit": commit}), flush=True)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
