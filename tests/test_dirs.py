"""Models as directories: S3 prefixes through moto's real server, and mounted folders.

What a user sees: exit codes, the files in dest, the log lines, and what the
server was asked for (moto's request log is not needed: the bucket's contents
decide what may arrive).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import S3, Origin, run_fetcher, sha256, tree
from tests.faults_support import Background, S3Front

SHARD = random.Random(11).randbytes(3 * 2**20 + 123)  # split into parts at --part-size 1Mi
MODEL = {
    "config.json": b'{"hidden_size": 64}\n',
    "tokenizer/vocab.txt": b"good\nbad\n",
    "model-00001-of-00002.safetensors": SHARD,
    "model-00002-of-00002.safetensors": SHARD[::-1],
}


def _bucket(s3: S3, name: str, files: dict[str, bytes], prefix: str = "models/llama/") -> str:
    for path, data in files.items():
        s3.put(name, prefix + path, data)
    return f"s3://{name}/{prefix}"


def _sums(files: dict[str, bytes], path: Path) -> Path:
    path.write_text("".join(f"{sha256(data)}  {name}\n" for name, data in files.items()))
    return path


def test_an_s3_prefix_is_fetched_whole_and_verified_against_sha256sums(s3: S3, tmp_path: Path) -> None:
    source = _bucket(s3, "dir-basic", MODEL)
    s3.put("dir-basic", "models/llama-hf/other.bin", b"a sibling that shares only a string prefix")
    sums = _sums(MODEL, tmp_path / "SHA256SUMS")
    dest = tmp_path / "dest"

    run = run_fetcher(
        "--source", source, "--dest", str(dest), "--sha256sums", str(sums), "--part-size", "1Mi", env=s3.env
    )

    assert run.code == 0, run.stderr
    assert tree(dest) == MODEL  # no llama-hf/other.bin: a sibling prefix is never included
    # Without --file-mode every file is 0644, a shard put together from ranged parts too: a
    # server running as another user must read them all.
    assert {p: oct(stat.S_IMODE((dest / p).stat().st_mode)) for p in MODEL} == {p: "0o644" for p in MODEL}
    published = run.event("published")
    assert published["format"] == "directory"
    assert published["verified"] == len(MODEL)
    marker = json.loads(next((dest / ".fetcher").glob("*.json")).read_text())
    assert {o["path"]: o["digest"] for o in marker["objects"]} == {p: f"sha256:{sha256(d)}" for p, d in MODEL.items()}
    assert not list((dest / ".fetcher").glob("download-*"))  # the spool went with the publish


def test_a_key_without_an_object_but_with_objects_under_it_is_a_directory(s3: S3, tmp_path: Path) -> None:
    _bucket(s3, "dir-implicit", {"a.json": b"{}", "b/c.txt": b"c"})
    run = run_fetcher("--source", "s3://dir-implicit/models/llama", "--dest", str(tmp_path), env=s3.env)
    assert run.code == 0, run.stderr
    assert tree(tmp_path) == {"a.json": b"{}", "b/c.txt": b"c"}
    assert "took it as the directory" in run.event("resolved")["note"]


def test_more_than_a_thousand_objects_and_folder_markers(s3: S3, tmp_path: Path) -> None:
    s3.client.create_bucket(Bucket="dir-many")
    files = {f"shard/{i:04d}.txt": str(i).encode() for i in range(1005)}
    for name, data in files.items():
        s3.client.put_object(Bucket="dir-many", Key=f"p/{name}", Body=data)
    s3.client.put_object(Bucket="dir-many", Key="p/shard/", Body=b"")  # a console "folder"
    run = run_fetcher("--source", "s3://dir-many/p/", "--dest", str(tmp_path), env=s3.env, timeout=300)
    assert run.code == 0, run.stderr
    assert tree(tmp_path) == files
    assert run.event("files not verified")["count"] == 1005  # said once, with the count


@pytest.mark.fault(
    "a hostile S3 key (.., absolute, colliding, under .fetcher): exit 5, nothing published", exit=5, area="directory"
)
@pytest.mark.parametrize(
    ("keys", "why"),
    [
        (["p/a/../../x"], "'..' in its path"),
        (["p//abs"], "absolute path"),
        (["p/a//b", "p/a/b"], "lands on 'a/b'"),
        (["p/a", "p/a/b"], "is a file"),
        (["p/.fetcher/x"], "fetcher's state directory"),
    ],
)
def test_hostile_keys_are_exit_5_before_anything_is_published(
    s3: S3, tmp_path: Path, keys: list[str], why: str
) -> None:
    bucket = f"dir-hostile-{abs(hash(tuple(keys))) % 10**8}"
    s3.client.create_bucket(Bucket=bucket)
    for key in keys:
        s3.client.put_object(Bucket=bucket, Key=key, Body=b"x")
    run = run_fetcher("--source", f"s3://{bucket}/p/", "--dest", str(tmp_path / "dest"), env=s3.env)
    assert run.code == 5, run.stderr
    assert why in run.error
    assert not (tmp_path / "dest").exists()


@pytest.mark.fault("a file listed in --sha256sums missing from the prefix: exit 4", exit=4, area="directory")
def test_sha256sums_is_the_pin_missing_is_exit_4_unlisted_is_left_out(s3: S3, tmp_path: Path) -> None:
    source = _bucket(s3, "dir-pin", {"a.txt": b"a", "extra.txt": b"not listed"})
    sums = tmp_path / "sums"
    sums.write_text(f"# made by sha256sum\n\n{sha256(b'a')} *./a.txt\n")
    run = run_fetcher("--source", source, "--dest", str(tmp_path / "d1"), "--sha256sums", str(sums), env=s3.env)
    assert run.code == 0, run.stderr
    assert tree(tmp_path / "d1") == {"a.txt": b"a"}
    assert run.event("downloading")["left_out"] == 1

    sums.write_text(f"{sha256(b'a')}  a.txt\n{sha256(b'b')}  missing.txt\n")
    run = run_fetcher("--source", source, "--dest", str(tmp_path / "d2"), "--sha256sums", str(sums), env=s3.env)
    assert run.code == 4
    assert "'missing.txt' is listed in --sha256sums sums but missing from" in run.error


@pytest.mark.fault("an S3 object that does not match --sha256sums: exit 4, nothing published", exit=4, area="directory")
def test_a_wrong_digest_in_sha256sums_is_exit_4_and_nothing_is_published(s3: S3, tmp_path: Path) -> None:
    source = _bucket(s3, "dir-wrong", MODEL)
    sums = _sums(MODEL | {"config.json": b"other"}, tmp_path / "sums")
    dest = tmp_path / "dest"
    run = run_fetcher("--source", source, "--dest", str(dest), "--sha256sums", str(sums), env=s3.env)
    assert run.code == 4
    assert "config.json: sha256 mismatch" in run.error
    assert tree(dest) == {}


@pytest.mark.fault(
    "a malformed --sha256sums line: exit 2 naming the line, before any request", exit=2, area="directory"
)
def test_a_bad_sha256sums_line_is_exit_2_with_its_number(s3: S3, tmp_path: Path) -> None:
    sums = tmp_path / "sums"
    sums.write_text(f"{sha256(b'a')}  a.txt\nnot a sum line\n")
    run = run_fetcher("--source", "s3://b/p/", "--dest", str(tmp_path / "d"), "--sha256sums", str(sums), env=s3.env)
    assert run.code == 2
    assert "line 2" in run.error


def test_s3_checksum_sha256_verifies_without_a_manifest(s3: S3, tmp_path: Path) -> None:
    s3.client.create_bucket(Bucket="dir-checksum")
    for name, data in MODEL.items():
        s3.client.put_object(Bucket="dir-checksum", Key=f"p/{name}", Body=data, ChecksumAlgorithm="SHA256")
    run = run_fetcher("--source", "s3://dir-checksum/p/", "--dest", str(tmp_path), "--part-size", "1Mi", env=s3.env)
    assert run.code == 0, run.stderr
    assert tree(tmp_path) == MODEL
    assert run.all("files not verified") == []
    assert run.event("published")["verified"] == len(MODEL)


def test_sha256_with_a_directory_is_a_usage_error(s3: S3, tmp_path: Path) -> None:
    run = run_fetcher("--source", "s3://b/p/", "--dest", str(tmp_path), "--sha256", "0" * 64, env=s3.env)
    assert run.code == 2
    assert "--sha256sums" in run.error


def test_include_and_exclude_as_in_huggingface_hub(s3: S3, tmp_path: Path) -> None:
    files = {"a.json": b"1", "original/params.json": b"2", "w.bin": b"3", "w.safetensors": b"4"}
    source = _bucket(s3, "dir-select", files)
    run = run_fetcher(
        "--source", source, "--dest", str(tmp_path), "--include", "*.json", "--include", "*.safetensors",
        "--exclude", "original/", env=s3.env,
    )  # fmt: skip
    assert run.code == 0, run.stderr
    assert tree(tmp_path) == {"a.json": b"1", "w.safetensors": b"4"}


def test_a_restart_skips_with_one_listing_and_refetches_when_the_prefix_changed(s3: S3, tmp_path: Path) -> None:
    source = _bucket(s3, "dir-restart", {"a.txt": b"a", "b.txt": b"b"})
    dest = tmp_path / "dest"
    assert run_fetcher("--source", source, "--dest", str(dest), env=s3.env).code == 0
    again = run_fetcher("--source", source, "--dest", str(dest), env=s3.env)
    assert again.code == 0
    assert again.event("already present")

    s3.put("dir-restart", "models/llama/b.txt", b"b, version 2")
    third = run_fetcher("--source", source, "--dest", str(dest), env=s3.env)
    assert third.code == 0, third.stderr
    assert "fetching again" in [e["event"] for e in third.events]
    assert tree(dest) == {"a.txt": b"a", "b.txt": b"b, version 2"}


def test_a_restart_pinned_by_sha256sums_needs_no_network(s3: S3, tmp_path: Path) -> None:
    source = _bucket(s3, "dir-offline", {"a.txt": b"a"})
    sums = _sums({"a.txt": b"a"}, tmp_path / "sums")
    dest = tmp_path / "dest"
    assert run_fetcher("--source", source, "--dest", str(dest), "--sha256sums", str(sums), env=s3.env).code == 0
    with socket.socket() as closed:  # an endpoint where nothing listens
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}"
    offline = s3.env | {"AWS_ENDPOINT_URL": dead}
    again = run_fetcher("--source", source, "--dest", str(dest), "--sha256sums", str(sums), env=offline)
    assert again.code == 0, again.stderr
    assert again.event("already present")


def test_dry_run_lists_each_file_with_its_size_and_checksum_origin(s3: S3, tmp_path: Path) -> None:
    source = _bucket(s3, "dir-dry", {"a.txt": b"a", "b.txt": b"bb"})
    sums = _sums({"a.txt": b"a"}, tmp_path / "sums")
    run = run_fetcher(
        "--source", source, "--dest", str(tmp_path / "d"), "--sha256sums", str(sums), "--dry-run", env=s3.env
    )
    assert run.code == 0, run.stderr
    (artifact,) = json.loads(run.stdout)["artifacts"]
    assert artifact["files"] == [
        {"path": "a.txt", "size": 1, "checksum": f"sha256:{sha256(b'a')} (from --sha256sums sums)"}
    ]
    assert artifact["left_out"] == 1
    assert not (tmp_path / "d").exists()


# --- mounted folders ----------------------------------------------------------------------


def _folder(root: Path) -> Path:
    for path, data in MODEL.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    return root


def test_a_folder_is_copied_and_verified(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "pvc" / "llama")
    os.symlink("config.json", folder / "config-link.json")  # a link inside: its content is copied
    sums = _sums(MODEL, tmp_path / "sums")
    run = run_fetcher(
        "--source", f"file://{folder}/", "--dest", str(tmp_path / "dest"), "--sha256sums", str(sums),
        "--file-mode", "0444", "--part-size", "1Mi",
    )  # fmt: skip
    assert run.code == 0, run.stderr
    assert tree(tmp_path / "dest") == MODEL
    assert (tmp_path / "dest" / "config.json").stat().st_mode & 0o777 == 0o444


@pytest.mark.fault("a folder holding a link outside it, or a FIFO: exit 5", exit=5, area="directory")
@pytest.mark.parametrize("kind", ["outside", "fifo"])
def test_a_link_outside_or_a_fifo_in_a_folder_is_exit_5(tmp_path: Path, kind: str) -> None:
    folder = _folder(tmp_path / "pvc")
    if kind == "outside":
        (tmp_path / "secret").write_text("no")
        os.symlink(tmp_path / "secret", folder / "escape")
    else:
        os.mkfifo(folder / "pipe")
    run = run_fetcher("--source", f"file://{folder}/", "--dest", str(tmp_path / "dest"))
    assert run.code == 5, run.stderr
    assert not (tmp_path / "dest").exists()


def test_a_folder_restart_names_the_file_that_changed(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "pvc")
    dest = tmp_path / "dest"
    assert run_fetcher("--source", f"file://{folder}", "--dest", str(dest)).code == 0
    (dest / "config.json").write_text("edited by hand")
    again = run_fetcher("--source", f"file://{folder}", "--dest", str(dest))
    assert again.code == 0, again.stderr
    assert "config.json changed since it was published" in again.event("fetching again")["reason"]
    assert tree(dest) == MODEL


def _kill_once(first: Background, reached: Callable[[], bool], front: S3Front) -> int:
    """kill -9 the run once ``reached`` holds, then lift the front's trickle; how many requests it had seen."""
    deadline = time.monotonic() + 60
    while not reached():
        assert first.process.poll() is None and time.monotonic() < deadline, "".join(first.lines)
        time.sleep(0.05)
    first.process.kill()
    first.finish()
    front.trickle = []
    return len(front.requests)


@pytest.mark.fault("kill -9 mid-directory: the restart keeps every verified file", exit=0, area="directory")
def test_kill_9_mid_directory_then_a_restart_keeps_every_verified_file(
    s3: S3, s3_front: S3Front, tmp_path: Path
) -> None:
    small = {f"tok/{i}.json": f'{{"n": {i}}}'.encode() for i in range(4)}
    files = small | {"model.safetensors": SHARD}
    source = _bucket(s3, "dir-kill", files)
    sums = _sums(files, tmp_path / "sums")
    dest = tmp_path / "dest"
    args = ("--source", source, "--dest", str(dest), "--sha256sums", str(sums), "--part-size", "1Mi")
    s3_front.trickle = [100_000] * 64  # every GET slow: a shard's part takes seconds, a small file a moment
    spooled = dest / ".fetcher"

    def small_files_verified() -> bool:
        return len([p for p in spooled.glob("download-*/files/*") if not p.name.endswith(".incomplete")]) >= len(small)

    before = _kill_once(Background(*args, "--concurrency", "2", env=s3_front.env), small_files_verified, s3_front)

    again = run_fetcher(*args, env=s3_front.env)

    assert again.code == 0, again.stderr
    assert tree(dest) == files
    fetched = {r.path.split("?")[0] for r in s3_front.requests[before:] if r.method == "GET"}
    assert not any(name in path for path in fetched for name in small), fetched  # verified files were kept
    assert any("model.safetensors" in path for path in fetched)
    assert again.event("resuming")["files_verified_before"] == len(small)


@pytest.mark.fault("kill -9 mid-stream: the restart fetches only the parts not journalled", exit=0, area="directory")
def test_kill_9_mid_stream_then_a_restart_fetches_only_what_was_not_journalled(
    s3: S3, s3_front: S3Front, tmp_path: Path
) -> None:
    big = random.Random(12).randbytes(12 * 2**20 + 7)
    files = {"big.bin": big, "config.json": b"{}"}
    source = _bucket(s3, "dir-stream-kill", files)
    sums = _sums(files, tmp_path / "sums")
    dest = tmp_path / "dest"
    args = ("--source", source, "--dest", str(dest), "--sha256sums", str(sums), "--part-size", "1Mi")
    args += ("--split-below", "1")  # one stream, however slowly it comes
    s3_front.trickle = [10**9, 4_000_000, 4_000_000]  # the listing at once, big.bin over seconds

    def eight_parts_journalled() -> bool:
        journals = (dest / ".fetcher").glob("download-*/parts/*/journal")
        return sum(len(j.read_text().splitlines()) - 1 for j in journals) >= 8

    before = _kill_once(Background(*args, "--concurrency", "2", env=s3_front.env), eight_parts_journalled, s3_front)

    again = run_fetcher(*args, env=s3_front.env)

    assert again.code == 0, again.stderr
    assert tree(dest) == files
    gets = [r for r in s3_front.requests[before:] if "big.bin" in r.path and r.method == "GET"]
    ranges = [r.headers.get("Range", "") for r in gets]
    assert ranges and all(r.startswith("bytes=") for r in ranges), ranges
    assert min(int(r.removeprefix("bytes=").split("-")[0]) for r in ranges) >= 8 * 2**20, ranges


def test_a_config_file_takes_the_directory_keys(s3: S3, tmp_path: Path) -> None:
    files = {"a.json": b"1", "b.bin": b"2", "c.json": b"3"}
    source = _bucket(s3, "dir-config", files)
    sums = _sums(files, tmp_path / "sums")
    config = tmp_path / "fetcher.yaml"
    config.write_text(
        f"dest: {tmp_path / 'dest'}\n"
        "artifacts:\n"
        f"  - source: {source}\n"
        f"    sha256sums: {sums}\n"
        "    include: ['*.json']\n"
        "    exclude:\n      - c.*\n"
    )
    run = run_fetcher("--config", str(config), env=s3.env)
    assert run.code == 0, run.stderr
    assert tree(tmp_path / "dest") == {"a.json": b"1"}
    env = s3.env | {"FETCHER_INCLUDE": "*.json\n*.bin", "FETCHER_EXCLUDE": "a.*"}
    run = run_fetcher("--source", source, "--dest", str(tmp_path / "env"), env=env)
    assert run.code == 0, run.stderr
    assert tree(tmp_path / "env") == {"b.bin": b"2", "c.json": b"3"}


def test_sha256sums_with_one_file_is_a_usage_error(tmp_path: Path) -> None:
    run = run_fetcher("--source", "https://example.com/m.bin", "--dest", str(tmp_path), "--sha256sums", "/x")
    assert run.code == 2
    assert "--sha256sums applies to a directory" in run.error


@pytest.mark.fault("a directory file cut mid-body: resumed at the byte where it broke", exit=0, area="directory")
def test_a_cut_file_resumes_at_the_byte_where_it_broke(s3: S3, s3_front: S3Front, tmp_path: Path) -> None:
    files = {"w.bin": SHARD}
    source = _bucket(s3, "dir-cut", files)
    sums = _sums(files, tmp_path / "sums")
    s3_front.cuts = [10**9, 1_000_000]  # the listing whole, then the file cut
    run = run_fetcher(
        "--source", source, "--dest", str(tmp_path / "dest"), "--sha256sums", str(sums), "--concurrency", "1",
        env=s3_front.env,
    )  # fmt: skip
    assert run.code == 0, run.stderr
    assert tree(tmp_path / "dest") == files
    ranges = [r.headers.get("Range") for r in s3_front.gets() if "w.bin" in r.path]
    assert ranges[-1] is not None and ranges[-1].startswith("bytes=") and ranges[-1] != "bytes=0-"
    assert len(run.all("retrying")) == 1


@pytest.mark.fault("a directory file cut more times than --retries, with progress each time", exit=0, area="directory")
def test_cuts_that_each_make_progress_do_not_use_up_the_retries(s3: S3, s3_front: S3Front, tmp_path: Path) -> None:
    """--retries counts failures in a row without progress, as for one file: a CDN dropping a long
    connection every so often is not a failing origin, and its backoff starts again each time."""
    files = {"w.bin": SHARD}
    source = _bucket(s3, "dir-cuts", files)
    sums = _sums(files, tmp_path / "sums")
    s3_front.cuts = [10**9, 500_000, 500_000, 500_000, 500_000]  # the listing whole, then four cuts
    run = run_fetcher(
        "--source", source, "--dest", str(tmp_path / "dest"), "--sha256sums", str(sums), "--concurrency", "1",
        "--retries", "1", env=s3_front.env | {"FETCHER_RETRY_BACKOFF": "0.2"},
    )  # fmt: skip
    assert run.code == 0, run.stderr
    assert tree(tmp_path / "dest") == files
    retries = run.all("retrying")
    assert len(retries) == 4
    assert [r["attempt"] for r in retries] == [1, 1, 1, 1]
    assert max(r["delay_s"] for r in retries) < 0.5  # 0.2 s and its jitter, not doubling to 1.6 s


def test_sha256sums_from_s3_and_from_https(s3: S3, tmp_path: Path, origin: Origin) -> None:
    files = {"a.txt": b"a", "b/c.txt": b"c"}
    source = _bucket(s3, "dir-remote-sums", files)
    text = "".join(f"{sha256(d)}  {p}\n" for p, d in files.items()).encode()
    sums_s3 = s3.put("dir-remote-sums", "SHA256SUMS", text)
    run = run_fetcher("--source", source, "--dest", str(tmp_path / "d1"), "--sha256sums", sums_s3, env=s3.env)
    assert run.code == 0, run.stderr
    assert tree(tmp_path / "d1") == files
    sums_url = origin.add("/SHA256SUMS", text)
    run = run_fetcher("--source", source, "--dest", str(tmp_path / "d2"), "--sha256sums", sums_url, env=s3.env)
    assert run.code == 0, run.stderr
    assert run.event("published")["verified"] == 2
    missing = origin.url("/nothing-here")
    run = run_fetcher("--source", source, "--dest", str(tmp_path / "d3"), "--sha256sums", missing, env=s3.env)
    assert run.code == 3
    assert "404" in run.error


def test_a_changed_prefix_fetches_only_the_object_that_changed(s3: S3, s3_front: S3Front, tmp_path: Path) -> None:
    files = {"a.bin": b"a" * 1000, "b.bin": b"b" * 1000, "c.bin": b"c" * 1000}
    source = _bucket(s3, "dir-one-changed", files)
    s3.client.put_object(
        Bucket="dir-one-changed", Key="models/llama/c.bin", Body=files["c.bin"], ChecksumAlgorithm="SHA256"
    )
    dest = tmp_path / "dest"
    assert run_fetcher("--source", source, "--dest", str(dest), env=s3_front.env).code == 0
    s3.put("dir-one-changed", "models/llama/b.bin", b"B" * 1000)
    before = len(s3_front.requests)
    run = run_fetcher("--source", source, "--dest", str(dest), env=s3_front.env)
    assert run.code == 0, run.stderr
    assert tree(dest) == files | {"b.bin": b"B" * 1000}
    objects = [r.path for r in s3_front.requests[before:] if r.method == "GET" and "list-type" not in r.path]
    assert objects == ["/dir-one-changed/models/llama/b.bin"]  # c.bin, verified by its S3 checksum, was fetched again
    assert run.event("published")["fetched"] == 1
    assert run.event("published")["verified"] == 1  # c.bin still: its bytes are those S3 vouched for
    marker = json.loads(next((dest / ".fetcher").glob("*.json")).read_text())
    assert {o["path"]: o["verified"] for o in marker["objects"]} == {"a.bin": False, "b.bin": False, "c.bin": True}


@pytest.mark.fault(
    "SIGTERM mid-directory: exit 143, nothing published, verified files kept", exit=143, area="directory"
)
def test_sigterm_mid_directory_publishes_nothing_and_keeps_what_was_verified(
    s3: S3, s3_front: S3Front, tmp_path: Path
) -> None:
    files = {"a.json": b"{}", "model.safetensors": SHARD}
    source = _bucket(s3, "dir-term", files)
    dest = tmp_path / "dest"
    s3_front.trickle = [10**9, 200_000, 200_000]  # the listing at once; a.json in a moment, the shard slowly
    running = Background(
        "--source", source, "--dest", str(dest), "--concurrency", "2", "--progress-interval", "0.2", env=s3_front.env
    )
    running.wait_for("progress")  # bytes are arriving
    running.process.send_signal(signal.SIGTERM)
    run = running.finish()
    assert run.code == 143, run.stderr
    assert "stopped by SIGTERM" in run.error
    assert tree(dest) == {}
    assert [p.name for p in dest.glob(".fetcher/download-*/files/*") if not p.name.endswith(".incomplete")]


def test_a_folder_of_large_files_only(tmp_path: Path) -> None:
    folder = tmp_path / "pvc"
    folder.mkdir()
    files = {"a.safetensors": SHARD, "b.safetensors": SHARD[::-1]}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    run = run_fetcher("--source", f"file://{folder}/", "--dest", str(tmp_path / "dest"), "--part-size", "1Mi")
    assert run.code == 0, run.stderr
    assert tree(tmp_path / "dest") == files


@pytest.mark.fault(
    "a run that fails after a file was kept changes nothing of the published version", exit=6, area="publish"
)
@pytest.mark.skipif(os.geteuid() != 0, reason="gives files to other users: needs root, as CI runs")
def test_a_kept_file_takes_this_runs_owner_and_mode_and_a_failed_run_touches_none(tmp_path: Path) -> None:
    """A file the last publish left, unchanged at the source, is kept rather than fetched again: as
    this run would publish it (an owner or a mode dropped is dropped), and never by changing the
    published file itself (it is the live model until the publish)."""
    folder, dest = _folder(tmp_path / "pvc"), tmp_path / "dest"
    source = ["--source", f"file://{folder}/", "--dest", str(dest), "--part-size", "1Mi"]

    def owners_and_modes() -> set[tuple[int, int, str]]:
        return {(s.st_uid, s.st_gid, oct(stat.S_IMODE(s.st_mode))) for p in MODEL if (s := (dest / p).stat())}

    assert run_fetcher(*source, "--owner", "1000:1000", "--file-mode", "0600").code == 0
    assert owners_and_modes() == {(1000, 1000, "0o600")}

    dropped = run_fetcher(*source)
    assert dropped.code == 0, dropped.stderr
    assert owners_and_modes() == {(os.geteuid(), os.getegid(), "0o644")}  # was 1000:1000 0600, kept as it stood
    assert dropped.event("published")["fetched"] == 0  # copied where they stand, not read from the source again

    (folder / "new.txt").write_bytes(b"new")
    (dest / "new.txt").write_bytes(b"not fetcher's")  # the publish will refuse to replace it
    failed = run_fetcher(*source, "--owner", "4321:4321", "--file-mode", "0640")
    assert failed.code == 6, failed.stderr
    assert owners_and_modes() == {(os.geteuid(), os.getegid(), "0o644")}  # was 4321:4321 0640 before the publish
    assert tree(dest) == {**MODEL, "new.txt": b"not fetcher's"}


@pytest.mark.fault("a folder's file written to while it is copied: exit 3, nothing published", exit=3, area="directory")
def test_a_folder_file_written_while_it_is_read_is_never_published(tmp_path: Path) -> None:
    """A copy onto the volume still running: fetcher is stopped (SIGSTOP) the moment it has the file
    open, the file is written at its start and its end, then fetcher goes on. It would read the old
    start and the new end, a file that never existed."""
    folder, dest = tmp_path / "pvc", tmp_path / "dest"
    folder.mkdir()
    big = folder / "model.safetensors"
    with big.open("wb") as file:
        file.truncate(128 * 2**20)  # sparse: read at page-cache speed, so the stop is what makes the window
    run = Background("--source", f"file://{folder}/", "--dest", str(dest), "--concurrency", "1")
    pid, opened = run.process.pid, None
    deadline = time.monotonic() + 30
    while opened is None and time.monotonic() < deadline and run.process.poll() is None:
        with contextlib.suppress(OSError):
            opened = next(
                (fd for fd in os.listdir(f"/proc/{pid}/fd") if os.readlink(f"/proc/{pid}/fd/{fd}") == str(big)), None
            )
    os.kill(pid, signal.SIGSTOP)
    try:
        assert opened is not None, "fetcher never opened the file"
        position = int(Path(f"/proc/{pid}/fdinfo/{opened}").read_text().split()[1])
        assert position < big.stat().st_size - 2**20, "the stop came after the read: the case tests nothing"
        with big.open("r+b") as file:
            file.write(b"new start")
            file.seek(-9, os.SEEK_END)
            file.write(b"new end..")
    finally:
        os.kill(pid, signal.SIGCONT)
    done = run.finish()
    assert done.code == 3, done.stderr  # was exit 0, the old start and the new end published as one file
    assert "changed while it was being read" in done.event("failed")["error"]
    assert not (dest / "model.safetensors").exists()


def test_a_link_in_a_folder_is_counted_and_recorded_as_the_file_it_copies(tmp_path: Path) -> None:
    folder, dest = tmp_path / "pvc", tmp_path / "dest"
    folder.mkdir()
    (folder / "config.json").write_bytes(b"{}")
    (folder / "config-link.json").symlink_to("config.json")  # one file's bytes under two paths: read once
    run = run_fetcher("--source", f"file://{folder}/", "--dest", str(dest))
    assert run.code == 0, run.stderr
    assert (run.event("files not verified")["count"], run.event("published")["verified"]) == (2, 0)  # was 1 and 1
    marker = json.loads(next((dest / ".fetcher").glob("*.json")).read_text())
    digest = f"sha256:{sha256(b'{}')}"
    assert {o["path"]: (o["digest"], o["verified"]) for o in marker["objects"]} == {
        "config.json": (digest, False),
        "config-link.json": (digest, False),  # its digest was null
    }
