"""fetcher against what users would run instead, on loopback; see bench/README.md.

Run it through bench/run, which installs nginx, aria2c, GNU time and the venvs this needs.
Not part of the test suite: it takes minutes and its numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = Path(os.environ.get("BENCH_CACHE", HERE / ".cache")).resolve()
VENVS = CACHE / "venvs"
FETCHER_PY = VENVS / "runtime" / "bin" / "python"  # runtime dependencies only, as in the image
GEN_VERSION = 1
TENSOR_SHAPE = (4096, 4096)  # fp16: 32 MiB a tensor
MiB = 1024 * 1024
S3_BUCKET = "bench"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench-secret",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(cmd: list[str], **kw: object) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout  # type: ignore[call-overload,no-any-return]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(4 * MiB):
            h.update(block)
    return h.hexdigest()


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]i?)?B?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    unit = (m.group(2) or "").upper()
    mult = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    return int(m.group(1)) * mult[unit]


# --- data --------------------------------------------------------------------------------------


@dataclass
class Data:
    root: Path  # served by nginx: model.safetensors, model.tar.gz, model.tar.zst
    files: dict[str, dict[str, object]]  # name -> {"size", "sha256"}
    inner_sha256: str  # of model/model.safetensors inside the archives (== the raw file)
    inner_size: int

    def size(self, name: str) -> int:
        return int(self.files[name]["size"])  # type: ignore[call-overload]

    def sha(self, name: str) -> str:
        return str(self.files[name]["sha256"])


def generate(size_mb: int) -> Data:
    """Weight-like data: fp16 values from N(0, 0.02), which gzip shrinks by only ~8% (as real checkpoints)."""
    import numpy as np

    n_tensors = max(1, round(size_mb * 10**6 / (TENSOR_SHAPE[0] * TENSOR_SHAPE[1] * 2)))
    ddir = CACHE / "data" / f"{n_tensors}x32MiB"
    manifest_path = ddir / "manifest.json"
    params = {"gen_version": GEN_VERSION, "n_tensors": n_tensors, "shape": list(TENSOR_SHAPE), "dtype": "F16"}
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("params") == params and all((ddir / "www" / n).exists() for n in manifest["files"]):
            log(f"data: cached in {ddir}")
            return Data(ddir / "www", manifest["files"], manifest["inner_sha256"], manifest["inner_size"])
    log(f"data: generating {n_tensors} fp16 tensors of {TENSOR_SHAPE} in {ddir} (once; cached)")
    shutil.rmtree(ddir, ignore_errors=True)
    src = ddir / "src" / "model"
    www = ddir / "www"
    src.mkdir(parents=True)
    www.mkdir()
    tensor_bytes = TENSOR_SHAPE[0] * TENSOR_SHAPE[1] * 2
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    for i in range(n_tensors):
        header[f"model.layers.{i}.weight"] = {
            "dtype": "F16",
            "shape": list(TENSOR_SHAPE),
            "data_offsets": [i * tensor_bytes, (i + 1) * tensor_bytes],
        }
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-len(hjson) % 8)
    raw = src / "model.safetensors"
    rng = np.random.default_rng(20240601)
    with raw.open("wb") as f:
        f.write(len(hjson).to_bytes(8, "little"))
        f.write(hjson)
        for _ in range(n_tensors):
            f.write(rng.normal(0.0, 0.02, TENSOR_SHAPE).astype(np.float16).tobytes())
    (src / "config.json").write_text(
        json.dumps(
            {"architectures": ["BenchModel"], "torch_dtype": "float16", "num_hidden_layers": n_tensors}, indent=2
        )
    )
    (src / "tokenizer.json").write_text(json.dumps({"version": "1.0", "vocab": {f"t{i}": i for i in range(5000)}}))
    os.link(raw, www / "model.safetensors")
    tar = [
        "tar",
        "-C",
        str(ddir / "src"),
        "--sort=name",
        "--owner=0",
        "--group=0",
        "--numeric-owner",
        "--mtime=@0",
        "-cf",
        "-",
        "model",
    ]
    t0 = time.monotonic()
    with (www / "model.tar.gz.tmp").open("wb") as gz_out, (www / "model.tar.zst.tmp").open("wb") as zst_out:
        t1 = subprocess.Popen(tar, stdout=subprocess.PIPE)
        gz = subprocess.Popen(["gzip", "-6", "-n"], stdin=t1.stdout, stdout=gz_out)
        t2 = subprocess.Popen(tar, stdout=subprocess.PIPE)
        zst = subprocess.Popen(["zstd", "-q", "-3", "-c"], stdin=t2.stdout, stdout=zst_out)
        assert t1.stdout and t2.stdout
        t1.stdout.close()
        t2.stdout.close()
        for p in (t1, gz, t2, zst):
            if p.wait() != 0:
                raise RuntimeError(f"{p.args} failed")
    (www / "model.tar.gz.tmp").rename(www / "model.tar.gz")
    (www / "model.tar.zst.tmp").rename(www / "model.tar.zst")
    log(f"data: compressed in {time.monotonic() - t0:.0f}s")
    for p in [ddir, ddir / "src", src, www, *src.iterdir(), *www.iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)  # nginx runs as nobody
    files = {n: {"size": (www / n).stat().st_size, "sha256": sha256_file(www / n)} for n in sorted(os.listdir(www))}
    inner = str(files["model.safetensors"]["sha256"])
    manifest = {"params": params, "files": files, "inner_sha256": inner, "inner_size": raw.stat().st_size}
    manifest_path.write_text(json.dumps(manifest, indent=2))
    for n, f in files.items():
        log(f"data: {n} {int(f['size']) / 1e6:.1f} MB")  # type: ignore[call-overload]
    return Data(www, files, inner, raw.stat().st_size)


# --- servers -----------------------------------------------------------------------------------

NGINX_CONF = """\
worker_processes auto;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 512; }}
http {{
    types {{ application/gzip gz; application/zstd zst; application/json json; }}
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 30;
    log_format bench '$msec $server_port $status $body_bytes_sent "$request" "$http_range" $request_time';
    access_log {tmp}/access.log bench;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
    server {{
        listen 127.0.0.1:{capped_port};
        root {root};
        location / {{ limit_rate {rate}; }}
    }}
    server {{
        listen 127.0.0.1:{tls_port} ssl;
        ssl_certificate {tmp}/tls.pem;
        ssl_certificate_key {tmp}/tls.key;
        root {root};
        location / {{ }}
    }}
}}
"""


class Nginx:
    """nginx in the foreground, unprivileged (as nobody when we are root), with its own config."""

    def __init__(self, root: Path, rate: str) -> None:
        self.tmp = CACHE / "nginx"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.port, self.capped_port, self.tls_port = free_port(), free_port(), free_port()
        # A self-signed certificate for 127.0.0.1: clients trust it as their CA (fetcher via SSL_CERT_FILE).
        self.ca_file = self.tmp / "tls.pem"
        sh(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                str(self.tmp / "tls.key"),
                "-out",
                str(self.ca_file),
                "-days",
                "2",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ]
        )
        conf = NGINX_CONF.format(
            tmp=self.tmp, root=root, port=self.port, capped_port=self.capped_port, tls_port=self.tls_port, rate=rate
        )
        (self.tmp / "nginx.conf").write_text(conf)
        (self.tmp / "access.log").touch()
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        cmd = [
            nginx,
            "-p",
            str(self.tmp),
            "-e",
            str(self.tmp / "error.log"),
            "-c",
            str(self.tmp / "nginx.conf"),
            "-g",
            "daemon off;",
        ]
        if os.geteuid() == 0:
            for p in [self.tmp, *self.tmp.iterdir()]:
                os.chown(p, 65534, 65534)
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", *cmd]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        wait_port(self.port)
        wait_port(self.capped_port)
        wait_port(self.tls_port)
        self.url = f"http://127.0.0.1:{self.port}"
        self.capped_url = f"http://127.0.0.1:{self.capped_port}"
        self.tls_url = f"https://127.0.0.1:{self.tls_port}"

    @property
    def access_log(self) -> Path:
        return self.tmp / "access.log"

    def log_offset(self) -> int:
        return self.access_log.stat().st_size

    def requests_since(self, offset: int, port: int | None = None) -> list[dict[str, object]]:
        out = []
        with self.access_log.open("rb") as f:
            f.seek(offset)
            for line in f.read().decode(errors="replace").splitlines():
                m = re.match(r'(\S+) (\d+) (\d+) (\d+) "([^"]*)" "([^"]*)" (\S+)', line)
                if m and (port is None or int(m.group(2)) == port):
                    out.append(
                        {
                            "port": int(m.group(2)),
                            "status": int(m.group(3)),
                            "bytes": int(m.group(4)),
                            "request": m.group(5),
                            "range": m.group(6),
                        }
                    )
        return out

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGQUIT)  # graceful; the master waits for its workers
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Moto:
    """moto's S3 server (bench/moto_server.py) in its own process."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [str(VENVS / "tools" / "bin" / "python"), str(HERE / "moto_server.py"), str(self.port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("moto server did not start")
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {**S3_ENV, "AWS_ENDPOINT_URL": self.endpoint}

    def client(self) -> Any:
        """A boto3 S3 client of this server (boto3 lives in the tools venv only: imported here)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        )

    def upload(self, path: Path, key: str) -> None:
        from boto3.s3.transfer import TransferConfig

        s3 = self.client()
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
            s3.create_bucket(Bucket=S3_BUCKET)
        t0 = time.monotonic()
        s3.upload_file(str(path), S3_BUCKET, key, Config=TransferConfig(multipart_chunksize=64 * MiB))
        head = s3.head_object(Bucket=S3_BUCKET, Key=key)
        # Read back once, untimed: moto keeps an object in a temp file until its first GET, which
        # moto_server.py's patch then keeps in memory. Without this, the first tool of the first round
        # also timed moto reading the object from disk (~0.7 s of moto's CPU for the 807 MB tree of
        # dirs.py, on the cores that tool shares with it). One byte is enough: moto reads it all.
        s3.get_object(Bucket=S3_BUCKET, Key=key, Range="bytes=0-0")["Body"].read()
        log(
            f"s3: uploaded s3://{S3_BUCKET}/{key} ({head['ContentLength'] / 1e6:.1f} MB, ETag {head['ETag']}) "
            f"in {time.monotonic() - t0:.1f}s"
        )

    def stop(self) -> None:
        assert self.proc.stdin
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- running things ----------------------------------------------------------------------------


@dataclass
class Run:
    tool: str
    ok: bool
    wall: float
    rss_mib: float | None = None
    cpu: float | None = None  # user + sys seconds
    note: str = ""
    extra: dict[str, object] = field(default_factory=dict)


def parse_time_v(path: Path) -> tuple[float | None, float | None]:
    rss = cpu = None
    if path.exists():
        text = path.read_text()
        if m := re.search(r"Maximum resident set size \(kbytes\): (\d+)", text):
            rss = int(m.group(1)) / 1024
        u = re.search(r"User time \(seconds\): ([\d.]+)", text)
        s = re.search(r"System time \(seconds\): ([\d.]+)", text)
        if u and s:
            cpu = float(u.group(1)) + float(s.group(1))
    return rss, cpu


def timed(tool: str, cmd: list[str], env: dict[str, str], logfile: Path, timeout: float) -> Run:
    tfile = logfile.with_suffix(".time")
    full = ["/usr/bin/time", "-v", "-o", str(tfile), *cmd]
    with logfile.open("w") as out:
        out.write("$ " + shlex.join(cmd) + "\n")
        out.flush()
        # A blocking wait, with a timer to enforce the timeout: subprocess.run(timeout=...) polls
        # with sleeps of up to 50 ms, which rounded every wall time up to a 50 ms step.
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            rc = proc.wait()
        finally:
            timer.cancel()
        wall = time.perf_counter() - t0
        if wall >= timeout:
            rc = -1
    rss, cpu = parse_time_v(tfile)
    return Run(tool, rc == 0, wall, rss, cpu, "" if rc == 0 else f"exit {rc}, see {logfile}")


def written_bytes(pid: int, dest: Path) -> int:
    """How far a download got: bytes the process wrote (wchar), or allocated under dest, whichever is larger.

    (rchar would not do: socket recv() is not counted there.)"""
    wchar = 0
    with contextlib.suppress(OSError, AttributeError, ValueError):
        wchar = int(re.search(r"wchar: (\d+)", Path(f"/proc/{pid}/io").read_text()).group(1))  # type: ignore[union-attr]
    allocated = 0
    with contextlib.suppress(OSError):
        for p in dest.rglob("*"):
            with contextlib.suppress(OSError):
                st = p.lstat()
                if not p.is_dir():
                    allocated += st.st_blocks * 512
    return max(wchar, allocated)


def rel(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def tail(path: Path, n: int = 5) -> str:
    with contextlib.suppress(OSError):
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-n:])
    return ""


@dataclass
class Tool:
    name: str  # shown in the table
    cmd: Callable[[Path], list[str]]  # dest -> argv
    expect: Path  # the weights file, relative to dest
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Case:
    key: str
    title: str
    fetcher: Tool
    alternatives: list[tuple[Tool, float | None]]  # (tool, target ratio fetcher/alternative)
    pairs: int


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.logdir = CACHE / "logs" / stamp
        self.logdir.mkdir(parents=True)
        self.workdir = CACHE / "work"  # fresh dests, same filesystem as the data
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(parents=True)
        os.chdir(self.workdir)  # not the repo: python -m puts the cwd first on sys.path, before the snapshot
        self.base_env = {k: v for k, v in os.environ.items() if not k.startswith(("FETCHER_", "AWS_"))}
        self.base_env.pop("PYTHONPATH", None)
        self.seq = 0
        self.command_lines: list[str] = []
        self.load_start = Path("/proc/loadavg").read_text().split()[:3]
        self.runs: dict[str, list[Run]] = {}

    # fetcher from a snapshot of fetcher/ taken at start, so edits during the run cannot mix in
    def snapshot_fetcher(self) -> None:
        h = hashlib.sha256()
        files = sorted(p for p in (REPO / "fetcher").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        for p in files:
            h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes() + b"\0")
        self.fetcher_hash = h.hexdigest()[:12]
        snap = CACHE / "snapshots" / self.fetcher_hash
        if not (snap / "fetcher").exists():
            tmp = snap.with_name(snap.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(REPO / "fetcher", tmp / "fetcher", ignore=shutil.ignore_patterns("__pycache__"))
            tmp.rename(snap)
        # Byte-compiled, as pip leaves an installed fetcher (the image too): otherwise, with
        # PYTHONDONTWRITEBYTECODE set, every run would compile fetcher's modules anew (~15 ms).
        sh([str(FETCHER_PY), "-m", "compileall", "-q", str(snap / "fetcher")])
        self.fetcher_env = {**self.base_env, "PYTHONPATH": str(snap)}
        self.fetcher_cmd = [str(FETCHER_PY), "-m", "fetcher"]
        where = sh(
            [*self.fetcher_cmd[:1], "-c", "import fetcher; print(fetcher.__file__)"], env=self.fetcher_env
        ).strip()
        assert where.startswith(str(snap)), where
        self.fetcher_version = sh([*self.fetcher_cmd, "--version"], env=self.fetcher_env).strip()
        self.fetcher_help = sh([*self.fetcher_cmd, "--help"], env=self.fetcher_env)
        self.has_parallel = "--concurrency" in self.fetcher_help and "--part-size" in self.fetcher_help
        self.parallel_args = (
            ["--concurrency", str(self.args.concurrency), "--part-size", self.args.part_size]
            if self.has_parallel
            else []
        )
        try:
            head = sh(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]).strip()
            dirty = sh(["git", "-C", str(REPO), "status", "--porcelain", "--", "fetcher"]).strip()
            self.fetcher_git = f"{head}" + (
                f" + uncommitted changes in {len(dirty.splitlines())} file(s) of fetcher/" if dirty else ""
            )
        except (subprocess.CalledProcessError, FileNotFoundError):
            self.fetcher_git = "?"
        log(
            f"fetcher: {self.fetcher_version}, git {self.fetcher_git}, snapshot {snap}; "
            f"parallel options: {'yes ' + shlex.join(self.parallel_args) if self.has_parallel else 'none'}"
        )

    def fetcher_tool(
        self, source: str, sha: str, expect: Path, extra: list[str] | None = None, env: dict[str, str] | None = None
    ) -> Tool:
        def cmd(dest: Path) -> list[str]:
            return [
                *self.fetcher_cmd,
                "--source",
                source,
                "--dest",
                str(dest),
                "--sha256",
                sha,
                "--log-format",
                "json",
                "--termination-log",
                str(dest.parent / (dest.name + ".termination")),
                *(extra or []),
            ]

        return Tool("fetcher", cmd, expect, {**self.fetcher_env, **(env or {})})

    def fresh_dest(self, label: str) -> Path:
        self.seq += 1
        dest = self.workdir / f"{self.seq:03d}-{label}"
        dest.mkdir()
        return dest

    def clean(self, dest: Path) -> None:
        shutil.rmtree(dest, ignore_errors=True)
        for p in self.workdir.glob(dest.name + ".*"):
            p.unlink()
        subprocess.run(["sync"], check=False)  # don't leave the next run the writeback of this one

    def one(self, case: Case, tool: Tool, expect_sha: str, expect_size: int) -> Run:
        label = f"{case.key}-{re.sub(r'[^a-z0-9]+', '_', tool.name.lower())[:20]}"
        dest = self.fresh_dest(label)
        run = timed(
            tool.name,
            tool.cmd(dest),
            {**self.base_env, **tool.env} if tool.env else self.base_env,
            self.logdir / f"{dest.name}.log",
            self.args.timeout,
        )
        if run.ok:
            out = dest / tool.expect
            if not out.is_file() or out.stat().st_size != expect_size:
                run.ok, run.note = False, f"{tool.expect} missing or of the wrong size in dest"
                with contextlib.suppress(OSError):
                    if m := re.search(
                        r'"event": "published".*?"format": "([^"]+)"', (self.logdir / f"{dest.name}.log").read_text()
                    ):
                        run.note += f" (fetcher exited 0 and published format={m.group(1)})"
            elif self.args.verify_output and sha256_file(out) != expect_sha:
                run.ok, run.note = False, f"{out} has the wrong sha256"
        if not run.ok and "published format" not in run.note:
            run.note += " :: " + tail(self.logdir / f"{dest.name}.log", 3)[-400:]
        log(
            f"  {case.key:8} {tool.name:34} {run.wall:7.2f}s  rss {run.rss_mib or 0:6.0f} MiB  "
            f"cpu {run.cpu or 0:6.2f}s  {'ok' if run.ok else 'FAILED ' + run.note}"
        )
        self.clean(dest)
        return run

    def run_case(self, case: Case, data: Data) -> dict[str, object]:
        log(
            f"case {case.key}: {case.title}, {case.pairs} round(s), fetcher vs {', '.join(t.name for t, _ in case.alternatives)}"
        )
        tools = [case.fetcher] + [t for t, _ in case.alternatives]
        runs: dict[str, list[Run]] = {t.name: [] for t in tools}
        for r in range(case.pairs):
            order = tools if r % 2 == 0 else list(reversed(tools))  # A B, B A, ...: drift hits both sides alike
            for t in order:
                runs[t.name].append(self.one(case, t, data.inner_sha256, data.inner_size))
        return {"case": case, "runs": runs}

    # --- the kill-and-restart case ------------------------------------------------------------

    def kill_restart(self, data: Data, nginx: Nginx) -> dict[str, object]:
        size = data.size("model.safetensors")
        url = f"{nginx.capped_url}/model.safetensors"
        tool = self.fetcher_tool(url, data.sha("model.safetensors"), Path("model.safetensors"), self.parallel_args)
        results = []
        for _ in range(self.args.kill_runs):
            dest = self.fresh_dest("kill")
            offset = nginx.log_offset()
            logfile = self.logdir / f"{dest.name}-1.log"
            with logfile.open("w") as out:
                cmd = tool.cmd(dest)
                out.write("$ " + shlex.join(cmd) + "\n")
                out.flush()
                t0 = time.perf_counter()
                proc = subprocess.Popen(
                    cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=tool.env
                )
                progress = 0
                while proc.poll() is None:
                    progress = written_bytes(proc.pid, dest)
                    if progress >= self.args.kill_at * size:
                        proc.send_signal(signal.SIGKILL)
                        break
                    time.sleep(0.01)
                proc.wait()
                killed_after = time.perf_counter() - t0
            time.sleep(1.0)  # let nginx log the cut connections
            first = nginx.requests_since(offset, nginx.capped_port)
            offset2 = nginx.log_offset()
            if proc.returncode != -signal.SIGKILL:
                log(f"  kill: fetcher ended by itself (exit {proc.returncode}) before {self.args.kill_at:.0%}")
            restart = timed(
                "fetcher (restart)", tool.cmd(dest), tool.env, self.logdir / f"{dest.name}-2.log", self.args.timeout
            )
            time.sleep(0.5)
            second = nginx.requests_since(offset2, nginx.capped_port)
            out_file = dest / "model.safetensors"
            if restart.ok and not (
                out_file.is_file()
                and out_file.stat().st_size == size
                and (not self.args.verify_output or sha256_file(out_file) == data.sha("model.safetensors"))
            ):
                restart.ok, restart.note = False, "restart produced a wrong or missing file"
            b1 = sum(int(r["bytes"]) for r in first)  # type: ignore[call-overload]
            b2 = sum(int(r["bytes"]) for r in second)  # type: ignore[call-overload]
            res = {
                "killed": proc.returncode == -signal.SIGKILL,
                "killed_after_s": killed_after,
                "written_at_kill": progress,
                "bytes_before_kill": b1,
                "bytes_after_restart": b2,
                "redownloaded": b1 + b2 - size,
                "restart": restart,
                "requests_first": len(first),
                "requests_restart": len(second),
            }
            log(
                f"  kill     killed at {killed_after:.1f}s after {b1 / 1e6:.0f} MB ({b1 / size:.0%}); restart took "
                f"{restart.wall:.1f}s and {b2 / 1e6:.0f} MB in {len(second)} request(s): re-downloaded "
                f"{(b1 + b2 - size) / MiB:.0f} MiB; {'ok' if restart.ok else 'FAILED ' + restart.note}"
            )
            results.append(res)
            self.clean(dest)
        return {"url": url, "size": size, "results": results}

    # --- profile -------------------------------------------------------------------------------

    def profile(self, tool: Tool, key: str) -> str:
        pyspy = VENVS / "tools" / "bin" / "py-spy"
        dest = self.fresh_dest("profile")
        raw = self.logdir / f"profile-{key}.txt"
        svg = self.logdir / f"profile-{key}.svg"
        for fmt, out in (("raw", raw), ("flamegraph", svg)):
            cmd = [
                str(pyspy),
                "record",
                "--rate",
                "200",
                "--threads",
                "--native" if fmt == "raw" else "--nonblocking",
                "--format",
                fmt,
                "--output",
                str(out),
                "--",
                *tool.cmd(dest),
            ]
            p = subprocess.run(cmd, env=tool.env, capture_output=True, text=True, timeout=self.args.timeout)
            if p.returncode != 0 and fmt == "raw":  # --native needs unwinding support; retry without
                cmd.remove("--native")
                self.clean(dest)
                dest.mkdir()
                p = subprocess.run(cmd, env=tool.env, capture_output=True, text=True, timeout=self.args.timeout)
            if p.returncode != 0:
                return f"py-spy failed: {p.stderr.strip()[-500:]}"
            self.clean(dest)
            dest.mkdir()
        self.clean(dest)
        return summarize_profile(raw, svg, key)


_WAITING = (
    "Condition.wait",
    "PyThread_acquire_lock",
    "take_gil",
    "pthread_cond_timedwait",
    "sem_wait",
    "sem_timedwait",
)
_CATEGORIES = {
    "inflate (zlib/zlib-ng/isal)": lambda s: "inflate" in s or "isal" in s or "zlib_Decompress" in s,
    "zstd decompress": lambda s: "ZSTD_" in s or "zstd" in s.lower(),
    "sha256": lambda s: "sha256" in s.lower() or "EVP_Digest" in s or "Digest.__call__" in s,
    "file write syscalls": lambda s: s.rsplit(";", 1)[-1].startswith(("write ", "pwrite", "fdatasync", "fsync")),
    "socket recv": lambda s: "recv" in s.rsplit(";", 1)[-1],
    "tarfile": lambda s: "tarfile.py" in s,
    "imports": lambda s: "_find_and_load" in s,
}


def summarize_profile(raw: Path, svg: Path | None = None, key: str = "targz") -> str:
    """py-spy --native raw stacks -> text. Samples parked in a futex (Condition.wait, a lock, the GIL) count as waiting."""
    total = waiting = 0
    by_thread: dict[str, list[int]] = {}
    by_leaf: dict[str, int] = {}
    by_frame: dict[str, int] = {}
    cats: dict[str, int] = {}
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        frames = stack.split(";")
        total += count
        thread = re.sub(r"\s*\(\d+\)|\s*\(?0x[0-9a-f]+\)?", "", frames[0]).strip() or frames[0]
        thread = re.sub(r"_\d+$", "_N", thread)  # fetcher-part_0..7 together
        t = by_thread.setdefault(thread, [0, 0])
        t[0] += count
        if any(w in stack for w in _WAITING):
            waiting += count
            continue
        t[1] += count
        by_leaf[frames[-1]] = by_leaf.get(frames[-1], 0) + count
        for fr in set(frames[1:]):
            by_frame[fr] = by_frame.get(fr, 0) + count
        for cat, match in _CATEGORIES.items():
            if match(stack):
                cats[cat] = cats.get(cat, 0) + count
    if not total:
        return "py-spy recorded no samples"
    busy = total - waiting or 1
    where = f"raw: {rel(raw)}" + (f", flamegraph: {rel(svg)}" if svg else "")
    lines = [
        f"py-spy --native at 200 Hz over one {key} run ({where}): {total} samples of running threads, "
        f"{waiting / total:.0%} of them parked in a futex (Condition.wait, a lock, a queue or the GIL); "
        f"the shares below are of the other {busy}",
        "",
        "by thread (busy share, and samples incl. waiting):",
    ]
    lines += [
        f"  {b / busy:6.1%}  {t}  ({a} samples)"
        for t, (a, b) in sorted(by_thread.items(), key=lambda kv: -kv[1][1])[:8]
    ]
    lines += ["", "by kind of work (a sample may count twice, e.g. inflate inside tarfile):"]
    lines += [f"  {c / busy:6.1%}  {k}" for k, c in sorted(cats.items(), key=lambda kv: -kv[1])]
    lines += ["", "self time (leaf frames), top 12:"]
    lines += [f"  {c / busy:6.1%}  {f}" for f, c in sorted(by_leaf.items(), key=lambda kv: -kv[1])[:12]]
    lines += ["", "inclusive time in fetcher's code, top 15:"]
    ours = {f: c for f, c in by_frame.items() if "fetcher/" in f}
    lines += [f"  {c / busy:6.1%}  {f}" for f, c in sorted(ours.items(), key=lambda kv: -kv[1])[:15]]
    return "\n".join(lines)


# --- reporting ---------------------------------------------------------------------------------


def machine(bench: Bench) -> list[str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    pyver = sh([str(FETCHER_PY), "-c", "import sys; print(sys.version.split()[0])"]).strip()

    def version(cmd: list[str], pattern: str = r"(\d+\.\d+[\w.\-]*)") -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            m = re.search(pattern, out.stdout + out.stderr)
            return m.group(1) if m else "?"
        except (OSError, subprocess.TimeoutExpired):
            return "?"

    def pkg(venv: str, name: str) -> str:
        return version(
            [str(VENVS / venv / "bin" / "python"), "-c", f"import importlib.metadata as m; print(m.version({name!r}))"]
        )

    zstd_v = version(["zstd", "--version"], r"v(\d+\.\d+\.\d+)")
    nginx_v = version(["nginx", "-v"], r"nginx/(\S+)")
    botocore_v = version([str(VENVS / "aws" / "bin" / "aws"), "--version"], r"botocore/(\S+)")
    return [
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {os.cpu_count()} cores (nproc {sh(['nproc']).strip()}), {cpu}, {mem} RAM; kernel {platform.release()}; "
        f"load average at start {' '.join(bench.load_start)}, at end {' '.join(Path('/proc/loadavg').read_text().split()[:3])}",
        f"- {bench.fetcher_version} (git {bench.fetcher_git}; tree hash {bench.fetcher_hash}), Python {pyver}; "
        f"parallel-range options: {shlex.join(bench.parallel_args) if bench.has_parallel else 'none in --help, run plain'}",
        f"- alternatives: curl {version(['curl', '--version'])}, GNU tar {version(['tar', '--version'])}, "
        f"gzip {version(['gzip', '--version'])}, zstd {zstd_v}, "
        f"coreutils sha256sum {version(['sha256sum', '--version'])}, aria2c {version(['aria2c', '--version'])}, "
        f"awscli {pkg('aws', 'awscli')} (botocore {botocore_v}), kserve-storage {pkg('kserve', 'kserve-storage')}",
        f"- servers: nginx {nginx_v} (loopback, sendfile, worker_processes auto; "
        f"capped location: limit_rate {bench.args.limit_rate} per connection), moto {pkg('tools', 'moto')} "
        "ThreadedMotoServer in its own process (patched to serve ranges without re-reading the whole object)",
    ]


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def report(
    bench: Bench,
    data: Data,
    results: list[dict[str, object]],
    kill: dict[str, object] | None,
    profile: tuple[str, str] | None,
    elapsed: float,
) -> str:
    args = bench.args
    rss_limit = args.rss_target
    rows = [
        "| case | alternative | fetcher median s | alternative median s | ratio (median of pairs) | fetcher peak RSS MiB "
        "| target | met? |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    details = [
        "| case | tool | runs ok | median s | min s | max s | median MB/s | median CPU s (user+sys) | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        case: Case = res["case"]  # type: ignore[assignment]
        runs: dict[str, list[Run]] = res["runs"]  # type: ignore[assignment]
        f_runs = runs["fetcher"]
        f_ok = [r for r in f_runs if r.ok]
        f_rss = max((r.rss_mib or 0 for r in f_ok), default=None)
        for tool, target in case.alternatives:
            a_runs = runs[tool.name]
            ratios = [f.wall / a.wall for f, a in zip(f_runs, a_runs, strict=True) if f.ok and a.ok]
            ratio = median(ratios)
            mets = []
            if target is not None and ratio is not None:
                mets.append(("yes" if ratio <= target else "no") + (f" ({ratio:.2f} vs {target})"))
            if f_rss is not None:
                mets.append(f"RSS {'yes' if f_rss <= rss_limit else 'no'}")
            if len(f_ok) < len(f_runs) or len([a for a in a_runs if a.ok]) < len(a_runs):
                mets.append(
                    f"FAILED runs: fetcher {len(f_runs) - len(f_ok)}, alt {len([a for a in a_runs if not a.ok])}"
                )
            target_s = (f"<= {target}x" if target is not None else "— (context)") + f", RSS <= {rss_limit} MiB"
            rows.append(
                f"| {case.title} | {cell(tool.name)} | {fmt(median([r.wall for r in f_ok]))} | "
                f"{fmt(median([r.wall for r in a_runs if r.ok]))} | {fmt(ratio)}x | {fmt(f_rss, '.0f')} | "
                f"{target_s} | {'; '.join(mets) or '—'} |"
            )
        for name, rs in runs.items():
            ok = [r for r in rs if r.ok]
            walls = [r.wall for r in ok]
            md = median(walls)
            details.append(
                f"| {case.title} | {cell(name)} | {len(ok)}/{len(rs)} | {fmt(md)} | {fmt(min(walls) if walls else None)} | "
                f"{fmt(max(walls) if walls else None)} | {fmt(case_bytes(case, data) / md / 1e6 if md else None, '.0f')} | "
                f"{fmt(median([r.cpu for r in ok if r.cpu is not None]))} | "
                f"{fmt(max((r.rss_mib or 0 for r in ok), default=None), '.0f')} |"
            )
    kill_lines: list[str] = []
    if kill is not None:
        size = int(kill["size"])  # type: ignore[call-overload]
        rs = kill["results"]
        assert isinstance(rs, list)
        if bench.has_parallel:
            bound = args.concurrency * parse_size(args.part_size)
            target_s = f"re-downloaded <= concurrency x part size = {args.concurrency} x {args.part_size} = {bound / MiB:.0f} MiB"
        else:
            bound = 0
            target_s = "re-downloaded <= concurrency x part size (fetcher has no such options: plain single stream, bound taken as 0)"
        redl = [int(r["redownloaded"]) for r in rs if r["restart"].ok]
        restart_ok = [r["restart"] for r in rs if r["restart"].ok]
        worst = max(redl) if redl else None
        met = "—" if worst is None else ("yes" if worst <= bound else "no")
        rss = max((r.rss_mib or 0 for r in restart_ok), default=None)
        rows.append(
            f"| kill at ~{args.kill_at:.0%} + restart, raw file from the capped origin | — | "
            f"{fmt(median([r.wall for r in restart_ok]))} (restart) | — | "
            f"re-downloaded {fmt(worst / MiB if worst is not None else None, '.0f')} MiB | {fmt(rss, '.0f')} | "
            f"{target_s} | {met} |"
        )
        kill_lines = [
            "",
            "Kill and restart (bytes as nginx's access log counts them; `killed at` from the start of the first run):",
            "",
            "| # | killed at s | bytes before kill | requests | restart s | restart bytes | requests | re-downloaded MiB | result |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for i, r in enumerate(rs, 1):
            rr: Run = r["restart"]
            kill_lines.append(
                f"| {i} | {r['killed_after_s']:.1f} | {int(r['bytes_before_kill']) / 1e6:.0f} MB ({int(r['bytes_before_kill']) / size:.0%}) | "
                f"{r['requests_first']} | {rr.wall:.2f} | {int(r['bytes_after_restart']) / 1e6:.0f} MB | {r['requests_restart']} | "
                f"{int(r['redownloaded']) / MiB:.0f} | {'ok' if rr.ok else 'FAILED ' + rr.note} |"
            )
    files = ", ".join(f"{n} {data.size(n) / 1e6:.1f} MB" for n in data.files)
    gz_saves = 1 - data.size("model.tar.gz") / data.size("model.safetensors")
    out = [
        f"# fetcher benchmark{' (--quick)' if args.quick else ''}",
        "",
        "Generated by `bench/run"
        + (" " + shlex.join(args.argv) if args.argv else "")
        + f"`; took {elapsed / 60:.1f} min.",
        "",
        *machine(bench),
        f"- data: {files}; fp16 values from N(0, 0.02) in a .safetensors file (gzip -6 saves {gz_saves:.1%}); "
        "the archives hold model/{config.json, tokenizer.json, model.safetensors}",
        f"- method: {args.pairs} round(s) per case, fetcher and its alternatives alternating (A B, then B A); "
        "ratio = median over rounds of fetcher's wall time / the alternative's in the same round. Each run gets a fresh "
        "dest on the same filesystem as the data, removed afterwards, then `sync` (untimed). The page cache is not "
        "dropped (no root tricks): the served files are read once before timing and stay cached, so the origin reads "
        "from RAM. Peak RSS from `/usr/bin/time -v` (for a shell pipeline: its largest process). "
        + ("Every output file's sha256 is checked after the run (untimed)." if args.verify_output else ""),
        "",
        *rows,
        "",
        "Per tool:",
        "",
        *details,
        *kill_lines,
        "",
        "Commands (DEST is a fresh directory, URL the nginx location, SHA the expected sha256):",
        "",
        *[f"- {line}" for line in bench.command_lines],
    ]
    if profile:
        out += ["", f"Profile of one fetcher {profile[0]} run:", "", "```", profile[1], "```"]
    return "\n".join(out) + "\n"


def case_bytes(case: Case, data: Data) -> int:
    return {"targz": data.size("model.tar.gz"), "zst": data.size("model.tar.zst")}.get(
        case.key, data.size("model.safetensors")
    )


# --- main --------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="~100 MB of data and 1 round: a smoke test")
    ap.add_argument("--size-mb", type=int, help="size of the raw weights file (default 800, 100 with --quick)")
    ap.add_argument("--pairs", type=int, help="rounds per case (default 3, 1 with --quick)")
    ap.add_argument(
        "--cases",
        default="targz,raw,https,capped,s3,zst,kill",
        help="comma-separated subset of targz,raw,https,capped,s3,zst,kill (default: all)",
    )
    ap.add_argument("--no-kserve", action="store_true", help="leave kserve-storage out of the tar.gz case")
    ap.add_argument("--kill-runs", type=int, default=1, help="kill-and-restart repetitions (default 1)")
    ap.add_argument("--kill-at", type=float, default=0.8, help="fraction of the file received when fetcher is killed")
    ap.add_argument("--concurrency", type=int, default=8, help="passed as --concurrency if fetcher has it (default 8)")
    ap.add_argument("--part-size", default="8Mi", help="passed as --part-size if fetcher has it (default 8Mi)")
    ap.add_argument("--limit-rate", default="40m", help="nginx limit_rate of the capped location (default 40m)")
    ap.add_argument("--rss-target", type=float, default=100, help="peak RSS target in MiB (default 100)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds before one run is given up")
    ap.add_argument(
        "--no-verify-output",
        dest="verify_output",
        action="store_false",
        help="skip the (untimed) sha256 check of every output",
    )
    ap.add_argument(
        "--profile",
        nargs="?",
        const="targz",
        metavar="CASE",
        help="also profile one fetcher run of CASE (default targz; one of --cases) with py-spy",
    )
    ap.add_argument(
        "--out",
        type=Path,
        help="results file (default bench/results.md, or bench/.cache/results-quick.md with --quick)",
    )
    ap.add_argument(
        "--summarize-profile", type=Path, metavar="RAW", help="only print the summary of a py-spy raw profile"
    )
    args = ap.parse_args()
    if args.summarize_profile:
        print(summarize_profile(args.summarize_profile))
        return 0
    args.argv = sys.argv[1:]
    size_mb = args.size_mb or (100 if args.quick else 800)
    args.pairs = args.pairs or (1 if args.quick else 3)
    out_path = args.out.resolve() if args.out else (CACHE / "results-quick.md" if args.quick else HERE / "results.md")
    cases = set(args.cases.split(","))
    if args.profile and args.profile not in cases | {"targz"}:
        ap.error(f"--profile {args.profile}: not among --cases")
    started = time.monotonic()

    bench = Bench(args)
    bench.snapshot_fetcher()
    data = generate(size_mb)
    for name in data.files:  # into the page cache before anything is timed
        with (data.root / name).open("rb") as f:
            while f.read(16 * MiB):
                pass
    nginx = Nginx(data.root, args.limit_rate)
    moto: Moto | None = None
    log(f"nginx on {nginx.url} and {nginx.capped_url} (limit_rate {args.limit_rate}); logs in {bench.logdir}")
    try:
        for name in data.files:
            with urllib.request.urlopen(f"{nginx.url}/{name}", timeout=10) as r:  # served, and the right size
                assert int(r.headers["Content-Length"]) == data.size(name), name
        S, T, Z = data.sha("model.safetensors"), data.sha("model.tar.gz"), data.sha("model.tar.zst")
        inner = Path("model/model.safetensors")
        raw = Path("model.safetensors")
        bin_aws = VENVS / "aws" / "bin" / "aws"
        kserve_py = VENVS / "kserve" / "bin" / "python"
        sumfile = '"$DEST.sha256"'

        def pipeline(url: str, decompress: str, sha: str) -> Callable[[Path], list[str]]:
            script = (
                'set -o pipefail; curl -sf "$URL" | tee >(sha256sum > "$DEST.sha256") | '
                f'{decompress} -C "$DEST"; rc=$?; wait $!; '
                f'[ $rc -eq 0 ] && [ "$(cut -d" " -f1 {sumfile})" = "$SHA" ]'
            )
            return lambda d: ["env", f"URL={url}", f"DEST={d}", f"SHA={sha}", "bash", "-c", script]

        all_cases: list[Case] = []
        gz_url, zst_url = f"{nginx.url}/model.tar.gz", f"{nginx.url}/model.tar.zst"
        raw_url, capped_url = f"{nginx.url}/model.safetensors", f"{nginx.capped_url}/model.safetensors"
        if "targz" in cases:
            alts: list[tuple[Tool, float | None]] = [
                (Tool("curl | tee >(sha256sum) | tar xz", pipeline(gz_url, "tar xzf -", T), inner), 0.5)
            ]
            if not args.no_kserve:
                alts.append(
                    (
                        Tool(
                            "kserve-storage (no checksum)",
                            lambda d: [
                                str(kserve_py),
                                "-c",
                                "import sys; from kserve_storage import Storage; "
                                "Storage.download_files([sys.argv[1]], [sys.argv[2]])",
                                gz_url,
                                str(d),
                            ],
                            inner,
                        ),
                        None,
                    )
                )
            all_cases.append(
                Case("targz", "tar.gz end to end, verified", bench.fetcher_tool(gz_url, T, inner), alts, args.pairs)
            )
        if "raw" in cases:
            all_cases.append(
                Case(
                    "raw",
                    "raw file with sha256",
                    bench.fetcher_tool(raw_url, S, raw),
                    [
                        (
                            Tool(
                                "curl -o (no checksum)",
                                lambda d: ["curl", "-sf", "-o", str(d / "model.safetensors"), raw_url],
                                raw,
                            ),
                            1.1,
                        )
                    ],
                    args.pairs,
                )
            )
        if "https" in cases:
            tls_url, trust = f"{nginx.tls_url}/model.safetensors", {"SSL_CERT_FILE": str(nginx.ca_file)}
            all_cases.append(
                Case(
                    "https",
                    "raw file over HTTPS, sha256",
                    bench.fetcher_tool(tls_url, S, raw, env=trust),
                    [
                        (
                            Tool(
                                "curl -o over HTTPS (no checksum)",
                                lambda d: [
                                    "curl",
                                    "-sf",
                                    "--cacert",
                                    str(nginx.ca_file),
                                    "-o",
                                    str(d / "model.safetensors"),
                                    tls_url,
                                ],
                                raw,
                            ),
                            None,
                        )
                    ],
                    args.pairs,
                )
            )
        if "capped" in cases:
            all_cases.append(
                Case(
                    "capped",
                    f"raw file from the capped origin ({args.limit_rate}/conn), sha256",
                    bench.fetcher_tool(capped_url, S, raw, bench.parallel_args),
                    [
                        (
                            Tool(
                                "aria2c -x8 -s8 --checksum",
                                lambda d: [
                                    "aria2c",
                                    "-x8",
                                    "-s8",
                                    f"--checksum=sha-256={S}",
                                    "-q",
                                    "--allow-overwrite=true",
                                    "--auto-file-renaming=false",
                                    "-d",
                                    str(d),
                                    "-o",
                                    "model.safetensors",
                                    capped_url,
                                ],
                                raw,
                            ),
                            0.7,
                        )
                    ],
                    args.pairs,
                )
            )
        if "s3" in cases:
            moto = Moto()
            moto.upload(data.root / "model.safetensors", "model.safetensors")
            s3_url = f"s3://{S3_BUCKET}/model.safetensors"
            all_cases.append(
                Case(
                    "s3",
                    "S3 object with verification",
                    bench.fetcher_tool(s3_url, S, raw, env=moto.env),
                    [
                        (
                            Tool(
                                "aws s3 cp (no sha256)",
                                lambda d: [
                                    str(bin_aws),
                                    "s3",
                                    "cp",
                                    "--only-show-errors",
                                    "--no-progress",
                                    s3_url,
                                    str(d / "model.safetensors"),
                                ],
                                raw,
                                moto.env,
                            ),
                            1.0,
                        )
                    ],
                    args.pairs,
                )
            )
        if "zst" in cases:
            all_cases.append(
                Case(
                    "zst",
                    "tar.zst end to end, verified",
                    bench.fetcher_tool(zst_url, Z, inner),
                    [
                        (
                            Tool(
                                "curl | tee >(sha256sum) | zstd -d | tar x",
                                pipeline(zst_url, "zstd -dc | tar xf -", Z),
                                inner,
                            ),
                            None,
                        )
                    ],
                    args.pairs,
                )
            )
        for c in all_cases:
            for t in [c.fetcher] + [t for t, _ in c.alternatives]:
                line = shlex.join(t.cmd(Path("DEST")))
                line = line.replace(str(FETCHER_PY) + " -m fetcher", "fetcher").replace(str(VENVS) + "/", "")
                bench.command_lines.append(f"{c.key}, {t.name}: `{line}`")
        results = []
        for c in all_cases:
            results.append(bench.run_case(c, data))
        kill = None
        if "kill" in cases:
            log(f"case kill: fetcher on the capped origin, SIGKILL at ~{args.kill_at:.0%}, then the same command again")
            kill = bench.kill_restart(data, nginx)
        profile = None
        if args.profile:
            log(f"profile: one fetcher {args.profile} run under py-spy")
            tool = next((c.fetcher for c in all_cases if c.key == args.profile), None)
            if tool is None:  # targz, when not among the cases
                tool = bench.fetcher_tool(f"{nginx.url}/model.tar.gz", T, inner)
            profile = (args.profile, bench.profile(tool, args.profile))
        text = report(bench, data, results, kill, profile, time.monotonic() - started)
        out_path.write_text(text)
        raw_json = bench.logdir / "runs.json"
        raw_json.write_text(
            json.dumps(
                {
                    "cases": [
                        {"case": r["case"].key, "runs": {k: [vars(x) for x in v] for k, v in r["runs"].items()}}  # type: ignore[union-attr,attr-defined]
                        for r in results
                    ],
                    "kill": None
                    if kill is None
                    else {**kill, "results": [{**r, "restart": vars(r["restart"])} for r in kill["results"]]},
                },  # type: ignore[index]
                indent=1,
                default=str,
            )
        )
        print(text)
        log(f"results in {out_path}; per-run logs and runs.json in {bench.logdir}")
    finally:
        nginx.stop()
        if moto:
            moto.stop()
        shutil.rmtree(bench.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
