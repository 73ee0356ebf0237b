"""fetcher's main job, on loopback: serve a model over HTTP and S3, fetch it both ways.

Run through ``scripts/demo``. Everything it serves and fetches is under
demo-out/ (or $DEMO_OUT), so the result can be looked at afterwards.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import random
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(os.environ.get("DEMO_OUT") or ROOT / "demo-out")
FETCHER = [sys.executable, "-m", "fetcher"]


def build_model() -> bytes:
    """A small sentiment model, laid out like a Hugging Face checkpoint."""
    rng = random.Random(16)
    files = {
        "sentiment-model/config.json": json.dumps(
            {"architectures": ["DistilBertForSequenceClassification"], "id2label": {"0": "NEGATIVE", "1": "POSITIVE"}},
            indent=2,
        ).encode(),
        "sentiment-model/tokenizer.json": json.dumps(
            {"vocab": {w: i for i, w in enumerate(["good", "bad", "ok"])}}
        ).encode(),
        "sentiment-model/model.safetensors": rng.randbytes(4 * 1024 * 1024),
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def show_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        info = path.lstat()
        size = "" if path.is_dir() else f"{info.st_size:>10,}"
        print(f"    {stat.filemode(info.st_mode)} {info.st_uid:>5}:{info.st_gid:<5} {size:>10}  {relative}")


def fetch(title: str, *args: str, env: dict[str, str] | None = None) -> int:
    print(f"\n$ fetcher {' '.join(args)}", flush=True)  # before fetcher's own lines, when piped too
    process = subprocess.run([*FETCHER, *args, "--log-format", "console"], env=env, cwd=ROOT)
    print(f"  -> {title}: exit code {process.returncode}")
    return process.returncode


def main() -> int:
    shutil.rmtree(OUT, ignore_errors=True)
    served = OUT / "served"
    served.mkdir(parents=True)
    archive = build_model()
    digest = hashlib.sha256(archive).hexdigest()
    (served / "sentiment-model.tar.gz").write_bytes(archive)
    print(f"Generated a {len(archive) / 1e6:.1f} MB model archive, sha256 {digest}")

    requests: list[str] = []  # what the HTTP server was asked for

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            requests.append(self.requestline)

    handler = functools.partial(Quiet, directory=str(served))
    http = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{http.server_address[1]}/sentiment-model.tar.gz"

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's access log would drown fetcher's

    s3_port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    moto.start()
    s3_env = {
        **os.environ,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
        "AWS_ACCESS_KEY_ID": "demo",
        "AWS_SECRET_ACCESS_KEY": "demo-secret",
        "AWS_REGION": "us-east-1",
    }
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_env["AWS_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id="demo",
        aws_secret_access_key="demo-secret",
    )
    s3.create_bucket(Bucket="models")
    s3.put_object(Bucket="models", Key="sentiment/v1/sentiment-model.tar.gz", Body=archive)
    print(
        f"Serving it at {url}\n"
        f"        and s3://models/sentiment/v1/sentiment-model.tar.gz (moto, {s3_env['AWS_ENDPOINT_URL']})"
    )

    codes = []
    http_dest, s3_dest = OUT / "models-http", OUT / "models-s3"
    http_args = [
        "--source",
        url,
        "--dest",
        str(http_dest),
        "--sha256",
        digest,
        "--file-mode",
        "0444",
        "--dir-mode",
        "0555",
    ]
    print("\n== 1. Over HTTP, verified, unpacked, modes fixed")
    codes.append(fetch("fetched", *http_args))
    print(f"\n  {http_dest}:")
    show_tree(http_dest)

    print("\n== 2. From S3, the same model")
    codes.append(
        fetch(
            "fetched",
            "--source",
            "s3://models/sentiment/v1/sentiment-model.tar.gz",
            "--dest",
            str(s3_dest),
            "--sha256",
            digest,
            env=s3_env,
        )
    )
    print(f"\n  {s3_dest}:")
    show_tree(s3_dest)

    print("\n== 3. The pod restarts: the model is already there, no request is made")
    asked = len(requests)
    codes.append(fetch("skipped", *http_args))  # the same command, as the kubelet runs it again
    print(f"  requests the HTTP server received: {len(requests) - asked}")
    skipped = len(requests) == asked

    print("\n== 4. A wrong checksum: exit 4, and nothing unverified is published")
    wrong = fetch("refused", "--source", url, "--dest", str(OUT / "models-wrong"), "--sha256", "0" * 64)
    left = OUT / "models-wrong"
    print(f"  {left} {'holds ' + str(os.listdir(left)) if left.exists() else 'was not left behind'}")

    moto.stop()
    http.shutdown()
    ok = codes == [0, 0, 0] and skipped and wrong == 4
    print(f"\nDemo {'passed' if ok else 'FAILED'}: results are in {OUT}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
