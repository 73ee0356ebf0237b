"""OCI rows of the benchmark: a ModelPack artifact pulled from a real registry on loopback.

fetcher against what users would run instead, on the same registry, in one run, alternating:

- ``skopeo copy docker://HOST/REPO:TAG dir:OUT`` (Debian's skopeo: verifies every blob's digest,
  but leaves blobs named by digest, not the model's files);
- the ``oras`` Python client's ``OrasClient.pull`` (names files by their title; verifies nothing);
- the same three with blob reads capped at 40 MB/s per connection (row capped: nginx in front of the
  registry serves blobs from its storage, as object storage behind a registry's redirect would);
- row modelcar: the same tree under ``/models`` of an ordinary image (KServe's modelcar), a tar+gzip layer
  per shard and one for the small files; fetcher with ``--oci-path /models`` against ``skopeo copy`` to
  ``dir:`` followed by ``tar xzf`` of each layer in order, timed as one ``bash -c``.

The registry is Debian's ``docker-registry`` (the CNCF distribution registry) with a config of the
bench's own, filesystem storage in bench/.cache/oci/, plain HTTP on 127.0.0.1 (``--https``: a
self-signed certificate made for the run). The artifact is bench/dirs.py's tree (4 shards of
~200 MB and 10 small files), one raw ModelPack layer per file, pushed once with PyPI's ``oras``. The
modelcar image is built here (Python's tarfile and zlib, level 6, cached in bench/.cache/data/) and pushed
once through the registry's HTTP API.

Run ``bench/run --help`` once first (it makes the tools and runtime venvs), then
``bench/.cache/venvs/tools/bin/python bench/oci.py [--pairs N] [--quick] [--profile]``.
Helpers (timing, the fetcher snapshot, the tree) come from bench.py and dirs.py; see bench/README.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import gzip
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dirs as D  # bench/dirs.py: the tree, venvs, /proc CPU seconds

import bench as B  # bench/bench.py: this script's directory is first on sys.path

HERE, REPO, CACHE, VENVS, MiB = B.HERE, B.REPO, B.CACHE, B.VENVS, B.MiB
OCI_REPO = "bench/model"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MODEL_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MODEL_CONFIG = "application/vnd.cncf.model.config.v1+json"
WEIGHT, WEIGHT_CONFIG, DOC = (f"application/vnd.cncf.model.{k}.v1.raw" for k in ("weight", "weight.config", "doc"))
FILEPATH, TITLE = "org.cncf.model.filepath", "org.opencontainers.image.title"
ORAS_STAMP = "v1 oras"
MODELCAR_REPO = "bench/modelcar"
IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
GZIP_LEVEL = 6  # zlib's default, what docker and buildah use
MODELCAR_VERSION = 1  # bump when the image's layout changes: its cache directory and tag carry it

# The modelcar alternative: what a user without fetcher would run in an init container. $1 the image
# reference, $2 dest, the rest skopeo's trust options. Layers in the manifest's order; no whiteouts
# are honoured (the image has none); only models/ is kept, one level up, as fetcher's --oci-path does.
MODELCAR_SCRIPT = (
    "set -euo pipefail; blobs=$2.blobs; "
    'skopeo copy --quiet "${@:3}" "docker://$1" "dir:$blobs"; '
    'for d in $(jq -r ".layers[].digest" "$blobs/manifest.json"); do '
    'tar xzf "$blobs/${d#sha256:}" -C "$2" --strip-components=1 models; done'
)

# Run in venvs/oras: uploads what is missing (oras' upload_blob HEADs each blob first), then PUTs the
# manifest, whose exact bytes the spec holds, under the tag. argv: the spec (JSON).
PUSH_CODE = """
import json, sys
import oras.provider
spec = json.load(open(sys.argv[1]))
client = oras.provider.Registry(hostname=spec["host"], insecure=not spec["ca"], tls_verify=spec["ca"] or False,
                                auth_backend="basic")
container = client.get_container(spec["ref"])
for path, descriptor in spec["blobs"]:
    r = client.upload_blob(path, container, descriptor)
    if r.status_code not in (200, 201, 202):
        sys.exit(f"blob {descriptor['digest']}: {r.status_code} {r.text}")
body = open(spec["manifest"], "rb").read()
r = client.do_request(f"{client.prefix}://{container.manifest_url()}", "PUT", data=body,
                      headers={"Content-Type": json.loads(body)["mediaType"]})
if r.status_code != 201:
    sys.exit(f"manifest PUT: {r.status_code} {r.text}")
print(r.headers["Docker-Content-Digest"])
"""

# The oras alternative, in venvs/oras: what its README shows, pointed at the registry. argv: host ref outdir [ca]
PULL_CODE = (
    "import sys, oras.client; a = sys.argv; ca = a[4] if len(a) > 4 else None; "
    "oras.client.OrasClient(hostname=a[1], insecure=not ca, tls_verify=ca or False).pull(target=a[2], outdir=a[3])"
)


def media_type(path: str) -> str:
    if path.endswith(".safetensors"):
        return WEIGHT
    return DOC if path in ("README.md", ".gitattributes") else WEIGHT_CONFIG


def canonical(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


# --- setup -------------------------------------------------------------------------------------


def setup() -> None:
    # bench/run makes tools and runtime; --help stops there. skopeo and docker-registry are Debian's.
    subprocess.run([str(HERE / "run"), "--help"], check=True, stdout=subprocess.DEVNULL)
    D.make_venv("oras", ORAS_STAMP, "oras")
    missing = [
        pkg for pkg, cmd in (("docker-registry", "docker-registry"), ("skopeo", "skopeo")) if not shutil.which(cmd)
    ]
    if missing:
        B.log(f"setup: apt-get install {' '.join(missing)}")
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, stdout=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", *missing], check=True, stdout=sys.stderr, env=env)


# --- the registry and the artifact ------------------------------------------------------------------


class Registry:
    """docker-registry in its own process: storage kept in bench/.cache/oci/ between runs, so a push is once."""

    def __init__(self, logdir: Path, https: bool) -> None:
        self.dir = CACHE / "oci"
        self.storage = self.dir / "storage"
        self.storage.mkdir(parents=True, exist_ok=True)
        self.port = B.free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.ca_file: Path | None = None
        self.cert_dir: Path | None = None
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "warn", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": self.host, "secret": "fetcher-bench", "headers": {"X-Content-Type-Options": ["nosniff"]}},
        }
        if https:
            self.ca_file = self.dir / "tls.pem"
            key = self.dir / "tls.key"
            B.sh(
                [
                    *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
                    *("-keyout", str(key), "-out", str(self.ca_file), "-days", "2"),
                    *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
                ]
            )
            config["http"]["tls"] = {"certificate": str(self.ca_file), "key": str(key)}
            self.cert_dir = self.dir / "certs.d"  # skopeo's --src-cert-dir: the CA as ca.crt
            self.cert_dir.mkdir(exist_ok=True)
            shutil.copyfile(self.ca_file, self.cert_dir / "ca.crt")
        self.url = f"{'https' if https else 'http'}://{self.host}"
        config_file = self.dir / "config.yml"
        config_file.write_text(json.dumps(config, indent=2))  # JSON is YAML
        self.log_file = logdir / "registry.log"
        with self.log_file.open("wb") as log:
            self.proc = subprocess.Popen(
                ["docker-registry", "serve", str(config_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        B.wait_port(self.port)

    def blob_file(self, digest: str) -> Path:
        hexdigest = digest.removeprefix("sha256:")
        return self.storage / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


CAPPED_CONF = """\
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 512; }}
http {{
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location ~ "^/v2/.+/blobs/sha256:(([0-9a-f]{{2}})[0-9a-f]{{62}})$" {{
            alias {storage}/docker/registry/v2/blobs/sha256/$2/$1/data;
            add_header Docker-Content-Digest sha256:$1;
            limit_rate {rate};
        }}
        location / {{
            proxy_pass http://{upstream};
            proxy_set_header Host $http_host;
        }}
    }}
}}
"""


class CappedBlobs:
    """nginx in front of the registry: blob reads served from its storage, each connection capped.

    What a registry that redirects blob reads to object storage or a CDN looks like to a client, where
    one connection gets ~40 MB/s: nginx serves ``/v2/.../blobs/sha256:...`` straight from the
    registry's storage directory (ranges, ETag, ``limit_rate`` per connection) and proxies the rest
    (``/v2/``, manifests) to the registry. A static location, because nginx's ``limit_rate`` did not
    throttle proxied blob responses here (33 MB came at ~900 MB/s).
    """

    def __init__(self, registry: Registry, rate: int, logdir: Path) -> None:
        self.tmp = CACHE / "oci" / "nginx"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.port = B.free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.rate = rate
        conf = CAPPED_CONF.format(
            tmp=self.tmp, port=self.port, upstream=registry.host, storage=registry.storage, rate=rate
        )
        (self.tmp / "nginx.conf").write_text(conf)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        cmd = [nginx, "-p", str(self.tmp), "-e", str(self.tmp / "error.log"), "-c", str(self.tmp / "nginx.conf")]
        cmd += ["-g", "daemon off;"]
        if os.geteuid() == 0:  # as bench.Nginx: nobody, not root (the storage is world-readable)
            for p in [self.tmp, *self.tmp.iterdir()]:
                os.chown(p, 65534, 65534)
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", *cmd]
        self._log = (logdir / "nginx.log").open("wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        B.wait_port(self.port)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGQUIT)  # graceful; the master waits for its workers
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@dataclass
class Artifact:
    name: str  # REPO:TAG
    digest: str  # the manifest's
    manifest: dict[str, Any]
    blobs: dict[str, int]  # digest -> size, of the config and every layer: what skopeo's dir: must hold


def push(registry: Registry, tree: D.Tree, logdir: Path) -> Artifact:
    """The tree as a ModelPack artifact (a raw layer per file), tagged by the tree's parameters."""
    tag = "t" + B.sha256_file(tree.sums)[:12]
    layers = []
    blobs: list[tuple[str, dict[str, Any]]] = []
    for path, f in tree.files.items():
        descriptor = {
            "mediaType": media_type(path),
            "digest": "sha256:" + f["sha256"],
            "size": int(f["size"]),
            # the ModelPack path, and the title that oras (and modctl) name a file by
            "annotations": {FILEPATH: path, TITLE: path},
        }
        layers.append(descriptor)
        blobs.append((str(tree.root / path), descriptor))
    config = canonical(
        {
            "descriptor": {"name": OCI_REPO, "createdAt": "2025-01-01T00:00:00Z"},
            "config": {"format": "safetensors", "paramSize": "0.4B"},
            "modelfs": {"type": "layers", "diffIds": [layer["digest"] for layer in layers]},
        }
    )
    work = CACHE / "oci" / "push"
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_bytes(config)
    config_descriptor = {
        "mediaType": MODEL_CONFIG,
        "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
        "size": len(config),
    }
    blobs.append((str(work / "config.json"), config_descriptor))
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": MODEL_ARTIFACT,
        "config": config_descriptor,
        "layers": layers,
    }
    body = canonical(manifest)
    (work / "manifest.json").write_bytes(body)
    ref = f"{registry.host}/{OCI_REPO}:{tag}"
    spec = {
        "host": registry.host,
        "ca": str(registry.ca_file) if registry.ca_file else "",
        "ref": ref,
        "blobs": blobs,
        "manifest": str(work / "manifest.json"),
    }
    (work / "spec.json").write_text(json.dumps(spec, indent=1))
    t0 = time.monotonic()
    with (logdir / "push.log").open("w") as out:
        p = subprocess.run(
            [str(VENVS / "oras" / "bin" / "python"), "-c", PUSH_CODE, str(work / "spec.json")],
            stdout=subprocess.PIPE,
            stderr=out,
            text=True,
        )
    if p.returncode != 0:
        raise RuntimeError(f"push failed: {B.tail(logdir / 'push.log')}")
    digest = p.stdout.strip()
    assert digest == "sha256:" + hashlib.sha256(body).hexdigest(), digest
    B.log(f"artifact: {ref} = {digest} ({len(layers)} layers; push or check took {time.monotonic() - t0:.1f}s)")
    sizes = {d["digest"]: int(d["size"]) for _, d in blobs}
    return Artifact(f"{OCI_REPO}:{tag}", digest, manifest, sizes)


class _Hashing:
    """A write-only file that hashes what passes through: the uncompressed tar, whose sha256 is the diff_id."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.h = inner, hashlib.sha256()

    def write(self, b: bytes) -> int:
        self.h.update(b)
        return int(self.inner.write(b))


def write_layer(tree: D.Tree, paths: list[str], out: Path) -> str:
    """One tar+gzip layer holding paths under models/, as a Dockerfile's COPY makes it; returns its diff_id."""
    with out.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=GZIP_LEVEL, mtime=0) as gz:
        hashing = _Hashing(gz)
        with tarfile.open(fileobj=hashing, mode="w|", format=tarfile.PAX_FORMAT) as tf:  # type: ignore[call-overload]
            dirs_done: set[str] = set()
            for path in paths:
                parts = ("models/" + path).split("/")
                for i in range(1, len(parts)):
                    d = "/".join(parts[:i])
                    if d not in dirs_done:
                        dirs_done.add(d)
                        info = tarfile.TarInfo(d)
                        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1735689600
                        tf.addfile(info)
                info = tarfile.TarInfo("models/" + path)
                info.size, info.mode, info.mtime = int(tree.files[path]["size"]), 0o644, 1735689600
                with (tree.root / path).open("rb") as f:
                    tf.addfile(info, f)
    return "sha256:" + hashing.h.hexdigest()


def build_modelcar(tree: D.Tree) -> tuple[Path, bytes, list[tuple[Path, dict[str, Any]]]]:
    """The tree as a modelcar image in bench/.cache/data/: its manifest's bytes and (file, descriptor) of every blob.

    A tar+gzip layer per shard and one for the small files, like a COPY per file group; built once."""
    out = CACHE / "data" / f"modelcar-v{MODELCAR_VERSION}-gz{GZIP_LEVEL}-{B.sha256_file(tree.sums)[:12]}"
    if (out / "manifest.json").is_file():
        B.log(f"modelcar image: cached in {out}")
        blobs = [(Path(p), d) for p, d in json.loads((out / "blobs.json").read_text())]
        return out, (out / "manifest.json").read_bytes(), blobs
    B.log(f"modelcar image: writing tar+gzip layers (zlib level {GZIP_LEVEL}) in {out} (once; cached)")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shards = [p for p in tree.files if p.endswith(".safetensors")]
    groups = [[p] for p in shards] + [[p for p in tree.files if p not in shards]]
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as ex:  # zlib lets go of the GIL
        diff_ids = list(ex.map(lambda ig: write_layer(tree, ig[1], out / f"layer{ig[0]}.tar.gz"), enumerate(groups)))
    layers: list[tuple[Path, dict[str, Any]]] = []
    for i in range(len(groups)):
        f = out / f"layer{i}.tar.gz"
        layers.append((f, {"mediaType": TAR_GZIP, "digest": "sha256:" + B.sha256_file(f), "size": f.stat().st_size}))
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    config = canonical(
        {
            "architecture": arch,
            "os": "linux",
            "created": "2025-01-01T00:00:00Z",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    )
    (out / "config.json").write_bytes(config)
    config_descriptor = {
        "mediaType": IMAGE_CONFIG,
        "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
        "size": len(config),
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_descriptor,
        "layers": [d for _, d in layers],
    }
    blobs = [(out / "config.json", config_descriptor), *layers]
    (out / "blobs.json").write_text(json.dumps([(str(p), d) for p, d in blobs], indent=1))
    body = canonical(manifest)
    (out / "manifest.json").write_bytes(body)  # last: its presence marks the image complete
    B.log(
        f"modelcar image: {len(layers)} layers, {sum(d['size'] for _, d in layers) / 1e6:.0f} MB gzipped, "
        f"in {time.monotonic() - t0:.0f}s"
    )
    return out, body, blobs


def push_modelcar(registry: Registry, tree: D.Tree) -> Artifact:
    """The modelcar image pushed through the registry's HTTP API: HEAD each blob, upload what is missing, PUT the manifest."""
    _, body, blobs = build_modelcar(tree)
    tag = f"t{B.sha256_file(tree.sums)[:12]}v{MODELCAR_VERSION}"
    ctx = ssl.create_default_context(cafile=str(registry.ca_file)) if registry.ca_file else None
    base = f"{registry.url}/v2/{MODELCAR_REPO}"

    def request(method: str, url: str, data: Any = None, headers: dict[str, str] | None = None) -> Any:
        req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        return urllib.request.urlopen(req, context=ctx, timeout=300)

    t0 = time.monotonic()
    uploaded = 0
    for path, d in blobs:
        try:
            request("HEAD", f"{base}/blobs/{d['digest']}").close()
            continue
        except urllib.error.HTTPError as e:
            if e.code != 404:
                raise
        with request("POST", f"{base}/blobs/uploads/") as r:
            location = urllib.parse.urljoin(base, r.headers["Location"])
        sep = "&" if "?" in location else "?"
        with Path(path).open("rb") as f:
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(d["size"])}
            request("PUT", f"{location}{sep}digest={d['digest']}", f, headers).close()
        uploaded += 1
    with request("PUT", f"{base}/manifests/{tag}", body, {"Content-Type": OCI_MANIFEST}) as r:
        digest = r.headers["Docker-Content-Digest"]
    assert digest == "sha256:" + hashlib.sha256(body).hexdigest(), digest
    B.log(
        f"modelcar: {registry.host}/{MODELCAR_REPO}:{tag} = {digest} ({uploaded} of {len(blobs)} blobs uploaded "
        f"in {time.monotonic() - t0:.1f}s)"
    )
    manifest = json.loads(body)
    return Artifact(f"{MODELCAR_REPO}:{tag}", digest, manifest, {d["digest"]: int(d["size"]) for _, d in blobs})


# --- tools and runs --------------------------------------------------------------------------------


@dataclass
class OciTool:
    name: str  # shown in the tables
    cmd: Callable[[Path], list[str]]  # dest -> argv
    env: dict[str, str]  # the whole environment
    output: str  # "tree": dest holds the model's files; "blobs": skopeo's dir: layout


@dataclass
class Row:
    key: str
    title: str
    fetcher: OciTool
    alternatives: list[tuple[OciTool, float | None]]  # (tool, target ratio fetcher / tool)
    runs: dict[str, list[B.Run]] = field(default_factory=dict)
    servers: list[int] = field(default_factory=list)  # besides the registry: nginx's master (its workers are counted)
    artifact: Artifact | None = None  # what the row pulls, when not the ModelPack artifact


def server_pids(pids: list[int]) -> list[int]:
    """The processes and their children (nginx's workers): what serving a run costs."""
    found = []
    for pid in pids:
        found.append(pid)
        with contextlib.suppress(OSError):
            found += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return found


class OciBench(D.DirBench):
    """dirs.py's bench (cleaning, checking a tree, profiling), over a registry instead of hubs."""

    LOG_PREFIX = "oci-"
    ALLOWED_EXTRA = (".fetcher",)

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.registry: Registry | None = None

    def check_blobs(self, dest: Path, artifact: Artifact) -> str:
        """skopeo's dir: holds every blob (config and layers) by its hex digest, and the manifest."""
        if not (dest / "manifest.json").is_file():
            return "no manifest.json"
        for digest, size in artifact.blobs.items():
            p = dest / digest.removeprefix("sha256:")
            if not p.is_file() or p.stat().st_size != size:
                return f"blob {digest} missing or of the wrong size"
            if self.args.verify_output and "sha256:" + B.sha256_file(p) != digest:
                return f"blob {digest} has the wrong sha256"
        return ""

    def one_run(self, row: Row, tool: OciTool, tree: D.Tree, artifact: Artifact) -> B.Run:
        assert self.registry is not None
        label = f"{row.key}-{re.sub(r'[^a-z0-9]+', '_', tool.name.lower())[:20]}"
        dest = self.fresh_dest(label)
        logfile = self.logdir / f"{dest.name}.log"
        pids = server_pids([self.registry.proc.pid, *row.servers])
        origin_cpu = sum(D.cpu_seconds(pid) for pid in pids)
        run = B.timed(tool.name, tool.cmd(dest), tool.env, logfile, self.args.timeout)
        run.extra["origin_cpu"] = sum(D.cpu_seconds(pid) for pid in pids) - origin_cpu
        if tool.name == "fetcher":  # files it split into ranged parts: on loopback, the cause of its slow runs
            run.extra["splits"] = logfile.read_text(errors="replace").count('"event": "splitting"')
        if run.ok:
            why = self.check_blobs(dest, artifact) if tool.output == "blobs" else self.check_tree(dest, tree)
            if why:
                run.ok, run.note = False, why
        if not run.ok:
            run.note += " :: " + B.tail(logfile, 3)[-400:]
        B.log(
            f"  {row.key:7} {tool.name:32} {run.wall:7.2f}s  rss {run.rss_mib or 0:6.0f} MiB  "
            f"cpu {run.cpu or 0:6.2f}s  registry cpu {run.extra['origin_cpu']:5.2f}s  {'ok' if run.ok else 'FAILED ' + run.note}"
        )
        self.clean_tree(dest)
        return run

    def run_row(self, row: Row, tree: D.Tree, artifact: Artifact) -> None:
        tools = [row.fetcher] + [t for t, _ in row.alternatives]
        B.log(f"row {row.key}: {row.title}, {self.args.pairs} round(s): {', '.join(t.name for t in tools)}")
        row.runs = {t.name: [] for t in tools}
        for r in range(self.args.pairs):
            for t in tools if r % 2 == 0 else list(reversed(tools)):  # A B C, then C B A: drift hits all alike
                row.runs[t.name].append(self.one_run(row, t, tree, artifact))


def make_row(
    bench: OciBench,
    key: str,
    title: str,
    host: str,
    ca: str,
    cert_dir: Path | None,
    artifact: Artifact,
    targets: tuple[float | None, float | None],
) -> Row:
    """fetcher, skopeo and oras-py against the registry at host (HTTPS when ca is set)."""
    ref = f"{host}/{artifact.name}"

    def skopeo_cmd(dest: Path) -> list[str]:
        trust = ["--src-cert-dir", str(cert_dir)] if ca else ["--src-tls-verify=false"]
        return ["skopeo", "copy", "--quiet", *trust, f"docker://{ref}", f"dir:{dest}"]

    def oras_cmd(dest: Path) -> list[str]:
        return [
            str(VENVS / "oras" / "bin" / "python"),
            "-c",
            PULL_CODE,
            host,
            ref,
            str(dest),
            *([ca] if ca else []),
        ]

    alt_env = alternatives_env(bench)
    tools = [
        (OciTool("skopeo copy dir:", skopeo_cmd, alt_env, "blobs"), targets[0]),
        (OciTool("oras-py pull", oras_cmd, alt_env, "tree"), targets[1]),
    ]
    if key == "modelpack":
        # Context: fetcher's time includes making the model durable (every file fsynced before the marker);
        # oras-py leaves its writeback to the kernel after it exits. The same pull, then sync, pays it.
        def oras_sync_cmd(dest: Path) -> list[str]:
            return ["bash", "-c", '"$@" && sync', "oras-then-sync", *oras_cmd(dest)]

        tools.append((OciTool("oras-py pull, then sync", oras_sync_cmd, alt_env, "tree"), None))
    if key == "modelpack" and not ca:  # the floor speaks plain HTTP only
        tools.append((floor_tool(bench, host, artifact, alt_env), None))
    return Row(key, title, fetcher_tool(bench, ref, [], ca), tools)


def floor_tool(bench: OciBench, host: str, artifact: Artifact, env: dict[str, str]) -> OciTool:
    """bench/floor_client.py on the artifact's layer blobs: bare GETs, sha256 and a write per file, nothing else.

    What no verifying client in Python can undercut on this host: a target below it is out of reach.
    """
    repo = artifact.name.rsplit(":", 1)[0]
    urls = bench.logdir / "floor-urls.txt"
    urls.write_text(
        "".join(
            f"{layer['digest'].removeprefix('sha256:')} {layer['annotations'][FILEPATH]} "
            f"http://{host}/v2/{repo}/blobs/{layer['digest']}\n"
            for layer in artifact.manifest["layers"]
        )
    )
    python = str(VENVS / "tools" / "bin" / "python")
    return OciTool(
        "floor: bare Python GETs + sha256 (bench/floor_client.py)",
        lambda d: [python, str(HERE / "floor_client.py"), str(urls), str(d)],
        env,
        "tree",
    )


def fetcher_tool(bench: OciBench, ref: str, extra: list[str], ca: str) -> OciTool:
    """dirs.py's fetcher command, on oci://ref (plain HTTP unless ca, the registry's CA, is given)."""
    tool = D.fetcher_tool(bench, f"oci://{ref}", [*extra, *([] if ca else ["--oci-plain-http"])], {})
    return OciTool("fetcher", tool.cmd, {**tool.env, **({"SSL_CERT_FILE": ca} if ca else {})}, "tree")


def alternatives_env(bench: OciBench) -> dict[str, str]:
    """No credentials: the registry is anonymous, and none from this machine may leak into a run."""
    env = {k: v for k, v in bench.base_env.items() if k not in ("REGISTRY_AUTH_FILE", "DOCKER_CONFIG")}
    env["HOME"] = str(bench.workdir / "home")  # no ~/.docker/config.json of the user's for oras or skopeo
    (bench.workdir / "home").mkdir(exist_ok=True)
    return env


def make_modelcar_row(
    bench: OciBench, host: str, ca: str, cert_dir: Path | None, artifact: Artifact, target: float
) -> Row:
    """fetcher --oci-path /models against skopeo copy + tar xzf of each layer, on the modelcar image."""
    ref = f"{host}/{artifact.name}"

    def script_cmd(dest: Path) -> list[str]:
        trust = ["--src-cert-dir", str(cert_dir)] if ca else ["--src-tls-verify=false"]
        return ["bash", "-c", MODELCAR_SCRIPT, "modelcar", ref, str(dest), *trust]

    n = len(artifact.manifest["layers"])
    title = f"modelcar image, {n} tar+gzip layers under /models, {'HTTPS' if ca else 'plain HTTP'}"
    return Row(
        "modelcar",
        title,
        fetcher_tool(bench, ref, ["--oci-path", "/models"], ca),
        [(OciTool("skopeo copy dir: + tar xzf of each layer", script_cmd, alternatives_env(bench), "tree"), target)],
        artifact=artifact,
    )


# --- reporting ---------------------------------------------------------------------------------------


def versions(bench: OciBench) -> list[str]:
    def out(cmd: list[str], pattern: str) -> str:
        with contextlib.suppress(OSError):
            p = subprocess.run(cmd, capture_output=True, text=True)
            if m := re.search(pattern, p.stdout + p.stderr):
                return m.group(1)
        return "?"

    oras_v = out(
        [str(VENVS / "oras" / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('oras'))"],
        r"(\S+)",
    )
    skopeo_v = out(["skopeo", "--version"], r"version (\S+)")
    registry_v = out(["dpkg-query", "-W", "-f", "${Version}", "docker-registry"], r"(\S+)")
    return [
        *D.machine(bench),
        f"- alternatives: skopeo {skopeo_v} (Debian), oras-py {oras_v} (PyPI, venvs/oras)",
        f"- server: docker-registry {registry_v} (Debian's, the CNCF distribution registry) in its own process on 127.0.0.1, "
        "filesystem storage in bench/.cache/oci/storage, anonymous",
    ]


def add_row(
    args: argparse.Namespace, tree: D.Tree, row: Row, out_rows: list[str], details: list[str], rounds: list[str]
) -> None:
    f_runs = row.runs["fetcher"]
    f_ok = [r for r in f_runs if r.ok]
    f_rss = max((r.rss_mib or 0 for r in f_ok), default=None)
    for tool, target in row.alternatives:
        a_runs = row.runs[tool.name]
        pairs = list(zip(f_runs, a_runs, strict=True))
        ratio = B.median([f.wall / a.wall for f, a in pairs if f.ok and a.ok])
        # Even rounds (1, 3, ...) run fetcher first, odd ones last.
        by_order = [
            B.median([f.wall / a.wall for i, (f, a) in enumerate(pairs) if i % 2 == k and f.ok and a.ok])
            for k in (0, 1)
        ]
        mets = []
        if target is not None and ratio is not None:
            mets.append(("yes" if ratio <= target else "**no**") + f" ({ratio:.2f} vs {target})")
        if f_rss is not None:
            mets.append(f"RSS {'yes' if f_rss <= args.rss_target else '**no**'}")
        failed_f, failed_a = len(f_runs) - len(f_ok), len([a for a in a_runs if not a.ok])
        if failed_f or failed_a:
            mets.append(f"FAILED runs: fetcher {failed_f}, alternative {failed_a}")
        target_s = (f"<= {target}x" if target is not None else "— (context)") + f", RSS <= {args.rss_target:.0f} MiB"
        out_rows.append(
            f"| {row.title} | {B.cell(tool.name)} | {B.fmt(B.median([r.wall for r in f_ok]))} | "
            f"{B.fmt(B.median([r.wall for r in a_runs if r.ok]))} | {B.fmt(ratio)}x | "
            f"{B.fmt(by_order[0])}x / {B.fmt(by_order[1])}x | {B.fmt(f_rss, '.0f')} | {target_s} | {'; '.join(mets) or '—'} |"
        )
    for name, rs in row.runs.items():
        ok = [r for r in rs if r.ok]
        walls = [r.wall for r in ok]
        md = B.median(walls)
        details.append(
            f"| {row.key} | {B.cell(name)} | {len(ok)}/{len(rs)} | {B.fmt(md)} | {B.fmt(min(walls) if walls else None)} | "
            f"{B.fmt(max(walls) if walls else None)} | {B.fmt(tree.size / md / 1e6 if md else None, '.0f')} | "
            f"{B.fmt(B.median([r.cpu for r in ok if r.cpu is not None]))} | "
            f"{B.fmt(B.median([float(r.extra['origin_cpu']) for r in ok]))} | "  # type: ignore[arg-type]
            f"{B.fmt(max((r.rss_mib or 0 for r in ok), default=None), '.0f')} |"
        )
    names = list(row.runs)
    for r in range(args.pairs):
        order = names if r % 2 == 0 else list(reversed(names))
        cells = ", ".join(f"{n} {row.runs[n][r].wall:.2f}{'' if row.runs[n][r].ok else ' FAILED'}" for n in order)
        rounds.append(f"| {row.key} | {r + 1} | {B.cell(cells)} |")


def floor_note(rows: list[Row]) -> list[str]:
    """How the floor client compares with each alternative: a target below that is out of any verifying client's reach."""
    notes = []
    for row in rows:
        floor = next((runs for name, runs in row.runs.items() if name.startswith("floor")), None)
        if floor is None:
            continue
        for tool, target in row.alternatives:
            if target is None or tool.name.startswith("floor"):
                continue
            pairs = zip(floor, row.runs[tool.name], strict=True)
            ratio = B.median([f.wall / a.wall for f, a in pairs if f.ok and a.ok])
            notes.append(
                f"floor, row {row.key}: bare Python GETs + sha256 + write take {B.fmt(ratio)}x {tool.name} "
                f"(median of rounds), against fetcher's target of {target}x."
            )
    return notes


def split_note(rows: list[Row]) -> list[str]:
    """fetcher's wall time by whether it split a shard into ranged parts (its "splitting" log events)."""
    lines = []
    for row in rows:
        ok = [r for r in row.runs["fetcher"] if r.ok]
        split = [r.wall for r in ok if int(r.extra.get("splits", 0) or 0)]  # type: ignore[call-overload]
        whole = [r.wall for r in ok if not int(r.extra.get("splits", 0) or 0)]  # type: ignore[call-overload]
        counts = ", ".join(str(r.extra.get("splits", "?")) for r in row.runs["fetcher"])
        lines.append(
            f"fetcher, row {row.key}: {len(split)} of {len(ok)} runs split at least one shard into ranged parts "
            f"(shards split per run: {counts}); median wall {B.fmt(B.median(split))} s in those, "
            f"{B.fmt(B.median(whole))} s in the others."
            + (
                " fetcher splits a file whose first 8 MiB came slower than --split-below (150 MB/s): here four shards "
                "start at once on 2 cores, so a first part can come at ~80-150 MB/s while the registry as a whole serves "
                "~700 MB/s; the ranged parts over more connections then cost CPU it does not have."
                if row.key == "modelpack"
                else ""
            )
        )
    return lines


def report(
    bench: OciBench, tree: D.Tree, rows: list[Row], profiles: dict[str, str], cmd_lines: list[str], elapsed: float
) -> str:
    args = bench.args
    https = bench.registry is not None and bench.registry.ca_file is not None
    out_rows = [
        "| row | alternative | fetcher median s | alternative median s | ratio (median of rounds) "
        "| ratio, rounds fetcher ran first / last | fetcher peak RSS MiB | target | met? |",
        "|---|---|---:|---:|---:|---|---:|---|---|",
    ]
    details = [
        "| row | tool | runs ok | median s | min s | max s | median MB/s | median CPU s (user+sys) | median registry CPU s | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rounds = ["| row | round | wall s of each tool, in the order run |", "|---|---:|---|"]
    for row in rows:
        add_row(args, tree, row, out_rows, details, rounds)
    if not any(row.key == "modelcar" for row in rows):
        out_rows.append(
            "| modelcar image (tar+gzip layers) | skopeo copy + tar xzf of each layer | — | — | — | — | — | <= 0.5x | "
            "not run here (`--rows`) |"
        )
    modelcar = next((row.artifact for row in rows if row.key == "modelcar" and row.artifact), None)
    failures = [
        f"- {row.key}, {name}, round {i + 1}: {B.cell(r.note)}"
        for row in rows
        for name, rs in row.runs.items()
        for i, r in enumerate(rs)
        if not r.ok
    ]
    shards = [p for p in tree.files if p.endswith(".safetensors")]
    small = [p for p in tree.files if p not in shards]
    shard_mb = B.median([int(tree.files[p]["size"]) / 1e6 for p in shards])
    text = [
        f"# fetcher benchmark: OCI registry{' (--quick)' if args.quick else ''}",
        "",
        f"Generated by `bench/.cache/venvs/tools/bin/python bench/oci.py{(' ' + shlex.join(args.argv)) if args.argv else ''}`; "
        f"took {elapsed / 60:.1f} min.",
        "",
        *versions(bench),
        f"- data: bench/dirs.py's tree as a ModelPack artifact (artifactType `{MODEL_ARTIFACT}`, config `{MODEL_CONFIG}`), "
        f"{tree.size / 1e6:.0f} MB in {len(tree.files)} layers, one per file: {len(shards)} `{WEIGHT}` layers of "
        f"{B.fmt(shard_mb, '.0f')} MB (fp16 values from N(0, 0.02)) and {len(small)} small `weight.config`/`doc` raw layers "
        f"({', '.join(small)}); every layer annotated with `{FILEPATH}` and `{TITLE}` (fetcher names files by the first, "
        "oras-py by the second). Pushed once with oras-py; kept in the registry's storage between runs.",
        *(
            [
                f"- modelcar data: the same files under `/models` of an ordinary image (config `{IMAGE_CONFIG}`, os linux, "
                f"rootfs.diff_ids), {len(modelcar.manifest['layers'])} `{TAR_GZIP}` layers, one per shard and one for "
                "the small files, as a COPY per group would make; each also holds the `models/` directory entry. Written "
                f"with Python's tarfile and gzip (zlib level {GZIP_LEVEL}: fp16 noise shrinks little), "
                f"{sum(int(d['size']) for d in modelcar.manifest['layers']) / 1e6:.0f} MB gzipped; cached in "
                "bench/.cache/data/ and pushed once through the registry's HTTP API (blob POST/PUT, manifest PUT)."
            ]
            if modelcar
            else []
        ),
        "- transport: "
        + (
            "HTTPS with a self-signed certificate (fetcher: SSL_CERT_FILE; skopeo: --src-cert-dir; oras-py: tls_verify)."
            if https
            else "plain HTTP on loopback, so fetcher runs with `--oci-plain-http`, skopeo with `--src-tls-verify=false`, "
            "oras-py with `insecure=True`."
        )
        + (
            f" Row capped: nginx in front of the registry serves every blob GET straight from the registry's storage "
            f"(ranges, `limit_rate {args.rate}` bytes/s per connection, plain HTTP) and proxies the rest (`/v2/`, manifests) "
            "to it, as a registry that redirects blob reads to object storage or a CDN capping each connection looks to a "
            "client; its registry CPU includes nginx's."
            if any(r.key == "capped" for r in rows)
            else ""
        ),
        f"- method: {args.pairs} round(s), the tools alternating (A B C, then C B A); ratio = median over rounds of "
        "fetcher's wall time / the alternative's in the same round. Each run gets a fresh dest on the same filesystem, removed "
        "afterwards, then `sync` (untimed). The page cache is not dropped: the registry's blobs are read once before timing, so "
        "it serves from RAM. CPU seconds (user+sys, children included) and peak RSS from `/usr/bin/time -v`; registry CPU: "
        "user+sys seconds the docker-registry process spent during the run, from /proc (on 2 cores, client and registry "
        "compete for the CPU). "
        + (
            "Every output is checked (untimed): for fetcher, oras-py and skopeo + tar every file's size and sha256, and nothing "
            "else in dest but `.fetcher/`; for skopeo alone every blob (config and layers) in its `dir:` layout by size and sha256."
            if args.verify_output
            else "Outputs are checked by size only (--no-verify-output)."
        ),
        "- what each verifies: fetcher checks every manifest and blob against its digest and publishes the model's files "
        "atomically, fsynced; skopeo checks every blob's digest but leaves blobs named by digest (no model files); oras-py "
        "checks nothing, names files by their title and leaves them in the page cache (row modelpack's 'oras-py pull, then "
        "sync' times it with its files made durable, as fetcher's are)."
        + (
            " Row modelcar: fetcher checks every blob's digest as above and unpacks the layers as it streams them; the "
            "alternative is skopeo's digest check, then GNU tar (gzip's CRC only), and honours no whiteouts (the image has none)."
            if modelcar
            else ""
        ),
        (
            f"- fetcher runs with `{args.fetcher_args}` added"
            if args.fetcher_args
            else "- fetcher runs with its defaults"
        )
        + ", from a snapshot of fetcher/ in venvs/runtime.",
        "",
        *out_rows,
        "",
        *split_note(rows),
        *floor_note(rows),
        "",
        "Per tool:",
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
        "Commands (DEST a fresh directory, HOST the registry on 127.0.0.1, CAPPED nginx in front of it):",
        "",
        *[f"- {ln}" for ln in cmd_lines],
    ]
    for key, profile in profiles.items():
        text += ["", f"Profile of one fetcher run, row {key}:", "", "```", profile, "```"]
    return "\n".join(text) + "\n"


# --- main --------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(
        prog="bench/oci.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="1 tensor (32 MiB) per shard and 1 round: a smoke test")
    ap.add_argument("--tensors", type=int, help="32 MiB tensors per shard (default 6: ~200 MB shards, ~805 MB in all)")
    ap.add_argument("--pairs", type=int, help="rounds (default 3, 1 with --quick)")
    ap.add_argument(
        "--rows",
        default="modelpack,capped,modelcar",
        help="comma-separated subset of modelpack,capped,modelcar (default: all three)",
    )
    ap.add_argument(
        "--rate", type=int, default=40_000_000, help="bytes/s per connection of row capped (default 40000000)"
    )
    ap.add_argument("--https", action="store_true", help="serve the registry over HTTPS with a self-signed certificate")
    ap.add_argument("--rss-target", type=float, default=100, help="fetcher's peak RSS target in MiB (default 100)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds before one run is given up")
    ap.add_argument(
        "--no-verify-output", dest="verify_output", action="store_false", help="check sizes only, not sha256"
    )
    ap.add_argument("--profile", action="store_true", help="also py-spy one fetcher run")
    ap.add_argument(
        "--fetcher-args", default="", help="extra fetcher options for every fetcher run, e.g. '--concurrency 4'"
    )
    ap.add_argument("--no-setup", action="store_true", help="skip making/updating the venvs and Debian packages")
    ap.add_argument(
        "--out",
        type=Path,
        help="results file (default bench/results-oci.md, bench/.cache/results-oci-quick.md with --quick)",
    )
    args = ap.parse_args()
    args.argv = sys.argv[1:]
    args.pairs = args.pairs or (1 if args.quick else 3)
    tensors = args.tensors or (1 if args.quick else 6)
    rows_wanted = args.rows.split(",")
    out_path = (
        args.out.resolve() if args.out else (CACHE / "results-oci-quick.md" if args.quick else HERE / "results-oci.md")
    )
    # bench.Bench and bench.machine read these (their single-file options): fetcher runs with its own defaults here.
    args.concurrency, args.part_size, args.limit_rate = 16, "8Mi", "none"
    started = time.monotonic()
    if not args.no_setup:
        setup()
    bench = OciBench(args)
    tree = D.prepare(bench, "work-oci", tensors)  # not bench.py's work/ nor dirs.py's
    registry: Registry | None = None
    capped: CappedBlobs | None = None
    try:
        registry = bench.registry = Registry(bench.logdir, args.https)
        artifact = push(registry, tree, bench.logdir)
        for digest in artifact.blobs:  # into the page cache before anything is timed
            with registry.blob_file(digest).open("rb") as f:
                while f.read(16 * MiB):
                    pass
        ca = str(registry.ca_file) if registry.ca_file else ""
        title = f"ModelPack artifact, {len(artifact.manifest['layers'])} raw layers, {'HTTPS' if ca else 'plain HTTP'}"
        rows = []
        if "modelpack" in rows_wanted:
            rows.append(make_row(bench, "modelpack", title, registry.host, ca, registry.cert_dir, artifact, (1.0, 0.5)))
        if "capped" in rows_wanted:
            capped = CappedBlobs(registry, args.rate, bench.logdir)
            title = f"the same, blobs capped at {args.rate / 1e6:.0f} MB/s per connection (nginx, plain HTTP)"
            rows.append(make_row(bench, "capped", title, capped.host, "", None, artifact, (None, None)))
            rows[-1].servers.append(capped.proc.pid)
        if "modelcar" in rows_wanted:
            image = push_modelcar(registry, tree)
            for digest in image.blobs:
                with registry.blob_file(digest).open("rb") as f:
                    while f.read(16 * MiB):
                        pass
            rows.append(make_modelcar_row(bench, registry.host, ca, registry.cert_dir, image, 0.5))
        cmd_lines = []
        for row in rows:
            for t in [row.fetcher] + [t for t, _ in row.alternatives]:
                line = shlex.join(t.cmd(Path("DEST")))
                line = line.replace(str(B.FETCHER_PY) + " -m fetcher", "fetcher").replace(str(VENVS) + "/", "venvs/")
                line = (
                    line.replace(registry.host, "HOST")
                    .replace(capped.host if capped else "\0", "CAPPED")
                    .replace(PULL_CODE, "<code below>")
                    .replace(MODELCAR_SCRIPT, "<script below>")
                    .replace(str(CACHE) + "/", "")
                )
                cmd_lines.append(f"{row.key}, {t.name}: `{line}`")
        if any(row.key != "modelcar" for row in rows):
            cmd_lines.append(f"oras-py's code (`python -c`, argv HOST REF DEST [CA]): `{PULL_CODE}`")
        if any(row.key == "modelcar" for row in rows):
            cmd_lines.append(
                f"the modelcar script (`bash -c`, argv REF DEST SKOPEO-TRUST-OPTIONS): `{MODELCAR_SCRIPT}`"
            )
        for row in rows:
            bench.run_row(row, tree, row.artifact or artifact)
        profiles = {}
        if args.profile:
            for row in rows:
                B.log(f"profile: one fetcher run of row {row.key} under py-spy")
                profiles[row.key] = bench.profile_tree(row)  # its Row has the key and fetcher that needs
        text = report(bench, tree, rows, profiles, cmd_lines, time.monotonic() - started)
        D.write_results(bench, rows, text, out_path)  # type: ignore[arg-type]  # oci's Row: the same key and runs
    finally:
        if capped:
            capped.stop()
        if registry:
            registry.stop()
        with contextlib.suppress(OSError):
            os.chdir(CACHE)
        shutil.rmtree(bench.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
