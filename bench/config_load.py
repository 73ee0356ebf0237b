"""How long fetcher takes to read and plan a large --config: CPU time and peak RSS of one
`python -m fetcher --dry-run --config FILE --log-level error`, the whole process from start to exit.

Two generated configs, as in the issue and in tests/test_cli_edge.py: a ~5 MB JSON config of 87,000
artifacts (the issue measured 17.5 s and ~500 MB on it before the fix), and a YAML one of 30,000.
fetcher runs with bench/run's runtime venv (its runtime dependencies only, as in the image) when it
exists, else the repo's .venv, from this checkout's fetcher/ (PYTHONPATH). CPU time (user + sys) is
what is compared: wall time is shown too, but on a shared machine it measures the neighbours.

    python3 bench/config_load.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = Path(os.environ.get("BENCH_CACHE", HERE / ".cache")).resolve()
PYTHONS = [CACHE / "venvs" / "runtime" / "bin" / "python", REPO / ".venv" / "bin" / "python"]


def json_config(path: Path) -> int:
    entries = [{"source": f"http://h/models/m{i}.bin", "dest": f"/tmp/d/{i}"} for i in range(87_000)]
    path.write_text(json.dumps({"artifacts": entries}))
    return len(entries)


def yaml_config(path: Path) -> int:
    body = "".join(f"  - source: http://h/models/m{i}.bin\n    dest: /tmp/d/{i}\n" for i in range(30_000))
    path.write_text("artifacts:\n" + body)
    return 30_000


def run_once(python: Path, config: Path, expect: int, env: dict[str, str], cwd: Path) -> tuple[float, float, float]:
    """(CPU s, peak RSS MiB, wall s) of one dry run, from the child's own rusage (wait4)."""
    cmd = [str(python), "-m", "fetcher", "--dry-run", "--config", str(config), "--log-level", "error"]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            sys.exit(f"{config.name}: exit {proc.returncode}\n{err.read().decode(errors='replace')[-2000:]}")
        planned = len(json.loads(out.read())["artifacts"])
        if planned != expect:
            sys.exit(f"{config.name}: planned {planned} artifacts, expected {expect}")
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, wall  # ru_maxrss is in KiB on Linux


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="runs per config; medians are reported (default 3)")
    args = ap.parse_args()
    python = next((p for p in PYTHONS if p.exists()), None)
    if python is None:
        sys.exit("no Python with fetcher's dependencies: run bench/run (runtime venv) or scripts/setup (.venv)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FETCHER_", "AWS_"))}
    env["PYTHONPATH"] = str(REPO)  # this checkout's fetcher/, whatever the venv has installed
    with tempfile.TemporaryDirectory(prefix="config-load-") as tmp:
        work = Path(tmp)  # the cwd too: python -m puts it first on sys.path
        configs = []
        for name, make in (("fetcher.json", json_config), ("fetcher.yaml", yaml_config)):
            path = work / name
            count = make(path)
            configs.append((path, count))
        small = work / "small.json"
        small.write_text(json.dumps({"artifacts": [{"source": "http://h/m", "dest": "/tmp/d/m"}]}))
        run_once(python, small, 1, env, work)  # warm-up: byte-compiles fetcher/, fills the page cache
        results: dict[Path, list[tuple[float, float, float]]] = {path: [] for path, _ in configs}
        for _ in range(args.rounds):  # interleaved, so a busy moment does not land on one config only
            for path, count in configs:
                results[path].append(run_once(python, path, count, env, work))
        version = subprocess.run(
            [str(python), "-c", "import sys; print(sys.version.split()[0])"], capture_output=True, text=True, check=True
        ).stdout.strip()
        where = python.relative_to(REPO) if python.is_relative_to(REPO) else python
        print(
            f"`python -m fetcher --dry-run --config FILE --log-level error`, Python {version} ({where}), "
            f"{os.cpu_count()} cores, load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}; "
            f"medians of {args.rounds} runs (min-max)\n"
        )
        print("| config | artifacts | size MB | CPU s (user+sys) | peak RSS MiB | wall s |")
        print("|---|---:|---:|---:|---:|---:|")
        for path, count in configs:
            cpu, rss, wall = (sorted(col) for col in zip(*results[path], strict=True))
            print(
                f"| {path.suffix[1:].upper()} | {count:,} | {path.stat().st_size / 1e6:.1f} "
                f"| {statistics.median(cpu):.2f} ({cpu[0]:.2f}-{cpu[-1]:.2f}) "
                f"| {statistics.median(rss):.0f} ({rss[0]:.0f}-{rss[-1]:.0f}) "
                f"| {statistics.median(wall):.2f} ({wall[0]:.2f}-{wall[-1]:.2f}) |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
