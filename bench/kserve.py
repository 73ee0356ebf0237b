"""KServe rows of the benchmark (issue 14): fetcher against KServe's own storage initializer.

The directory tree of bench/dirs.py, fetched whole by ``kserve-storage`` (KServe's storage initializer,
PyPI's package, run as its image's entrypoint runs it) and by fetcher, on the same loopback servers, in one
run, the two alternating:

- an S3 prefix in moto, with the env KServe's webhook gives the init container for an S3 secret
  (fetcher also checks every file against ``--sha256sums``; kserve-storage checks nothing);
- ``hf://org/model`` from the fake hub (tests/fakehub.py), with ``HF_ENDPOINT`` and the Hugging Face
  variables the webhook adds to every storage-initializer (fetcher checks every file against the hub's
  digests; kserve-storage's ``snapshot_download`` checks nothing).

Run ``bench/run --help`` once first (it makes the venvs, kserve-storage's among them), then
``bench/.cache/venvs/tools/bin/python bench/kserve.py [--pairs N] [--quick] [--profile]``.
Everything else (the tree, the servers, timing, checking outputs, the report) comes from bench/dirs.py
and bench/bench.py; see bench/README.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import dirs as D  # bench/dirs.py: the tree, the servers, the runs and the report

import bench as B  # bench/bench.py: this script's directory is first on sys.path

HERE, CACHE, VENVS = B.HERE, B.CACHE, B.VENVS
TARGET = 0.5  # issue 14: fetcher's wall time / kserve-storage's, each row

# KServe's python/storage-initializer/scripts/initializer-entrypoint (kserve/kserve, master), which the
# storage-initializer image runs with the args [storageUri, /mnt/models]; the package on PyPI does not
# ship it. Without its confidential-serving tail (off unless CONFIDENTIAL_ENABLED=true).
ENTRYPOINT = """\
import os, sys
from kserve_storage import Storage
from kserve_storage.logging import configure_logging, logger
configure_logging()
if len(sys.argv) < 3 or len(sys.argv) % 2 != 1:
    print("Usage: initializer-entrypoint src_uri_0 dest_path_0 ... src_uri_n dest_path_n")
    sys.exit(1)
src_uris, dest_paths = sys.argv[1::2], sys.argv[2::2]
logger.info("Initializing, args: (src_uri, dest_path): %s", list(zip(src_uris, dest_paths)))
for dest in dest_paths:
    if dest:
        os.makedirs(dest, exist_ok=True)
try:
    Storage.download_files(src_uris, dest_paths)
except Exception as e:
    logger.error("Storage initialization failed: %s", e)
    sys.exit(1)
"""

# What pkg/utils/storage.go's AddDefaultHuggingFaceEnvVars adds to every storage-initializer container
# (pkg/webhook/admission/pod/storage_initializer_injector.go), whatever its URI.
KSERVE_HF_ENV = {
    "HF_HUB_ENABLE_HF_TRANSFER": "1",
    "HF_XET_HIGH_PERFORMANCE": "1",
    "HF_XET_NUM_CONCURRENT_RANGE_GETS": "8",
}


class KServeBench(D.DirBench):
    LOG_PREFIX = "kserve-"  # logs/kserve-<time>/


def kserve_s3_env(moto: B.Moto) -> dict[str, str]:
    """The env pkg/credentials/s3 builds from a secret with s3-endpoint 127.0.0.1:PORT, s3-usehttps "0".

    Plus bench.py's AWS_CONFIG_FILE, AWS_SHARED_CREDENTIALS_FILE and AWS_EC2_METADATA_DISABLED, so that
    nothing of this machine's own AWS setup leaks in (a pod has none)."""
    host = moto.endpoint.removeprefix("http://")
    return {
        **{k: v for k, v in B.S3_ENV.items() if k != "AWS_REGION"},
        "S3_USE_HTTPS": "0",
        "S3_ENDPOINT": host,
        "AWS_ENDPOINT_URL": f"http://{host}",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def kserve_tool(bench: D.DirBench, uri: str, env: dict[str, str]) -> D.TreeTool:
    """The storage initializer, as its image runs it: entrypoint SRC DEST, in a fresh HF_HOME (a fresh pod)."""
    py = str(VENVS / "kserve" / "bin" / "python")

    def cmd(dest: Path) -> list[str]:
        home = dest.parent / (dest.name + ".hfhome")
        return ["env", f"HF_HOME={home}", py, "-c", ENTRYPOINT, uri, str(dest)]

    full = {**bench.base_env, **env}
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HOME", "HF_HUB_OFFLINE"):
        full.pop(k, None)
    return D.TreeTool("kserve-storage (no checksum)", cmd, full)


def versions(bench: D.DirBench) -> list[str]:
    pkg = D.pkg
    return [
        *D.machine(bench),
        f"- alternative: kserve-storage {pkg('kserve', 'kserve-storage')} from PyPI (huggingface_hub "
        f"{pkg('kserve', 'huggingface_hub')}, hf-xet {pkg('kserve', 'hf_xet')}, unused: the fake hub sends no Xet headers; "
        f"boto3 {pkg('kserve', 'boto3')}), run as KServe's storage-initializer image runs it (its entrypoint, below)",
        "- servers: tests/fakehub.py in its own process (hub API on 127.0.0.1, LFS files redirected to its CDN on "
        f"127.0.0.2), moto {pkg('tools', 'moto')} via bench/moto_server.py in its own process; all on loopback",
    ]


def notes(moto: B.Moto | None) -> tuple[str, ...]:
    s3_env = "(not run)"
    if moto:
        host = moto.endpoint.removeprefix("http://")
        s3_env = " ".join(f"{k}={v}" for k, v in kserve_s3_env(moto).items()).replace(host, "HOST:PORT")
    return (
        "Both tools run with the env KServe's webhook gives a storage-initializer container:",
        "",
        f"- row s3: `{s3_env}` "
        "(what pkg/credentials/s3 makes of a secret annotated `serving.kserve.io/s3-endpoint: HOST:PORT`, "
        '`s3-usehttps: "0"`, `s3-region: us-east-1`; fetcher takes the endpoint from AWS_ENDPOINT_URL)',
        f"- row hf: `HF_ENDPOINT=HUB {' '.join(f'{k}={v}' for k, v in KSERVE_HF_ENV.items())}` (the last three are "
        "added to every storage-initializer by the webhook; huggingface_hub 1.x and later no longer use hf_transfer, "
        "and the fake hub serves no Xet, so they change nothing here)",
        "",
        "kserve-storage downloads an S3 prefix with a `multiprocessing.Pool` of `S3_MAX_FILE_CONCURRENCY` (4) processes, "
        "each file by boto3's `download_file` (its default TransferConfig: ranged parts of 8 MiB over up to 10 threads); "
        "an hf:// repo with `snapshot_download(repo_id, revision=None, local_dir=DEST)`. Its peak RSS is "
        "`/usr/bin/time -v`'s, the largest of its processes, not their sum; its CPU seconds include the pool's.",
        "",
        "`$ENTRYPOINT` is KServe's `python/storage-initializer/scripts/initializer-entrypoint` without its "
        "confidential-serving tail (off unless `CONFIDENTIAL_ENABLED=true`); the PyPI package does not ship it:",
        "",
        "```python",
        ENTRYPOINT.rstrip(),
        "```",
    )


def main() -> int:
    ap = argparse.ArgumentParser(
        prog="bench/kserve.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    D.add_tree_options(ap, "kserve", "s3,hf")
    args, tensors, rows_wanted, out_path = D.parse_tree_options(ap, "kserve")
    # bench.Bench reads these (its single-file options): fetcher runs with its own defaults here.
    args.concurrency, args.part_size, args.limit_rate = 16, "8Mi", "none"
    started = time.monotonic()
    if not args.no_setup:
        D.setup_servers()
    bench = KServeBench(args)
    tree = D.prepare(bench, "work-kserve", tensors)
    hubs: list[D.Hub] = []
    moto: B.Moto | None = None
    try:
        rows: list[D.Row] = []
        for key in rows_wanted:
            if key == "s3":
                moto = D.start_moto(bench, tree)
                url, env = f"s3://{B.S3_BUCKET}/{D.S3_PREFIX}", kserve_s3_env(moto)
                fetcher = D.fetcher_tool(bench, url, ["--sha256sums", str(tree.sums)], env)
                title, pid = "S3 prefix (fetcher: --sha256sums)", moto.proc.pid
            elif key == "hf":
                hubs.append(D.Hub(tree.root, None, bench.logdir / "fakehub.log"))
                B.log(f"fake hub: {hubs[0].endpoint} (CDN {hubs[0].cdn}); commit {hubs[0].commit}")
                url, env = f"hf://{D.HF_REPO}", {"HF_ENDPOINT": hubs[0].endpoint, **KSERVE_HF_ENV}
                fetcher = D.fetcher_tool(bench, url, [], env)
                title, pid = "hf:// repo from the hub (fetcher: the hub's digests)", hubs[0].proc.pid
            else:
                ap.error(f"unknown row {key!r}: s3 or hf")
            rows.append(D.Row(key, title, fetcher, [(kserve_tool(bench, url, env), TARGET)], pid))
        bench.hubs = hubs
        cmd_lines = [
            ln.replace(shlex.quote(ENTRYPOINT), '"$ENTRYPOINT"')
            for ln in D.command_lines(bench, tree, rows, hubs, moto)
        ]
        profiles = bench.run_rows(rows, tree)
        text = D.report(
            bench,
            tree,
            rows,
            profiles,
            cmd_lines,
            time.monotonic() - started,
            heading="KServe's storage initializer (kserve-storage)",
            script="bench/kserve.py",
            version_lines=versions(bench),
            notes=notes(moto),
        )
        D.write_results(bench, rows, text, out_path)
    finally:
        D.stop_servers(bench, hubs, moto)
    return 0


if __name__ == "__main__":
    sys.exit(main())
