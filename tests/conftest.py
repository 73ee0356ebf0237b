"""Real servers on loopback and a way to run fetcher as users do.

``origin`` is a threaded HTTP server whose routes can inject faults (status
codes before success, Retry-After, a connection cut mid-body, ignored
ranges, stalls) and which records every request it received. ``s3`` is
moto's ThreadedMotoServer. ``run_fetcher`` runs ``python -m fetcher`` in a
subprocess and returns its exit code, parsed JSON log lines and output.
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import hashlib
import io
import ipaddress
import json
import os
import random
import shutil
import socket
import ssl
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT = Path(__file__).resolve().parent.parent
pytest_plugins = [
    "tests.faults_plugin",
    "tests.faults_support",
    "tests.fakehub",
    "tests.registry",
]  # FAULTS.md; s3_front, s3_tls; hub; registries


# --- archives -------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_tar(members: dict[str, bytes | tuple[str, Any]], compression: str = "gz") -> bytes:
    """A tar archive: name -> bytes for a file, or (kind, arg) for special members.

    Kinds: ("dir", mode), ("symlink", target), ("hardlink", target), ("file", (data, mode)),
    ("chr", None), ("fifo", None).
    """
    buffer = io.BytesIO()
    mode = f"w:{compression}" if compression else "w"
    with tarfile.open(fileobj=buffer, mode=mode) as archive:  # type: ignore[call-overload]
        for name, spec in members.items():
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            payload = b""
            if isinstance(spec, bytes):
                payload, info.mode = spec, 0o644
            else:
                kind, arg = spec
                if kind == "file":
                    payload, info.mode = arg
                elif kind == "dir":
                    info.type, info.mode = tarfile.DIRTYPE, arg
                elif kind == "symlink":
                    info.type, info.linkname = tarfile.SYMTYPE, arg
                elif kind == "hardlink":
                    info.type, info.linkname = tarfile.LNKTYPE, arg
                elif kind == "chr":
                    info.type = tarfile.CHRTYPE
                elif kind == "fifo":
                    info.type = tarfile.FIFOTYPE
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload) if payload else None)
    data = buffer.getvalue()
    if compression == "zst":  # tarfile has no zstd before 3.14
        raise ValueError("use make_tar_zst")
    return data


def make_tar_zst(members: dict[str, bytes | tuple[str, Any]]) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(make_tar(members, compression=""))


def make_zip(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16
            archive.writestr(info, target)
    return buffer.getvalue()


def model_files() -> dict[str, bytes | tuple[str, Any]]:
    """A small model-like tree: config, tokenizer and some weight-like bytes."""
    return {
        "model/config.json": b'{"architectures": ["SentimentClassifier"], "hidden_size": 64}\n',
        "model/tokenizer.json": b'{"vocab": {"good": 0, "bad": 1}}\n',
        "model/weights.safetensors": random.Random(7).randbytes(300_000),
    }


# --- the HTTP origin -------------------------------------------------------------


@dataclass
class Route:
    body: bytes
    content_type: str = "application/octet-stream"
    etag: str | None = None
    fail: list[int] = field(default_factory=list)  # statuses to answer first, one per request
    retry_after: str | None = None
    cut_after: list[int] = field(default_factory=list)  # bytes to send before cutting, one per request
    ranges: bool = True  # honour Range requests
    lie_about_ranges: bool = False  # advertise Accept-Ranges, then answer every range with 200
    stall: float = 0.0  # seconds to wait before sending the body
    rate: int | None = None  # bytes per second
    require: dict[str, str] = field(default_factory=dict)  # headers the request must carry
    then: tuple[bytes, str] | None = None  # (body, etag) the object becomes after the first request
    redirect: str | None = None  # answer 302 to this URL
    stall_after: tuple[int, float] | None = None  # (bytes, seconds): go silent mid-body, every response
    stall_ranged_only: bool = False  # stall_after only answers to Range requests (parallel parts)
    align_ranges: int = 0  # answer a range from its start rounded down to this: a 206 that is not what was asked
    until_close: bool = False  # no Content-Length: the body ends when the connection closes
    last_modified: str | None = None  # Last-Modified, an HTTP date
    then_modified: str | None = None  # the Last-Modified the object gets along with ``then``
    trickle: list[int] = field(default_factory=list)  # bytes/s to send at, one per request (then ``rate``)
    conditionals: bool = True  # honour If-Match and If-Unmodified-Since (False: ignore them, as some servers do)


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    sent: int = 0  # body bytes written back


def _precondition_fails(route: Route, headers: Any) -> bool:
    """RFC 9110 13.1.1, 13.1.4: If-Match compares strongly (a weak ETag never matches), If-Unmodified-Since by date."""
    if (match := headers.get("If-Match")) is not None:
        return not route.etag or route.etag.startswith("W/") or match != route.etag
    since = headers.get("If-Unmodified-Since")
    if since is not None and route.last_modified:
        return email.utils.parsedate_to_datetime(route.last_modified) > email.utils.parsedate_to_datetime(since)
    return False


class Origin:
    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[Seen] = []
        self.active = 0  # requests being answered now
        self.peak = 0  # the most answered at once
        self._lock = threading.Lock()
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                with origin._lock:
                    origin.active += 1
                    origin.peak = max(origin.peak, origin.active)
                try:
                    self._get()
                finally:
                    with origin._lock:
                        origin.active -= 1

            def _get(self) -> None:
                seen = Seen("GET", self.path, dict(self.headers.items()))
                origin.requests.append(seen)
                route = origin.routes.get(self.path.split("?", 1)[0])
                if route is None:
                    return self._simple(404, b"<html><body>Not Found</body></html>", "text/html")
                if route.redirect:
                    return self._simple(302, b"", "text/plain", {"Location": route.redirect})
                for name, value in route.require.items():
                    if self.headers.get(name) != value:
                        return self._simple(401, b"unauthorized", "text/plain")
                if route.fail:
                    status = route.fail.pop(0)
                    extra = {"Retry-After": route.retry_after} if route.retry_after else {}
                    return self._simple(status, b"try later", "text/plain", extra)
                advertised = route.ranges or route.lie_about_ranges
                body, status, headers = route.body, 200, {"Accept-Ranges": "bytes"} if advertised else {}
                wanted = self.headers.get("Range")
                if route.conditionals and _precondition_fails(route, self.headers):
                    return self._simple(412, b"precondition failed", "text/plain")
                if wanted and route.ranges and not route.lie_about_ranges:
                    start_text, _, end_text = wanted.removeprefix("bytes=").partition("-")
                    start = int(start_text)
                    start -= start % route.align_ranges if route.align_ranges else 0
                    end = int(end_text) if end_text else len(route.body) - 1
                    body, status = route.body[start : end + 1], 206
                    headers["Content-Range"] = f"bytes {start}-{end}/{len(route.body)}"
                if route.etag:
                    headers["ETag"] = route.etag
                if route.last_modified:
                    headers["Last-Modified"] = route.last_modified
                self.send_response(status)
                self.send_header("Content-Type", route.content_type)
                if route.until_close:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                else:
                    self.send_header("Content-Length", str(len(body)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                if route.stall:
                    time.sleep(route.stall)
                limit = route.cut_after.pop(0) if route.cut_after else None
                if route.then:  # re-uploaded while we were reading
                    route.body, route.etag = route.then
                    route.last_modified = route.then_modified or route.last_modified
                    route.then = None
                if route.stall_after and (wanted or not route.stall_ranged_only):
                    head, pause = route.stall_after
                    self._send(body[:head], route.rate, seen)
                    time.sleep(pause)
                    body = body[head:]
                rate = route.trickle.pop(0) if route.trickle else route.rate
                self._send(body if limit is None else body[:limit], rate, seen)
                if limit is not None:
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True

            def _send(self, body: bytes, rate: int | None, seen: Seen) -> None:
                step = 1024 * 1024 if rate is None else max(1, rate // 20)
                try:
                    for i in range(0, len(body), step):
                        self.wfile.write(body[i : i + step])
                        seen.sent += len(body[i : i + step])
                        if rate:
                            time.sleep(step / rate)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _simple(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in (extra or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.scheme = "http" if tls is None else "https"
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, path: str, body: bytes, **options: Any) -> str:
        self.routes[path] = Route(body, **options)
        return self.url(path)

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def hits(self, path: str) -> list[Seen]:
        return [r for r in self.requests if r.path.split("?", 1)[0] == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def origin() -> Iterator[Origin]:
    server = Origin()
    yield server
    server.close()


@dataclass
class Tls:
    ca_file: Path  # what a client must trust
    server: ssl.SSLContext  # a certificate for 127.0.0.1, signed by that CA


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    """A private CA and a server certificate for 127.0.0.1, as an internal model registry would have."""
    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)

    def builder(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - day)
            .not_valid_after(now + day)
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        builder("fetcher test CA", ca_key, "fetcher test CA")
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        builder("127.0.0.1", key, "fetcher test CA")
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    where = tmp_path_factory.mktemp("tls")
    (where / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (where / "server.pem").write_bytes(
        leaf.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(where / "server.pem")
    return Tls(where / "ca.pem", server)


@pytest.fixture
def tls_origin(tls: Tls) -> Iterator[Origin]:
    server = Origin(tls.server)
    yield server
    server.close()


# --- S3 ------------------------------------------------------------------------


@dataclass
class S3:
    endpoint: str
    env: dict[str, str]
    client: Any

    def put(self, bucket: str, key: str, body: bytes) -> str:
        with contextlib.suppress(self.client.exceptions.BucketAlreadyOwnedByYou):
            self.client.create_bucket(Bucket=bucket)
        self.client.put_object(Bucket=bucket, Key=key, Body=body)
        return f"s3://{bucket}/{key}"


@pytest.fixture(scope="session")
def s3() -> Iterator[S3]:
    import boto3
    from moto.server import ThreadedMotoServer

    # Port 0: the kernel's choice, bound at once (a port probed free, then bound, may be another
    # xdist worker's by then, and a moto that cannot bind never signals that it started)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server.get_host_and_port()[1]
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "AWS_REGION": "us-east-1",
    }
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    yield S3(endpoint, env, client)
    server.stop()


# --- running fetcher -----------------------------------------------------------------


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    events: list[dict[str, Any]]

    def event(self, name: str) -> dict[str, Any]:
        found = [e for e in self.events if e.get("event") == name]
        assert found, f"no {name!r} event in:\n{self.stderr}"
        return found[-1]

    def all(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]

    @property
    def error(self) -> str:
        return str(self.event("failed")["error"])


def _clean_env() -> dict[str, str]:
    # Nothing of the caller's that would change what fetcher does: its own settings, AWS's, the hub's, CA
    # bundles, proxies.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FETCHER_", "AWS_", "SSL_CERT_", "HF_", "HUGGING_FACE_", "S3_", "STORAGE_", "CA_BUNDLE_"))
        and k not in ("VERIFICATION_DIGEST", "awsAnonymousCredential")  # KServe's, which fetcher reads too
        and not k.lower().endswith(("_proxy", "-headers"))
    }
    env["HF_HOME"] = "/nonexistent"  # no token file of the developer's
    env["AWS_CONFIG_FILE"] = "/nonexistent"
    env["AWS_SHARED_CREDENTIALS_FILE"] = "/nonexistent"
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    return env


def _capabilities(keep: bool | str) -> list[str]:
    """Root without its capabilities (or with only ``keep``, e.g. "chown"): file permissions bind it
    as they bind a pod's user, who owns what it writes, while it can still read this checkout and
    pytest's private tmp_path."""
    if keep is True or os.geteuid() != 0:
        return []
    return ["setpriv", "--inh-caps=-all", f"--bounding-set=-all{f',+{keep}' if keep else ''}", "--"]


def run_fetcher(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120, capabilities: bool | str = True
) -> Run:
    """Run ``python -m fetcher`` as a user would; logs are JSON lines on stderr.

    ``capabilities=False``: as a pod's user runs it, with no CAP_DAC_OVERRIDE, CAP_FOWNER or CAP_CHOWN;
    ``capabilities="chown"``: as a locked-down init container that drops all but CAP_CHOWN.
    """
    full_env = _clean_env() | {"FETCHER_RETRY_BACKOFF": "0.05", "FETCHER_TERMINATION_LOG": "/dev/null"} | (env or {})
    process = subprocess.run(
        [*_capabilities(capabilities), sys.executable, "-m", "fetcher", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=ROOT,
    )
    events = []
    for line in process.stderr.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            events.append({"event": "(not json)", "line": line})
    assert "Traceback" not in process.stderr or process.returncode == 1, process.stderr
    return Run(process.returncode, process.stdout, process.stderr, events)


IN_CI = os.environ.get("CI", "").lower() == "true"


def unavailable(reason: str) -> None:
    """Skip locally; fail under CI, where every test must run (.ci/run installs what they need)."""
    if IN_CI:
        pytest.fail(f"cannot run under CI: {reason}", pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def cpu_hogs() -> Iterator[None]:
    """Every core taken by other work: two busy loops a core, so that on each core a task waits
    for a CPU all the while (the kernel's CPU pressure counts a core's waits, then averages)."""
    if not Path("/proc/pressure/cpu").is_file():
        unavailable("no CPU pressure (PSI) on this kernel")
    cores = len(os.sched_getaffinity(0))
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * cores)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def needs(tool: str) -> pytest.MarkDecorator:
    """Skip without ``tool`` locally; under CI the test runs, and fails loudly if the tool is missing."""
    return pytest.mark.skipif(shutil.which(tool) is None and not IN_CI, reason=f"needs {tool}: scripts/container-tools")


@contextlib.contextmanager
def small_volume(path: Path, size: str, kind: str = "tmpfs") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at path: a volume that fills up for real (ramfs: one without O_DIRECT)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", kind, "-o", f"size={size}", kind, str(path)], capture_output=True)
    if mounted.returncode != 0:
        unavailable(f"cannot mount a {kind} here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def tree(root: Path) -> dict[str, bytes]:
    """Every regular file under root except fetcher's state, by relative path."""
    found = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if relative.parts[0] == ".fetcher" or path.is_symlink() or not path.is_file():
            continue
        found[str(relative)] = path.read_bytes()
    return found


def published(root: Path) -> list[str]:
    """Everything in dest but the state directory."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.relative_to(root).parts[0] != ".fetcher")


# Runs a command and prints its peak RSS (KiB). The child is started from this small process: a
# process's peak counts the memory it had before exec, and here that is not the test's.
_MEASURE = (
    "import resource, subprocess, sys;"
    "code = subprocess.call(sys.argv[1:]);"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss);"
    "sys.exit(code)"
)


def run_measured(*args: str) -> tuple[int, str, int]:
    """Run fetcher and return its exit status, its log and its peak RSS in KiB."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FETCHER_", "AWS_")) and "proxy" not in k.lower()}
    env["FETCHER_TERMINATION_LOG"] = "/dev/null"
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, sys.executable, "-m", "fetcher", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, done.stderr, int(done.stdout.split()[-1])
