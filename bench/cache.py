"""Node cache rows of the benchmark (issue 13): fetchers of one node sharing ``--cache-dir``.

fetcher against itself, on two artifacts, each from a loopback origin that counts the bytes it sends:

- the hub rows, on the fake hub of bench/dirs.py (tests/fakehub.py, run by bench/counting_hub.py),
  with dirs.py's tree (~805 MB: 4 shards of ~200 MB and 10 small files), as ``hf://org/model``;
- the archive rows, on bench.py's ``model.tar.gz`` (~741 MB, unpacking to ~800 MB), served by nginx
  as bench.py serves it (sendfile, Range), its access log counting each response's bytes, and fetched
  as ``--source ORIGIN/model.tar.gz --sha256 ...``: fetcher keeps what it unpacked to.

The rows:

- ``concurrent`` and ``archive-concurrent``: 8 fetchers started at once on one empty cache, each into
  its own dest, against one fetcher on an empty cache: the origin must send the bytes of one download,
  and the slowest of the 8 finish within 1.3x of the one; ``--rows nocache`` adds, for context, 8
  fetchers of the tree at once without a cache (~6.5 GB written a run);
- ``hit`` and ``archive-hit``: one fetcher into a fresh dest when the cache holds every file (or the
  archive's unpacked tree; hard-linked, same filesystem) against one on an empty cache: under 0.1x;
  for context, a hit with ``--cache-verify full`` and a download without ``--cache-dir``.

Run ``bench/run --help`` once first (it makes the tools and runtime venvs), then
``bench/.cache/venvs/tools/bin/python bench/cache.py [--pairs N] [--quick] [--rows ...]``.
Helpers (timing, the fetcher snapshot, the data, nginx, the tree, cleaning and checking a dest) come
from bench.py and dirs.py; see bench/README.md.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dirs as D  # bench/dirs.py: the tree, the bench class that cleans and checks a dest, /proc CPU seconds

import bench as B  # bench/bench.py: this script's directory is first on sys.path

HERE, CACHE, VENVS = B.HERE, B.CACHE, B.VENVS
CONCURRENT = 8  # fetchers started at once: the row
ARCHIVE = "model.tar.gz"  # bench.py's archive: model/{config.json, tokenizer.json, model.safetensors}
HUB_ROWS, ARCHIVE_ROWS = ("concurrent", "hit", "nocache"), ("archive-concurrent", "archive-hit")
DEFAULT_ROWS = "concurrent,hit,archive-concurrent,archive-hit"


# --- the origins ---------------------------------------------------------------------------------


class CountingHub(D.Hub):
    """bench/counting_hub.py in a process of its own: dirs.py's fake hub, asked on stdin what it has sent."""

    def __init__(
        self, root: Path, rate: int | None, logfile: Path
    ) -> None:  # not dirs.Hub's: another script, a pipe in
        cmd = [str(VENVS / "tools" / "bin" / "python"), str(HERE / "counting_hub.py"), "--repo", D.HF_REPO]
        cmd += ["--dir", str(root), *(["--rate", str(rate)] if rate else [])]
        self.rate = rate
        self._err = logfile.open("w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True)
        assert self.proc.stdout
        line = self.proc.stdout.readline()  # after it has hashed every file: can take seconds
        if not line:
            raise RuntimeError(f"counting_hub did not start: {B.tail(logfile)}")
        info = json.loads(line)
        self.endpoint, self.cdn, self.commit = info["endpoint"], info["cdn_endpoint"], info["commit"]

    def stats(self) -> dict[str, Any]:
        assert self.proc.stdout and self.proc.stdin
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return dict(json.loads(self.proc.stdout.readline()))

    def cpu(self) -> float:
        return D.cpu_seconds(self.proc.pid)


class CountingNginx(B.Nginx):
    """bench.py's nginx (its config, sendfile, Range), its access log adding each response's ``$bytes_sent``.

    stats() reads the whole log into counting_hub's shape: bytes written to clients (``$bytes_sent``:
    status line, headers and body), each served file's body bytes (``$body_bytes_sent``, what left
    nginx, a body a client dropped half way included) and how many GETs began at its first byte.
    """

    LINE = re.compile(r'\S+ (\d+) (\d+) (\d+) "(\S+) (\S+)[^"]*" "([^"]*)" \S+ (\d+)$')

    def __init__(self, root: Path, served: dict[str, dict[str, Any]]) -> None:
        conf = B.NGINX_CONF.replace(" $request_time'", " $request_time $bytes_sent'")
        if conf == B.NGINX_CONF:
            raise RuntimeError("bench.py's nginx log_format has changed: cannot add $bytes_sent to it")
        saved, B.NGINX_CONF = B.NGINX_CONF, conf
        try:
            super().__init__(root, "40m")  # its capped and TLS servers stay unused here
        finally:
            B.NGINX_CONF = saved
        self.served = served

    def stats(self) -> dict[str, Any]:
        size, still = -1, 0
        while still < 4:  # the log unchanged for 0.2 s: nginx logs a response a client dropped once it notices
            time.sleep(0.05)
            now = self.access_log.stat().st_size
            still, size = (still + 1 if now == size else 0), now
        out: dict[str, Any] = {"sent": {}, "content": {}, "starts": {}, "requests": {}, "ranged": 0}
        for line in self.access_log.read_text(errors="replace").splitlines():
            m = self.LINE.match(line)
            if not m or int(m.group(1)) != self.port:
                continue
            status, body, method, path, rng, wire = m.group(2, 3, 4, 5, 6, 7)
            path = path.split("?", 1)[0]
            out["sent"][f"nginx {path}"] = out["sent"].get(f"nginx {path}", 0) + int(wire)
            out["requests"][f"nginx {method} {path}"] = out["requests"].get(f"nginx {method} {path}", 0) + 1
            out["ranged"] += rng != "-"
            if (f := self.served.get(path.lstrip("/"))) is not None:
                sha = str(f["sha256"])
                out["content"][sha] = out["content"].get(sha, 0) + int(body)
                if method == "GET" and status in ("200", "206") and (rng == "-" or rng.startswith("bytes=0-")):
                    out["starts"][sha] = out["starts"].get(sha, 0) + 1
        return out

    def cpu(self) -> float:
        """nginx's master and its workers."""
        pid = self.proc.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return sum(D.cpu_seconds(p) for p in [pid, *map(int, children)])


Origin = CountingHub | CountingNginx


def sent_between(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What the origin sent between two of its counts: wire bytes, each file's content bytes, requests."""

    def diff(kind: str) -> dict[str, int]:
        return {k: v - before[kind].get(k, 0) for k, v in after[kind].items() if v != before[kind].get(k, 0)}

    return {
        "wire": sum(diff("sent").values()),
        "content": diff("content"),
        "starts": diff("starts"),
        "requests": sum(diff("requests").values()),
        "ranged": after["ranged"] - before["ranged"],
    }


# --- artifacts -----------------------------------------------------------------------------------


@dataclass
class Artifact:
    """What a row fetches: its source, what its origin serves for it, and what every dest must hold."""

    key: str  # "hub" or "archive"; the node cache holds one artifact at a time
    origin: Origin
    source: str
    options: list[str]  # fetcher options besides --source, --dest and the cache's
    env: dict[str, str]
    served: dict[str, dict[str, Any]]  # what the origin serves for it: name -> {"size", "sha256"}
    tree: D.Tree  # what each dest must hold, every file checked
    about: list[str]  # the report's lines on its origin and data
    env_note: str = ""  # how the commands in the report name its env

    @property
    def size(self) -> int:
        """Bytes of one download: what the origin serves for it."""
        return sum(int(f["size"]) for f in self.served.values())


def hub_artifact(hub: CountingHub, tree: D.Tree) -> Artifact:
    shards = [p for p in tree.files if p.endswith(".safetensors")]
    about = [
        "- hub rows' origin: tests/fakehub.py in its own process (hub API on 127.0.0.1, LFS files redirected to its CDN on "
        "127.0.0.2" + (f", --rate {hub.rate} bytes/s per connection" if hub.rate else ", unlimited") + "), run by "
        "bench/counting_hub.py, which counts every byte written to a client (status lines, headers, bodies) and each "
        "file's content bytes sent; on loopback",
        f"- hub rows' data: bench/dirs.py's tree, {tree.size / 1e6:.0f} MB: {len(shards)} shards of "
        f"{B.fmt(B.median([int(tree.files[p]['size']) / 1e6 for p in shards]), '.0f')} MB (fp16 values from N(0, 0.02)) and "
        f"{len(tree.files) - len(shards)} small files, as `hf://{D.HF_REPO}` (the branch main: every fetch resolves it, "
        "lists the tree); fetcher keys a file by the digest its source gives: the hub's sha256 for LFS files, its git "
        "blob id for the small ones",
    ]
    env = {"HF_ENDPOINT": hub.endpoint}
    return Artifact("hub", hub, f"hf://{D.HF_REPO}", [], env, tree.files, tree, about, "HF_ENDPOINT=HUB ")


def archive_members(data: B.Data) -> D.Tree:
    """The archive's regular files (path, size, sha256), read from it once and kept beside it (untimed)."""
    sha = data.sha(ARCHIVE)
    kept = data.root.parent / f"members-{sha[:16]}.json"
    with contextlib.suppress(OSError, ValueError):
        return D.Tree(data.root, kept, dict(json.loads(kept.read_text())))
    B.log(f"data: reading {ARCHIVE}'s members (once; kept in {kept})")
    files: dict[str, dict[str, Any]] = {}
    with tarfile.open(data.root / ARCHIVE, "r|gz") as tar:
        for member in tar:
            if member.isfile() and (f := tar.extractfile(member)) is not None:
                h = hashlib.sha256()
                while block := f.read(4 * B.MiB):
                    h.update(block)
                files[member.name] = {"size": member.size, "sha256": h.hexdigest()}
    kept.write_text(json.dumps(files, indent=1))
    return D.Tree(data.root, kept, files)


def archive_artifact(data: B.Data, members: D.Tree) -> Artifact:
    served = {ARCHIVE: data.files[ARCHIVE]}
    nginx = CountingNginx(data.root, served)
    with urllib.request.urlopen(f"{nginx.url}/{ARCHIVE}", timeout=10) as r:  # served, and the right size
        assert int(r.headers["Content-Length"]) == data.size(ARCHIVE)
    big = max(members.files.items(), key=lambda kv: int(kv[1]["size"]))
    about = [
        "- archive rows' origin: nginx as bench.py runs it (its config: sendfile, Range; in the foreground, as nobody "
        "when run as root), its access log adding `$bytes_sent` (status line, headers and body) to `$body_bytes_sent`; "
        "on loopback",
        f"- archive rows' data: bench.py's `{ARCHIVE}`, {data.size(ARCHIVE) / 1e6:.0f} MB (gzip -6), unpacking to "
        f"{members.size / 1e6:.0f} MB in {len(members.files)} files ({big[0]} {int(big[1]['size']) / 1e6:.0f} MB of "
        f"fp16 values from N(0, 0.02), {', '.join(p for p in members.files if p != big[0])}), fetched with `--sha256` "
        "(without it fetcher does not cache a file); fetcher keeps what it unpacked to: each file by its sha256, the "
        "listing under trees/",
    ]
    return Artifact(
        "archive", nginx, f"{nginx.url}/{ARCHIVE}", ["--sha256", data.sha(ARCHIVE)], {}, served, members, about
    )


# --- cases and rows --------------------------------------------------------------------------------


@dataclass
class Case:
    name: str  # shown in the tables
    fetchers: int  # started at once, each into its own dest
    cache: str  # before the run: "empty" (removed, untimed), "full" (every file in it), "none" (no --cache-dir)
    extra: tuple[str, ...] = ()  # fetcher options besides the cache's


@dataclass
class Target:
    ratio: float
    strict: bool = False  # "<" rather than "<="

    def met(self, ratio: float) -> bool:
        return ratio < self.ratio if self.strict else ratio <= self.ratio

    def __str__(self) -> str:
        return f"{'<' if self.strict else '<='} {self.ratio}x"


@dataclass
class Row:
    key: str
    title: str
    artifact: Artifact
    baseline: Case
    cases: list[tuple[Case, Target | None]]  # (case, target of its wall time / the baseline's, same round)
    runs: dict[str, list[B.Run]] = field(default_factory=dict)

    @property
    def all_cases(self) -> list[Case]:
        return [self.baseline] + [c for c, _ in self.cases]


def make_rows(wanted: list[str], artifacts: dict[str, Artifact]) -> list[Row]:
    empty = Case("1 fetcher, empty cache", 1, "empty")
    rows = []
    for art, prefix, what, full in (
        (artifacts.get("hub"), "", "hf:// tree", "the cache holds every file"),
        (artifacts.get("archive"), "archive-", "tar.gz archive", "the cache holds the archive's tree"),
    ):
        if art is None:
            continue
        if f"{prefix}concurrent" in wanted:
            rows.append(
                Row(
                    f"{prefix}concurrent",
                    f"{CONCURRENT} fetchers at once on one node, {what}",
                    art,
                    empty,
                    [(Case(f"{CONCURRENT} fetchers at once, one empty cache", CONCURRENT, "empty"), Target(1.3))],
                )
            )
        if f"{prefix}hit" in wanted:
            rows.append(
                Row(
                    f"{prefix}hit",
                    f"a cache hit, hard-linked into a fresh dest, {what}",
                    art,
                    empty,
                    [
                        (Case(f"hit: {full}", 1, "full"), Target(0.1, strict=True)),
                        (Case("hit, --cache-verify full", 1, "full", ("--cache-verify", "full")), None),
                        (Case("1 fetcher, no --cache-dir", 1, "none"), None),
                    ],
                )
            )
    if "nocache" in wanted:  # 8 copies of the tree a run: ~6.5 GB written, and the disk's writeback slows what follows
        rows.append(
            Row(
                "nocache",
                f"{CONCURRENT} fetchers at once without a cache (context), hf:// tree",
                artifacts["hub"],
                empty,
                [(Case(f"{CONCURRENT} fetchers at once, no --cache-dir", CONCURRENT, "none"), None)],
            )
        )
    return rows


# --- running ---------------------------------------------------------------------------------------


def timed_at_once(
    name: str, cmds: list[list[str]], env: dict[str, str], logs: list[Path], timeout: float
) -> list[B.Run]:
    """bench.timed for each command, all started at once (a thread each); each Run's wall is from the common start."""
    runs: list[B.Run | None] = [None] * len(cmds)
    starts = [0.0] * len(cmds)

    def go(i: int) -> None:
        starts[i], launched = time.perf_counter(), time.time()
        runs[i] = B.timed(name, cmds[i], env, logs[i], timeout)
        runs[i].extra["launched"] = launched  # type: ignore[union-attr]

    t0 = time.perf_counter()
    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(cmds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = [r for r in runs if r is not None]
    assert len(done) == len(cmds)
    for r, s in zip(done, starts, strict=True):
        r.extra["started_after"] = s - t0
        r.wall += s - t0
    return done


@contextlib.contextmanager
def hashing_each_inode_once() -> Iterator[None]:
    """dirs.py's check hashes every file of every dest: dests hard-linked to one cache share inodes, hash each once."""
    plain = B.sha256_file
    seen: dict[tuple[int, ...], str] = {}

    def sha256_file(path: Path) -> str:
        st = os.stat(path)
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if key not in seen:
            seen[key] = plain(path)
        return seen[key]

    B.sha256_file = sha256_file
    try:
        yield
    finally:
        B.sha256_file = plain


@dataclass
class FetcherLog:
    """What one fetcher's JSON log says: how often each event came, its warnings and errors, when it logged."""

    events: collections.Counter[str] = field(default_factory=collections.Counter)
    problems: list[str] = field(default_factory=list)
    first: float | None = None  # time.time() of its first line and its last
    last: float | None = None
    fetched: int = 0  # files it downloaded itself (its "published" line), not placed from the cache; 1: the archive

    @classmethod
    def read(cls, logfile: Path) -> FetcherLog:
        out = cls()
        for line in logfile.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            with contextlib.suppress(ValueError, TypeError, KeyError):
                ev = json.loads(line)
                name = str(ev.get("event", "?"))
                out.events[name] += 1
                if name == "published":  # a tree's counts its files; an archive's names its transfer, "cache" on a hit
                    out.fetched = int(ev.get("fetched") or 0) if "fetched" in ev else int(ev.get("transfer") != "cache")
                if ev.get("level") in ("warning", "error", "critical"):
                    out.problems.append(f"{ev['level']}: {name}" + (f" ({ev['reason']})" if "reason" in ev else ""))
                when = datetime.datetime.fromisoformat(str(ev["timestamp"]).replace("Z", "+00:00")).timestamp()
                out.first = when if out.first is None else out.first
                out.last = when
        return out


class CacheBench(D.DirBench):
    """dirs.py's bench (cleaning and checking a dest), with a node cache on the dests' filesystem."""

    LOG_PREFIX = "cache-"
    ALLOWED_EXTRA = (".fetcher",)  # type: ignore[assignment]

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.cache_state = "unknown"
        self.populations = 0

    @property
    def node_cache(self) -> Path:
        return self.workdir / "node-cache"

    def fetcher_cmd_for(self, case: Case, art: Artifact) -> D.TreeTool:
        extra = ["--cache-dir", str(self.node_cache)] if case.cache != "none" else []
        return D.fetcher_tool(self, art.source, [*art.options, *extra, *case.extra], art.env)

    def empty_cache(self) -> None:
        shutil.rmtree(self.node_cache, ignore_errors=True)
        self.node_cache.mkdir()  # as a hostPath of type DirectoryOrCreate leaves it
        subprocess.run(["sync"], check=False)
        self.cache_state = "empty"

    def prepare(self, case: Case, art: Artifact) -> None:
        """The cache as the case needs it, untimed: removed and made again, or filled by one fetcher of art
        (a cache that holds the other artifact is emptied first)."""
        full = f"full {art.key}"
        if case.cache == "empty" or (case.cache == "full" and self.cache_state != full):
            self.empty_cache()
        if case.cache == "full" and self.cache_state != full:
            self.populations += 1
            dest = self.fresh_dest("fill-cache")
            tool = self.fetcher_cmd_for(Case("fill the cache", 1, "empty"), art)
            run = B.timed("fill", tool.cmd(dest), tool.env, self.logdir / f"{dest.name}.log", self.args.timeout)
            why = self.check_tree(dest, art.tree) if run.ok else run.note
            self.clean_tree(dest)
            if why:
                raise RuntimeError(f"filling the cache failed: {why}")
            self.cache_state = full

    def cache_inodes(self) -> set[tuple[int, int]]:
        found = set()
        for p in (self.node_cache / "blobs").rglob("*"):
            with contextlib.suppress(OSError):
                st = p.lstat()
                if p.is_file():
                    found.add((st.st_dev, st.st_ino))
        return found

    def cache_report(self) -> dict[str, object]:
        """What the cache holds after a run: blobs by the digest that names them, their bytes, any writable;
        the listings of unpacked archives under trees/."""
        blobs = [p for p in (self.node_cache / "blobs").rglob("*") if p.is_file()]
        return {
            "blobs": dict(collections.Counter(p.parent.name for p in blobs)),
            "blob_bytes": sum(p.stat().st_size for p in blobs),
            "writable_blobs": sum(1 for p in blobs if p.stat().st_mode & 0o222),
            "trees": len(list((self.node_cache / "trees").glob("*.json"))),
        }

    def one_case(self, row: Row, case: Case) -> B.Run:
        art, tree = row.artifact, row.artifact.tree
        self.prepare(case, art)
        tool = self.fetcher_cmd_for(case, art)
        label = f"{row.key}-{case.cache}-{case.fetchers}"
        dests = [self.fresh_dest(f"{label}-{i}" if case.fetchers > 1 else label) for i in range(case.fetchers)]
        logs = [self.logdir / f"{d.name}.log" for d in dests]
        origin_cpu = art.origin.cpu()
        before = art.origin.stats()
        runs = timed_at_once(case.name, [tool.cmd(d) for d in dests], tool.env, logs, self.args.timeout)
        sent = sent_between(before, art.origin.stats())
        ok = [r for r in runs if r.ok]
        spread = max(float(r.extra["started_after"]) for r in runs)  # type: ignore[arg-type]
        run = B.Run(
            case.name,
            len(ok) == len(runs),
            max(r.wall for r in runs),
            max((r.rss_mib or 0 for r in runs), default=None),
            sum(r.cpu or 0 for r in runs),
        )
        run.extra = {
            "origin_cpu": art.origin.cpu() - origin_cpu,
            "walls": [round(r.wall, 3) for r in runs],
            "start_spread": spread,
            "wire_bytes": sent["wire"],
            "requests": sent["requests"],
            "ranged": sent["ranged"],
            "times_sent": {  # a served file's content bytes sent / its size: over 1 where ranged parts overlap its first stream
                path: round(sent["content"].get(str(f["sha256"]), 0) / int(f["size"]), 3) if int(f["size"]) else 0
                for path, f in art.served.items()
            },
            "downloads": {path: sent["starts"].get(str(f["sha256"]), 0) for path, f in art.served.items()},
        }
        events: collections.Counter[str] = collections.Counter()
        problems: list[str] = []
        waited, startup, span, fetched = 0, [], [], []
        for r, logfile in zip(runs, logs, strict=True):
            flog = FetcherLog.read(logfile)
            events += flog.events
            problems += flog.problems
            waited += flog.events["waiting for"] > 0
            fetched += [flog.fetched] if flog.fetched else []
            if flog.first is not None and flog.last is not None:
                startup.append(round(flog.first - float(r.extra["launched"]), 3))  # type: ignore[arg-type]
                span.append(round(flog.last - flog.first, 3))
        run.extra.update(
            events=dict(events),
            problems=sorted(set(problems)),
            waited=waited,
            splits=events["splitting"],
            startup=startup,  # each fetcher's launch to its first log line: the interpreter and imports
            span=span,  # its first log line to its last: the work
            fetched_by="+".join(map(str, sorted(fetched, reverse=True))) or "0",  # files each downloader fetched
        )
        notes = [f"fetcher {i + 1}: {r.note} :: {B.tail(logs[i], 3)[-300:]}" for i, r in enumerate(runs) if not r.ok]
        if run.ok:
            inodes = self.cache_inodes() if case.cache != "none" else set()
            not_linked: collections.Counter[str] = collections.Counter()  # a dest file -> dests where it is no link
            with hashing_each_inode_once():
                for dest in dests:
                    if why := self.check_tree(dest, tree):
                        notes.append(f"{dest.name}: {why}")
                    for path in tree.files:
                        with contextlib.suppress(OSError):
                            st = (dest / path).stat()
                            not_linked[path] += (st.st_dev, st.st_ino) not in inodes
            every = len(tree.files) * len(dests)
            run.extra["linked"] = f"{every - sum(not_linked.values())}/{every}"
            run.extra["not_linked"] = {p: n for p, n in sorted(not_linked.items()) if n}
            if case.cache != "none":
                run.extra["cache"] = self.cache_report()
        if notes:
            run.ok, run.note = False, "; ".join(notes)
        if case.cache != "none":
            self.cache_state = f"full {art.key}" if run.ok else "unknown"
        walls = sorted(r.wall for r in runs)
        B.log(
            f"  {row.key:10} {case.name:42} {run.wall:7.2f}s"
            + (f" (fastest {walls[0]:.2f}s, start spread {spread * 1000:.0f} ms)" if len(runs) > 1 else "")
            + f"  rss {run.rss_mib or 0:4.0f} MiB  cpu {run.cpu or 0:6.2f}s  origin sent {sent['wire'] / 1e6:7.1f} MB "
            f"({sent['wire'] / art.size:.2f}x) in {sent['requests']} requests  waited {waited}"
            + (f"  linked {run.extra['linked']}" if "linked" in run.extra else "")
            + f"  {'ok' if run.ok else 'FAILED ' + run.note}"
        )
        for d in dests:
            self.clean_tree(d)
        return run

    def profile_case(self, row: Row, case: Case) -> str:
        """dirs.py's py-spy of one fetcher run (twice: raw, then a flamegraph), with the cache as the case wants it."""
        self.prepare(case, row.artifact)  # a hit stays one: the first run leaves the cache full
        tool = self.fetcher_cmd_for(case, row.artifact)
        return self.profile_tree(D.Row(row.key, row.title, tool, [], row.artifact.origin.proc.pid))

    def run_cache_row(self, row: Row) -> None:
        cases = row.all_cases
        B.log(f"row {row.key}: {row.title}, {self.args.pairs} round(s): {', '.join(c.name for c in cases)}")
        row.runs = {c.name: [] for c in cases}
        for r in range(self.args.pairs):
            for c in cases if r % 2 == 0 else list(reversed(cases)):  # A B C, then C B A: drift hits all alike
                row.runs[c.name].append(self.one_case(row, c))


# --- reporting -------------------------------------------------------------------------------------


def ratios(row: Row, case: Case, key: str = "wall") -> list[float]:
    """Per round, the case's wall time (or cpu, or extra[key]) over the baseline's, where both ran ok."""

    def value(r: B.Run) -> float:
        return float(getattr(r, key) if key in ("wall", "cpu") else r.extra[key] or 0)  # type: ignore[arg-type]

    out = []
    for c, b in zip(row.runs[case.name], row.runs[row.baseline.name], strict=True):
        if c.ok and b.ok and value(b):
            out.append(value(c) / value(b))
    return out


def each(runs: list[B.Run], key: str) -> list[float]:
    """extra[key] of every fetcher of the runs: a list per run (walls, startup, span)."""
    return [float(x) for r in runs for x in r.extra.get(key, [])]  # type: ignore[attr-defined]


def times(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}x"


def oddities(rows: list[Row]) -> list[str]:
    """What fetcher did that a reader should know: files sent twice, hits that downloaded, copies, warnings."""
    notes = []
    for row in rows:
        art, tree = row.artifact, row.artifact.tree
        contents = {str(f["sha256"]): int(f["size"]) for f in tree.files.values()}  # a blob per distinct content
        for case in row.all_cases:
            for i, run in enumerate(row.runs[case.name]):
                where = f"{row.key}, {case.name}, round {i + 1}"
                times = run.extra.get("times_sent", {})
                assert isinstance(times, dict)
                downloads = run.extra.get("downloads", {})
                assert isinstance(downloads, dict)
                if case.cache == "empty" and (again := {p: n for p, n in downloads.items() if n != 1}):
                    notes.append(
                        f"{where}: files not downloaded exactly once (bodies from byte 0): "
                        + ", ".join(f"{p} {n}" for p, n in sorted(again.items()))
                    )
                if case.cache != "full" and (
                    over := {p: t for p, t in times.items() if t > 1.01 * downloads.get(p, 1)}
                ):
                    notes.append(
                        f"{where}: content sent beyond the downloads' size (ranged parts overlapping a first stream "
                        "cut after fetcher split the file): "
                        + ", ".join(f"{p} {t:.2f}x in {downloads.get(p)} download(s)" for p, t in sorted(over.items()))
                    )
                if case.cache == "full" and (
                    got := sum(float(t) * int(art.served[p]["size"]) for p, t in times.items())
                ):
                    notes.append(f"{where}: a hit, yet the origin sent {got / 1e6:.1f} MB of file content")
                linked = str(run.extra.get("linked", ""))
                if case.cache != "none" and linked and linked.split("/")[0] != linked.split("/")[1]:
                    apart = run.extra.get("not_linked", {})
                    assert isinstance(apart, dict)
                    notes.append(
                        f"{where}: only {linked} files of the dests are hard links of the cache's; not linked: "
                        + ", ".join(f"{p} (in {n} dest(s))" for p, n in apart.items())
                    )
                cache = run.extra.get("cache")
                if isinstance(cache, dict) and cache.get("writable_blobs"):
                    notes.append(f"{where}: {cache['writable_blobs']} blobs in the cache are writable")
                if isinstance(cache, dict) and (
                    cache["blob_bytes"] != sum(contents.values()) or sum(cache["blobs"].values()) != len(contents)
                ):
                    notes.append(
                        f"{where}: the cache holds {cache['blob_bytes']} bytes in {cache['blobs']} blobs, the tree "
                        f"{sum(contents.values())} in {len(contents)} distinct files"
                    )
                if isinstance(cache, dict) and cache.get("trees") != (1 if art.key == "archive" else 0):
                    notes.append(f"{where}: the cache holds {cache.get('trees')} listing(s) under trees/")
                for p in run.extra.get("problems", []):  # type: ignore[attr-defined]
                    notes.append(f"{where}: {B.cell(str(p))}")
    return notes


def report(
    bench: CacheBench,
    rows: list[Row],
    profiles: dict[str, str],
    cmd_lines: list[str],
    elapsed: float,
) -> str:
    args = bench.args
    main_rows = [
        "| row | case | baseline median s | case median s | ratio (median of rounds) | ratio, rounds the baseline ran first / last "
        "| CPU s ratio, all fetchers (median of rounds) | origin sent / artifact (median) "
        "| origin sent / one fetch's (median of rounds) | fetcher peak RSS MiB | target | met? |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---|---|",
    ]
    details = [
        "| row | case | runs ok | median s (slowest fetcher) | min s | max s | median s, all fetchers | median CPU s, all fetchers "
        "| median s from launch to fetcher's first log line, all fetchers | median s from its first log line to its last "
        "| median origin CPU s | median origin MB sent | median requests (ranged) | fetchers that logged waiting (median) "
        "| files fetched by each fetcher that fetched any, every round | dest files hard-linked to the cache | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---|---:|",
    ]
    rounds = [
        "| row | round | wall s of each case, in the order run (slowest fetcher; all of them) |",
        "|---|---:|---|",
    ]
    for row in rows:
        base = row.runs[row.baseline.name]
        for case, target in row.cases:
            runs = row.runs[case.name]
            ok = [r for r in runs if r.ok]
            rs = ratios(row, case)
            ratio = B.median(rs)
            # rounds 1, 3, ... run the baseline first, 2, 4, ... last
            by_order = [B.median([x for i, x in enumerate(rs) if i % 2 == k]) for k in (0, 1)]
            rss = max((r.rss_mib or 0 for r in ok), default=None)
            bytes_art = B.median([float(r.extra["wire_bytes"]) / row.artifact.size for r in ok])  # type: ignore[arg-type]
            bytes_one = B.median(ratios(row, case, "wire_bytes"))
            mets = []
            if target is not None and ratio is not None:
                mets.append(("yes" if target.met(ratio) else "**no**") + f" ({ratio:.2f} vs {target})")
            if case.cache == "empty" and case.fetchers > 1 and bytes_one is not None:
                once = all(n == 1 for r in ok for n in r.extra["downloads"].values())  # type: ignore[attr-defined]
                mets.append(
                    f"one download {'yes' if once else '**no**'} (each file's body from byte 0 sent "
                    f"{'once' if once else 'more than once, or never'}; bytes {bytes_one:.2f}x one fetch's)"
                )
            if rss is not None:
                mets.append(f"RSS {'yes' if rss <= args.rss_target else '**no**'}")
            failed = len(runs) - len(ok), len([b for b in base if not b.ok])
            if any(failed):
                mets.append(f"FAILED runs: case {failed[0]}, baseline {failed[1]}")
            main_rows.append(
                f"| {row.title} | {B.cell(case.name)} | {B.fmt(B.median([b.wall for b in base if b.ok]))} | "
                f"{B.fmt(B.median([r.wall for r in ok]))} | {times(ratio)} | {times(by_order[0])} / {times(by_order[1])} | "
                f"{times(B.median(ratios(row, case, 'cpu')))} | {times(bytes_art)} | {times(bytes_one)} | {B.fmt(rss, '.0f')} | "
                f"{str(target) if target else '— (context)'}, RSS <= {args.rss_target:.0f} MiB | {'; '.join(mets) or '—'} |"
            )
        for case in row.all_cases:
            runs = row.runs[case.name]
            ok = [r for r in runs if r.ok]
            walls = [r.wall for r in ok]
            every = each(ok, "walls")
            details.append(
                f"| {row.key} | {B.cell(case.name)} | {len(ok)}/{len(runs)} | {B.fmt(B.median(walls))} | "
                f"{B.fmt(min(walls) if walls else None)} | {B.fmt(max(walls) if walls else None)} | {B.fmt(B.median(every))} | "
                f"{B.fmt(B.median([r.cpu for r in ok if r.cpu is not None]))} | "
                f"{B.fmt(B.median(each(ok, 'startup')))} | {B.fmt(B.median(each(ok, 'span')))} | "
                f"{B.fmt(B.median([float(r.extra['origin_cpu']) for r in ok]))} | "  # type: ignore[arg-type]
                f"{B.fmt(B.median([float(r.extra['wire_bytes']) / 1e6 for r in ok]), '.1f')} | "  # type: ignore[arg-type]
                f"{B.fmt(B.median([float(r.extra['requests']) for r in ok]), '.0f')} "  # type: ignore[arg-type]
                f"({B.fmt(B.median([float(r.extra['ranged']) for r in ok]), '.0f')}) | "  # type: ignore[arg-type]
                f"{B.fmt(B.median([float(r.extra['waited']) for r in ok]), '.0f') if case.fetchers > 1 else '—'} | "  # type: ignore[arg-type]
                f"{'; '.join(str(r.extra['fetched_by']) for r in runs)} | "
                f"{', '.join(sorted({str(r.extra.get('linked', '?')) for r in ok})) if case.cache != 'none' else '—'} | "
                f"{B.fmt(max((r.rss_mib or 0 for r in ok), default=None), '.0f')} |"
            )
        names = [c.name for c in row.all_cases]
        for r in range(args.pairs):
            order = names if r % 2 == 0 else list(reversed(names))
            cells = []
            for n in order:
                run = row.runs[n][r]
                fetchers = run.extra["walls"]
                assert isinstance(fetchers, list)
                cells.append(
                    f"{n} {run.wall:.2f}{'' if run.ok else ' FAILED'}"
                    + (f" ({' '.join(f'{w:.2f}' for w in sorted(fetchers))})" if len(fetchers) > 1 else "")
                )
            rounds.append(f"| {row.key} | {r + 1} | {B.cell(', '.join(cells))} |")
    failures = [
        f"- {row.key}, {name}, round {i + 1}: {B.cell(r.note)}"
        for row in rows
        for name, rs in row.runs.items()
        for i, r in enumerate(rs)
        if not r.ok
    ]
    odd = oddities(rows)
    events = collections.Counter[str]()
    for row in rows:
        for case in row.all_cases:
            for run in row.runs[case.name]:
                for k, v in run.extra.get("events", {}).items():  # type: ignore[attr-defined]
                    events[f"{row.artifact.key}, {case.name}: {k}"] += v
    fs = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE,OPTIONS", "--target", str(bench.workdir)], capture_output=True, text=True
    ).stdout.strip()
    arts = list({row.artifact.key: row.artifact for row in rows}.values())
    layouts = []  # what the cache held after one download of each artifact
    for art in arts:
        held = next(
            (
                r.extra["cache"]
                for row in rows
                if row.artifact is art
                for r in row.runs[row.baseline.name]
                if r.ok and isinstance(r.extra.get("cache"), dict)
            ),
            None,
        )
        if isinstance(held, dict):
            blobs = ", ".join(f"{n} blobs under blobs/{k}/" for k, n in sorted(held["blobs"].items()))
            layouts.append(f"for the {art.key} rows, {blobs} and {held['trees']} listing(s) under trees/")
    text = [
        f"# fetcher benchmark: node cache{' (--quick)' if args.quick else ''}",
        "",
        f"Generated by `bench/.cache/venvs/tools/bin/python bench/cache.py{(' ' + shlex.join(args.argv)) if args.argv else ''}`; "
        f"took {elapsed / 60:.1f} min.",
        "",
        *D.machine(bench),
        *[line for art in arts for line in art.about],
        f"- the node cache: `--cache-dir {bench.node_cache.relative_to(CACHE)}` under bench/.cache, on the dests' filesystem "
        f"({fs or '?'}), so files are hard-linked into dest. It holds one artifact at a time: an empty cache is removed and "
        "made again before the case (untimed, then `sync`); a full one was filled by one fetcher into a dest removed "
        "afterwards (untimed), or is what the previous case left; filled that way "
        f"{bench.populations} time(s) in this run. After one download the cache held: "
        + ("; ".join(layouts) or "?")
        + ".",
        f"- method: {args.pairs} round(s) per row, the cases alternating (A B C, then C B A); ratio = median over rounds of "
        "the case's wall time / the baseline's in the same round. A case of N fetchers starts them at once (a thread each, "
        "every one under `/usr/bin/time -v`), each into its own fresh dest; its wall time is the slowest's, from the first "
        "start. Dests are on the cache's filesystem and removed afterwards, then `sync` (untimed). The page cache is not "
        "dropped: the origin reads its files from RAM, and the untimed check of one case's output reads the cache's blobs "
        "(the same inodes) into RAM before the next case, which matters only to `--cache-verify full`. CPU seconds "
        "(user+sys, summed over the case's fetchers) and peak RSS (the largest fetcher's) from `/usr/bin/time -v`; origin "
        "CPU: the hub's process, or nginx's master and workers, from /proc. Origin sent: every byte the origin wrote to "
        "clients during the case (headers included), against the artifact's size (the archive's, not what it unpacks to) "
        "and against the baseline's bytes in the same round. Files fetched by each fetcher: for the archive, 1 for each "
        "fetcher that downloaded it. "
        + (
            "Every file of every dest is checked (size and sha256, untimed; an inode shared by several dests is hashed "
            "once), and nothing else may be in dest but `.fetcher/`."
            if args.verify_output
            else "Outputs are checked by size only (--no-verify-output)."
        ),
        (
            f"- fetcher runs with `{args.fetcher_args}` added"
            if args.fetcher_args
            else "- fetcher runs with its defaults"
        )
        + ", from a snapshot of fetcher/ in venvs/runtime.",
        "",
        *main_rows,
        "",
        "Per case:",
        "",
        *details,
        "",
        "Every round:",
        "",
        *rounds,
    ]
    if failures:
        text += ["", "Failed runs:", "", *failures]
    text += [
        "",
        "What fetcher did that is worth a look (files sent twice, hits that downloaded, copies, warnings):",
        "",
    ]
    text += [f"- {n}" for n in odd] or ["- nothing"]
    text += [
        "",
        "fetcher's log events, summed over every run of a case (JSON `event`):",
        "",
        *[f"- {B.cell(k)}: {v}" for k, v in sorted(events.items())],
        "",
        "Commands (DEST a fresh directory per fetcher, HUB the fake hub, ORIGIN nginx, CACHE the node cache):",
        "",
        *[f"- {ln}" for ln in cmd_lines],
    ]
    for key, profile in profiles.items():
        text += ["", f"Profile of one cache hit, row {key}:", "", "```", profile, "```"]
    return "\n".join(text) + "\n"


# --- main --------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(
        prog="bench/cache.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    D.add_tree_options(ap, "cache", DEFAULT_ROWS)
    for action in ap._actions:  # dirs.py's options, but this script's rows and profile
        if action.dest == "rows":
            action.help = (
                f"comma-separated subset of {','.join(HUB_ROWS + ARCHIVE_ROWS)} (default: {DEFAULT_ROWS}; nocache writes "
                "8 copies of the hub's tree a run, ~6.5 GB, for context)"
            )
        elif action.dest == "profile":
            action.help = "also py-spy one cache hit (rows hit and archive-hit)"
        elif action.dest == "tensors":
            action.help = f"the hub rows: {action.help}"
        elif action.dest == "quick":
            action.help = "1 tensor (32 MiB) per shard, a ~100 MB archive, 1 round: a smoke test"
    ap.add_argument("--rate", type=int, help="bytes/s per connection of the hub (default: unlimited)")
    ap.add_argument(
        "--size-mb",
        type=int,
        help="the archive rows: size of bench.py's weights file, which model.tar.gz holds (default 800, 100 with --quick)",
    )
    args, tensors, rows_wanted, out_path = D.parse_tree_options(ap, "cache")
    if unknown := sorted(set(rows_wanted) - set(HUB_ROWS) - set(ARCHIVE_ROWS)):
        ap.error(f"--rows: unknown {','.join(unknown)}")
    # bench.Bench and bench.machine read these (their single-file options): fetcher runs with its own defaults here.
    args.concurrency, args.part_size, args.limit_rate = 16, "8Mi", "none"
    started = time.monotonic()
    if not args.no_setup:
        D.setup_servers()  # bench/run's venvs and pytest for the fake hub: no alternatives to install
    bench = CacheBench(args)
    if any(r in HUB_ROWS for r in rows_wanted):
        tree: D.Tree | None = D.prepare(bench, "work-cache", tensors)
    else:  # dirs.prepare without the hub's tree: a fresh workdir for the dests, the fetcher snapshot
        tree = None
        bench.workdir = CACHE / "work-cache"
        shutil.rmtree(bench.workdir, ignore_errors=True)
        bench.workdir.mkdir(parents=True)
        os.chdir(bench.workdir)
        bench.snapshot_fetcher()
    if "--cache-dir" not in bench.fetcher_help:
        raise SystemExit("this fetcher has no --cache-dir (issue 13)")
    hubs: list[D.Hub] = []
    artifacts: dict[str, Artifact] = {}
    try:
        if tree is not None:
            hub = CountingHub(tree.root, args.rate, bench.logdir / "hub.log")
            hubs.append(hub)
            B.log(f"fake hub: {hub.endpoint} (CDN {hub.cdn}), commit {hub.commit}")
            artifacts["hub"] = hub_artifact(hub, tree)
        if any(r in ARCHIVE_ROWS for r in rows_wanted):
            data = B.generate(args.size_mb or (100 if args.quick else 800))
            members = archive_members(data)
            with (data.root / ARCHIVE).open("rb") as f:  # into the page cache before anything is timed
                while f.read(16 * B.MiB):
                    pass
            artifacts["archive"] = archive_artifact(data, members)
            B.log(f"nginx: {artifacts['archive'].source}")
        rows = make_rows(rows_wanted, artifacts)
        cmd_lines = []
        for row in rows:
            for case in row.all_cases:
                line = shlex.join(bench.fetcher_cmd_for(case, row.artifact).cmd(Path("DEST")))
                line = line.replace(str(B.FETCHER_PY) + " -m fetcher", "fetcher").replace(
                    str(bench.node_cache), "CACHE"
                )
                if isinstance(row.artifact.origin, CountingNginx):
                    line = line.replace(row.artifact.origin.url, "ORIGIN")
                times = f"{case.fetchers} at once, each with its own DEST: " if case.fetchers > 1 else ""
                cmd_lines.append(f"{row.key}, {case.name}: {times}`{row.artifact.env_note}{line}`")
        for row in rows:
            bench.run_cache_row(row)
        profiles = {}
        for row in rows:
            if args.profile and row.key in ("hit", "archive-hit"):
                B.log(f"profile: one cache hit under py-spy, row {row.key}")
                profiles[row.key] = bench.profile_case(row, row.cases[0][0])
        text = report(bench, rows, profiles, cmd_lines, time.monotonic() - started)
        D.write_results(bench, rows, text, out_path)  # type: ignore[arg-type]  # it reads a row's key and runs
    finally:
        for art in artifacts.values():
            if isinstance(art.origin, CountingNginx):
                art.origin.stop()
        D.stop_servers(bench, hubs, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
