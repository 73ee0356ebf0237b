"""--cache-dir: one download per node. Real processes on one cache, moto's S3 behind a front that
counts what it served, the fake hub for repos that share a file."""

from __future__ import annotations

import fcntl
import json
import os
import random
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import S3, Origin, make_tar, run_fetcher, sha256, tree
from tests.fakehub import FakeHub
from tests.faults_support import Background, S3Front

SHARD = random.Random(13).randbytes(6 * 2**20 + 11)
BIG = random.Random(14).randbytes(20 * 2**20 + 3)  # the 8 parts a stream journals at a time, then as much again
MODEL = {
    "config.json": b'{"hidden_size": 64}\n',
    "model.safetensors": SHARD,
    "tokenizer.json": b'{"vocab": {"a": 0}}\n',
}


def _model(s3: S3, bucket: str, files: dict[str, bytes], tmp_path: Path) -> tuple[str, ...]:
    for path, data in files.items():
        s3.put(bucket, f"m/{path}", data)
    sums = tmp_path / f"{bucket}.sums"
    sums.write_text("".join(f"{sha256(data)}  {name}\n" for name, data in files.items()))
    return ("--source", f"s3://{bucket}/m/", "--sha256sums", str(sums), "--part-size", "1Mi")


def _gets(front: S3Front, name: str, since: int = 0) -> list[str]:
    """The Range of each GET of ``name`` the origin answered (``""`` for a whole object)."""
    return [
        r.headers.get("Range", "")
        for r in front.requests[since:]
        if r.method == "GET" and r.path.split("?")[0].endswith(name)
    ]


def _blobs(cache: Path) -> dict[str, Path]:
    return {p.name: p for p in (cache / "blobs").glob("*/*")}


@pytest.mark.fault("N fetchers at once on one node cache: the origin serves each file once", exit=0, area="cache")
def test_fetchers_started_at_once_download_each_file_once(s3: S3, s3_front: S3Front, tmp_path: Path) -> None:
    args = (*_model(s3, "cache-once", MODEL, tmp_path), "--split-below", "0")  # one GET per file
    cache = tmp_path / "cache"
    s3_front.trickle = [3_000_000] * 64  # the shard takes ~2 s: the others find it being downloaded
    runs = [
        Background(*args, "--dest", str(tmp_path / f"pod{i}"), "--cache-dir", str(cache), env=s3_front.env)
        for i in range(4)
    ]

    finished = [run.finish(timeout=90) for run in runs]

    for i, run in enumerate(finished):
        assert run.code == 0, run.stderr
        assert tree(tmp_path / f"pod{i}") == MODEL
    for name in MODEL:
        assert _gets(s3_front, name) == [""], name  # once, whole, for the four pods
    assert sum(len(r.all("waiting for")) for r in finished) >= 1
    assert sum(r.all("cache hit")[0]["files"] if r.all("cache hit") else 0 for r in finished) >= 3
    shard = tmp_path / "pod0" / "model.safetensors"
    assert shard.stat().st_nlink >= 5  # the cache and every pod's dest share one inode
    assert stat.S_IMODE(shard.stat().st_mode) == 0o444


@pytest.mark.fault("kill -9 of the cache's downloader: a waiter takes over its journalled parts", exit=0, area="cache")
def test_kill_9_of_the_downloader_then_a_waiter_resumes_its_parts(s3: S3, s3_front: S3Front, tmp_path: Path) -> None:
    files = MODEL | {"model.safetensors": BIG}
    args = (*_model(s3, "cache-kill", files, tmp_path), "--split-below", "1", "--concurrency", "2")
    cache = tmp_path / "cache"
    s3_front.trickle = [10**9] + [4_000_000] * 3  # the listing at once, then the files: the shard over seconds
    holder = Background(*args, "--dest", str(tmp_path / "a"), "--cache-dir", str(cache), env=s3_front.env)
    journal = cache / "download-partial" / "parts" / f"sha256-{sha256(BIG)}" / "journal"
    deadline = time.monotonic() + 60
    while not (journal.exists() and len(journal.read_text().splitlines()) > 1):
        assert holder.process.poll() is None and time.monotonic() < deadline, "".join(holder.lines)
        time.sleep(0.05)
    waiter = Background(*args, "--dest", str(tmp_path / "b"), "--cache-dir", str(cache), env=s3_front.env)
    waiter.wait_for("waiting for")
    before = len(s3_front.requests)
    s3_front.trickle = []

    holder.process.kill()
    holder.finish()
    done = waiter.finish(timeout=90)

    assert done.code == 0, done.stderr
    assert tree(tmp_path / "b") == files
    ranges = _gets(s3_front, "model.safetensors", before)
    assert ranges and all(r.startswith("bytes=") for r in ranges), ranges
    assert min(int(r.removeprefix("bytes=").split("-")[0]) for r in ranges) >= 8 * 2**20, ranges  # journalled


@pytest.mark.fault("a damaged node cache entry is fetched again, never served", exit=0, area="cache")
@pytest.mark.parametrize("damage", ["rewritten", "truncated"])
def test_a_damaged_entry_is_fetched_again(s3: S3, s3_front: S3Front, tmp_path: Path, damage: str) -> None:
    args = _model(s3, f"cache-bad-{damage}", MODEL, tmp_path)
    cache = tmp_path / "cache"
    assert run_fetcher(*args, "--dest", str(tmp_path / "a"), "--cache-dir", str(cache), env=s3_front.env).code == 0
    blob = _blobs(cache)[sha256(SHARD)]
    blob.chmod(0o644)
    with blob.open("r+b") as file:
        if damage == "rewritten":
            file.seek(100)
            file.write(b"X")  # same size; a later mtime
        else:
            file.truncate(1000)
    before = len(s3_front.requests)

    run = run_fetcher(*args, "--dest", str(tmp_path / "b"), "--cache-dir", str(cache), env=s3_front.env)

    assert run.code == 0, run.stderr
    assert tree(tmp_path / "b") == MODEL
    assert run.event("cache entry damaged: fetching it again")["file"].endswith("model.safetensors")
    assert _gets(s3_front, "model.safetensors", before)
    assert sha256(_blobs(cache)[sha256(SHARD)].read_bytes()) == sha256(SHARD)


def test_full_verification_finds_what_size_and_mtime_cannot(s3: S3, tmp_path: Path) -> None:
    args = _model(s3, "cache-full", MODEL, tmp_path)
    cache = tmp_path / "cache"
    assert run_fetcher(*args, "--dest", str(tmp_path / "a"), "--cache-dir", str(cache), env=s3.env).code == 0
    blob = _blobs(cache)[sha256(SHARD)]
    kept = blob.stat()
    blob.chmod(0o644)
    with blob.open("r+b") as file:
        file.seek(100)
        file.write(b"X")
    os.utime(blob, ns=(kept.st_atime_ns, kept.st_mtime_ns))  # a flipped bit on disk: size and mtime as recorded

    quick = run_fetcher(*args, "--dest", str(tmp_path / "b"), "--cache-dir", str(cache), env=s3.env)
    full = run_fetcher(
        *args, "--dest", str(tmp_path / "c"), "--cache-dir", str(cache), "--cache-verify", "full", env=s3.env
    )

    assert quick.code == 0 and quick.all("cache entry damaged: fetching it again") == []
    assert full.code == 0, full.stderr
    assert full.event("cache entry damaged: fetching it again")
    assert tree(tmp_path / "c") == MODEL


@pytest.mark.fault("eviction under --cache-max-size: a dest linked to an evicted file is intact", exit=0, area="cache")
def test_eviction_keeps_a_linked_dest_intact(s3: S3, tmp_path: Path) -> None:
    first = {"a.bin": random.Random(1).randbytes(3 * 2**20)}
    second = {"b.bin": random.Random(2).randbytes(3 * 2**20)}
    cache = tmp_path / "cache"
    a = run_fetcher(
        *_model(s3, "cache-a", first, tmp_path), "--dest", str(tmp_path / "a"), "--cache-dir", str(cache), env=s3.env
    )
    assert a.code == 0, a.stderr

    b = run_fetcher(
        *_model(s3, "cache-b", second, tmp_path),
        *("--dest", str(tmp_path / "b"), "--cache-dir", str(cache), "--cache-max-size", "4Mi"),
        env=s3.env,
    )

    assert b.code == 0, b.stderr
    assert b.event("cache evicted")["files"] == 1
    assert set(_blobs(cache)) == {sha256(second["b.bin"])}  # the least recently used went
    assert tree(tmp_path / "a") == first  # its inode lives on in dest
    assert tree(tmp_path / "b") == second


@pytest.mark.fault("a cache on another filesystem (tmpfs): files are copied into dest", exit=0, area="cache")
def test_a_cache_on_another_filesystem_is_copied_from(s3: S3, tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no tmpfs apart from the test's directory")
    cache = shm / f"fetcher-cache-{os.getpid()}-{time.monotonic_ns()}"
    try:
        args = _model(s3, "cache-tmpfs", MODEL, tmp_path)
        first = run_fetcher(*args, "--dest", str(tmp_path / "a"), "--cache-dir", str(cache), env=s3.env)
        second = run_fetcher(*args, "--dest", str(tmp_path / "b"), "--cache-dir", str(cache), env=s3.env)
    finally:
        subprocess.run(["rm", "-rf", str(cache)], check=False)
    assert first.code == 0 and second.code == 0, second.stderr
    assert second.event("cache hit")["files"] == len(MODEL)
    assert tree(tmp_path / "b") == MODEL
    assert (tmp_path / "b" / "model.safetensors").stat().st_nlink == 1


@pytest.mark.fault(
    "--owner and --file-mode with a node cache: each dest its own, the cache intact", exit=0, area="cache"
)
def test_owner_and_modes_give_each_dest_its_own_copy_and_leave_the_cache_intact(s3: S3, tmp_path: Path) -> None:
    args = _model(s3, "cache-modes", MODEL, tmp_path)
    cache = tmp_path / "cache"
    plain = run_fetcher(*args, "--dest", str(tmp_path / "plain"), "--cache-dir", str(cache), env=s3.env)
    moded = run_fetcher(
        *args, "--dest", str(tmp_path / "moded"), "--cache-dir", str(cache), "--file-mode", "0640", env=s3.env
    )
    owned = run_fetcher(
        *args, "--dest", str(tmp_path / "owned"), "--cache-dir", str(cache), "--owner", "1000:1000", env=s3.env
    )

    assert (plain.code, moded.code, owned.code) == (0, 0, 0), owned.stderr
    blob = _blobs(cache)[sha256(SHARD)].stat()
    assert (stat.S_IMODE(blob.st_mode), blob.st_uid) == (0o444, os.getuid())
    assert stat.S_IMODE((tmp_path / "moded" / "model.safetensors").stat().st_mode) == 0o640
    assert (tmp_path / "owned" / "model.safetensors").stat().st_uid == 1000
    assert (tmp_path / "plain" / "model.safetensors").stat().st_ino == blob.st_ino
    assert (tmp_path / "moded" / "model.safetensors").stat().st_ino != blob.st_ino
    assert moded.event("cache hit")["files"] == len(MODEL)
    for dest in ("plain", "moded", "owned"):
        assert tree(tmp_path / dest) == MODEL


def test_two_hub_models_sharing_a_file_store_it_once(hub: FakeHub, tmp_path: Path) -> None:
    tokenizer = b'{"model": {"vocab": {"shared": 0}}}\n' * 100
    hub.add_repo("org/base", {"tokenizer.json": tokenizer, "model.safetensors": SHARD})
    hub.add_repo("org/tuned", {"tokenizer.json": tokenizer, "model.safetensors": SHARD[::-1]})
    cache = tmp_path / "cache"
    env = {"HF_ENDPOINT": hub.endpoint, "FETCHER_PART_SIZE": "1Mi"}

    base = run_fetcher(
        "--source", "hf://org/base", "--dest", str(tmp_path / "base"), "--cache-dir", str(cache), env=env
    )
    before = len(hub.requests)
    tuned = run_fetcher(
        "--source", "hf://org/tuned", "--dest", str(tmp_path / "tuned"), "--cache-dir", str(cache), env=env
    )

    assert base.code == 0 and tuned.code == 0, tuned.stderr
    assert tree(tmp_path / "tuned")["tokenizer.json"] == tokenizer
    assert not [r for r in hub.requests[before:] if r.path.split("?")[0].endswith("tokenizer.json")]
    assert tuned.event("cache hit")["files"] >= 1
    shared = [b for b in _blobs(cache).values() if b.read_bytes() == tokenizer]
    assert len(shared) == 1


def test_a_pinned_hub_model_in_the_cache_is_published_without_a_request(hub: FakeHub, tmp_path: Path) -> None:
    """A node that has the model serves new pods while the hub is unreachable: the manifest of the commit
    is kept by its commit, the files by their digests."""
    commit = hub.add_repo("org/pinned", MODEL)
    cache = tmp_path / "cache"
    env = {"HF_ENDPOINT": hub.endpoint, "FETCHER_CACHE_DIR": str(cache)}
    assert run_fetcher("--source", f"hf://org/pinned@{commit}", "--dest", str(tmp_path / "a"), env=env).code == 0
    before = len(hub.requests)

    pinned = run_fetcher("--source", f"hf://org/pinned@{commit}", "--dest", str(tmp_path / "b"), env=env)
    branch = run_fetcher("--source", "hf://org/pinned", "--dest", str(tmp_path / "c"), env=env)

    assert pinned.code == 0 and branch.code == 0, pinned.stderr + branch.stderr
    assert tree(tmp_path / "b") == tree(tmp_path / "c") == tree(tmp_path / "a")
    assert MODEL.items() <= tree(tmp_path / "b").items()  # and the .gitattributes the hub adds
    assert pinned.event("manifest from the cache")["identity"] == f"hf-commit:{commit}"
    asked = [r.path.split("?")[0] for r in hub.requests[before:]]
    assert len(asked) == 1 and asked[0].endswith("/revision/main"), asked  # the branch's commit, nothing more


def test_a_kept_manifest_with_two_files_on_one_path_is_listed_again(hub: FakeHub, tmp_path: Path) -> None:
    """The cache is a hostPath another pod (or an older fetcher) writes: a manifest there is checked
    as the source's own is, and one that puts two files on one path is not used."""
    commit = hub.add_repo("org/twice", MODEL)
    cache = tmp_path / "cache"
    args = ("--source", f"hf://org/twice@{commit}")
    env = {"HF_ENDPOINT": hub.endpoint, "FETCHER_CACHE_DIR": str(cache)}
    assert run_fetcher(*args, "--dest", str(tmp_path / "a"), env=env).code == 0
    (kept,) = (cache / "manifests").glob("*.json")
    manifest = json.loads(kept.read_text())
    manifest["entries"].append(dict(manifest["entries"][0]))  # its first file, twice
    kept.write_text(json.dumps(manifest))

    run = run_fetcher(*args, "--dest", str(tmp_path / "b"), env=env)

    assert run.code == 0, run.stderr
    assert run.all("manifest from the cache") == []  # was used as it stood
    assert tree(tmp_path / "b") == tree(tmp_path / "a")


def test_a_dry_run_leaves_the_cache_alone(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("org/dry", MODEL)
    run = run_fetcher(
        "--source",
        "hf://org/dry",
        "--dest",
        str(tmp_path / "d"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--dry-run",
        env={"HF_ENDPOINT": hub.endpoint},
    )
    assert run.code == 0, run.stderr
    assert not (tmp_path / "cache").exists()


ARCHIVE_MODEL: dict[str, bytes | tuple[str, Any]] = {
    "model/weights.bin": random.Random(15).randbytes(3 * 2**20 + 5),
    "model/serve.sh": ("file", (b"#!/bin/sh\n", 0o755)),
    "model/latest": ("symlink", "weights.bin"),
}
ARCHIVE_FILES = {"model/weights.bin": ARCHIVE_MODEL["model/weights.bin"], "model/serve.sh": b"#!/bin/sh\n"}


def _archive_args(origin: Origin, archive: bytes, **route: Any) -> tuple[str, ...]:
    return ("--source", origin.add("/m.tar.gz", archive, **route), "--sha256", sha256(archive))


@pytest.mark.fault("N fetchers at once of one archive: downloaded and unpacked once per node", exit=0, area="cache")
def test_fetchers_of_one_archive_at_once_download_it_once(origin: Origin, tmp_path: Path) -> None:
    archive = make_tar(ARCHIVE_MODEL)
    args = (*_archive_args(origin, archive, rate=1_500_000), "--cache-dir", str(tmp_path / "cache"))
    args += ("--split-below", "100G")  # one stream, over two seconds: the others find the archive being fetched
    runs = [Background(*args, "--dest", str(tmp_path / f"pod{i}")) for i in range(3)]

    finished = [run.finish(timeout=90) for run in runs]

    for i, run in enumerate(finished):
        assert run.code == 0, run.stderr
        assert tree(tmp_path / f"pod{i}") == ARCHIVE_FILES
    assert sum(r.sent for r in origin.requests) <= len(archive) * 1.05  # one download, however split
    assert sum(1 for r in finished if r.all("cache hit")) == 2
    assert any(r.all("waiting for") for r in finished)
    weights = tmp_path / "pod0" / "model" / "weights.bin"
    assert weights.stat().st_nlink == 4  # the cache and every pod's dest share one inode
    script = tmp_path / "pod2" / "model" / "serve.sh"
    assert stat.S_IMODE(script.stat().st_mode) == 0o555  # read-only, and still executable
    assert os.readlink(tmp_path / "pod2" / "model" / "latest") == "weights.bin"


def test_a_cached_archive_is_held_to_this_runs_unpack_limits(origin: Origin, tmp_path: Path) -> None:
    archive = make_tar(ARCHIVE_MODEL)
    args = (*_archive_args(origin, archive), "--cache-dir", str(tmp_path / "cache"))
    assert run_fetcher(*args, "--dest", str(tmp_path / "a")).code == 0
    asked = len(origin.requests)
    for n, limit in enumerate([("--max-members", "2"), ("--max-unpacked-size", "1Mi")]):
        run = run_fetcher(*args, *limit, "--dest", str(tmp_path / f"limited{n}"))
        assert run.code == 5, run.stderr  # was exit 0: a cache hit published what unpacking refuses
        assert f"({limit[0]})" in run.error
        assert not (tmp_path / f"limited{n}").exists() or tree(tmp_path / f"limited{n}") == {}
    assert len(origin.requests) == asked  # refused from what the cache holds, without a download

    # Limits are what the unpack counted: two members, though the tree holds a directory too.
    two = make_tar({"model/a": b"a", "model/b": b"b"})
    two_args = (*_archive_args(origin, two), "--cache-dir", str(tmp_path / "cache"), "--max-members", "2")
    assert run_fetcher(*two_args, "--dest", str(tmp_path / "two-a")).code == 0
    hit = run_fetcher(*two_args, "--dest", str(tmp_path / "two-b"))
    assert hit.code == 0, hit.stderr  # was exit 5 from the tree's three entries
    assert hit.event("cache hit") and tree(tmp_path / "two-b") == {"model/a": b"a", "model/b": b"b"}


def test_a_cached_archive_waits_for_a_file_another_fetcher_holds_a_moment(origin: Origin, tmp_path: Path) -> None:
    """A file of the tree being stored or evicted by another fetcher: it was 'cache entry unusable',
    and the whole archive downloaded and unpacked again. It is waited for, as an entry is."""
    archive = make_tar(ARCHIVE_MODEL)
    args = (*_archive_args(origin, archive), "--cache-dir", str(tmp_path / "cache"))
    assert run_fetcher(*args, "--dest", str(tmp_path / "a")).code == 0
    asked = len(origin.requests)
    weights = sha256(ARCHIVE_FILES["model/weights.bin"])
    fd = os.open(tmp_path / "cache" / "locks" / f"sha256-{weights}", os.O_RDONLY | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another fetcher storing or evicting weights.bin
    try:
        run = Background(*args, "--dest", str(tmp_path / "b"))
        run.wait_for("waiting for")
    finally:
        os.close(fd)
    done = run.finish(timeout=30)
    assert done.code == 0, done.stderr
    assert done.event("cache hit") and done.all("cache entry unusable: fetching again") == []
    assert len(origin.requests) == asked
    assert tree(tmp_path / "b") == ARCHIVE_FILES


def test_an_archive_with_a_damaged_file_in_the_cache_is_fetched_again(origin: Origin, tmp_path: Path) -> None:
    archive = make_tar(ARCHIVE_MODEL)
    args = (*_archive_args(origin, archive), "--cache-dir", str(tmp_path / "cache"))
    assert run_fetcher(*args, "--dest", str(tmp_path / "a")).code == 0
    (blob,) = [b for b in _blobs(tmp_path / "cache").values() if b.stat().st_size > 2**20]
    blob.chmod(0o644)
    with blob.open("r+b") as file:
        file.truncate(1000)
    asked = len(origin.requests)

    run = run_fetcher(*args, "--dest", str(tmp_path / "b"))

    assert run.code == 0, run.stderr
    assert "missing, damaged" in run.event("cache entry unusable: fetching again")["reason"]
    assert len(origin.requests) > asked
    assert tree(tmp_path / "b") == ARCHIVE_FILES

    repaired = run_fetcher(*args, "--dest", str(tmp_path / "c"))  # the download put the entry right
    assert repaired.code == 0, repaired.stderr
    assert repaired.all("cache entry unusable: fetching again") == [] and repaired.event("cache hit")
    assert tree(tmp_path / "c") == ARCHIVE_FILES


@pytest.mark.parametrize(
    "entry",
    [{"path": "../outside", "key": "sha256-" + "0" * 64, "mode": 0o444}, {"path": "model/up", "link": "../../.."}],
)
def test_a_tree_another_pod_wrote_into_the_cache_is_checked(origin: Origin, tmp_path: Path, entry: Any) -> None:
    """The cache is a hostPath: a tree record leading outside dest is never followed, only fetched again."""
    archive = make_tar(ARCHIVE_MODEL)
    cache = tmp_path / "cache"
    args = (*_archive_args(origin, archive), "--cache-dir", str(cache))
    assert run_fetcher(*args, "--dest", str(tmp_path / "a")).code == 0
    (record,) = (cache / "trees").iterdir()
    kept = json.loads(record.read_text())
    record.write_text(json.dumps(kept | {"entries": [*kept["entries"], entry]}))

    run = run_fetcher(*args, "--dest", str(tmp_path / "b" / "dest"))

    assert run.code == 0, run.stderr
    assert run.event("cache entry unusable: fetching again")
    assert tree(tmp_path / "b" / "dest") == ARCHIVE_FILES
    assert sorted(os.listdir(tmp_path / "b")) == ["dest"]


def test_a_single_file_with_a_cache_says_it_is_not_cached(tmp_path: Path) -> None:
    source = tmp_path / "model.bin"
    source.write_bytes(b"weights")

    run = run_fetcher("--source", f"file://{source}", "--dest", str(tmp_path / "d"), "--cache-dir", str(tmp_path / "c"))

    assert run.code == 0, run.stderr
    assert run.event("not cached")


def test_a_file_another_fetcher_holds_holds_up_no_other_file(s3: S3, tmp_path: Path) -> None:
    """What a review found: a worker waited on a busy entry while its own entry's download sat queued
    behind it, locked; two fetchers listing shared files in opposite orders then waited on each other
    forever. A busy entry is now tried again later, and the worker goes on with other work."""
    x, y = random.Random(21).randbytes(2**20), random.Random(22).randbytes(2**20)
    args = _model(s3, "cache-busy", {"a.bin": x, "b.bin": y}, tmp_path)  # equal sizes: a.bin first
    cache = tmp_path / "cache"
    (cache / "locks").mkdir(parents=True)
    fd = os.open(cache / "locks" / f"sha256-{sha256(y)}", os.O_RDONLY | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another fetcher is downloading b.bin
    try:
        run = Background(
            *args, "--concurrency", "1", "--dest", str(tmp_path / "d"), "--cache-dir", str(cache), env=s3.env
        )
        deadline = time.monotonic() + 20
        while not (cache / "blobs" / "sha256" / sha256(x)).exists():
            assert time.monotonic() < deadline, "".join(run.lines)  # a.bin waited for b.bin's lock
            time.sleep(0.05)
        run.wait_for("waiting for")
    finally:
        os.close(fd)

    done = run.finish(timeout=30)

    assert done.code == 0, done.stderr
    assert tree(tmp_path / "d") == {"a.bin": x, "b.bin": y}
    assert done.event("waiting for")["file"].endswith("b.bin")


@pytest.mark.fault("N fetchers at once on files with no digest: each downloaded once, by alias", exit=0, area="cache")
def test_files_without_a_digest_are_downloaded_once_too(s3: S3, s3_front: S3Front, tmp_path: Path) -> None:
    for path, data in MODEL.items():
        s3.put("cache-nosums", f"m/{path}", data)
    cache = tmp_path / "cache"
    s3_front.trickle = [3_000_000] * 64
    args = ("--source", "s3://cache-nosums/m/", "--split-below", "0", "--cache-dir", str(cache))
    runs = [Background(*args, "--dest", str(tmp_path / f"pod{i}"), env=s3_front.env) for i in range(3)]

    finished = [run.finish(timeout=90) for run in runs]

    for i, run in enumerate(finished):
        assert run.code == 0, run.stderr
        assert tree(tmp_path / f"pod{i}") == MODEL
    for name in MODEL:
        assert _gets(s3_front, name) == [""], name


def test_an_entry_under_an_alias_is_not_read_while_an_eviction_holds_it(tmp_path: Path) -> None:
    """A file with no digest is cached under an alias of its source; an eviction locks the entry's key.
    A hit took only the alias's lock, so an eviction could remove the blob between its check and its
    placing: exit 6 (a fault hunt's 6 runs in 15). It now waits for the key as for a download."""
    folder, cache = tmp_path / "pvc", tmp_path / "cache"
    folder.mkdir()
    (folder / "model.bin").write_bytes(b"weights")
    args = ("--source", f"file://{folder}/", "--cache-dir", str(cache))
    assert run_fetcher(*args, "--dest", str(tmp_path / "a")).code == 0
    fd = os.open(cache / "locks" / f"sha256-{sha256(b'weights')}", os.O_RDONLY | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # an eviction deciding whether to remove it
    try:
        run = Background(*args, "--dest", str(tmp_path / "b"))
        run.wait_for("waiting for")  # was a hit at once, read under the alias's lock alone
    finally:
        os.close(fd)
    done = run.finish(timeout=30)
    assert done.code == 0, done.stderr
    assert tree(tmp_path / "b") == {"model.bin": b"weights"} and done.event("cache hit")
    records = [p for d in ("index", "aliases") for p in (cache / d).iterdir()]
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in records} == {"0o644"}  # readable as the blobs are; was 0600


def test_a_changed_folder_keeps_the_unchanged_files_linked_to_the_cache(tmp_path: Path) -> None:
    """A kept file is the cache's 0444 inode: as this run would leave it (no --owner, no --file-mode),
    so it is linked again, not copied (a review found it copied, doubling the disk a model takes)."""
    folder, cache, dest = tmp_path / "pvc", tmp_path / "cache", tmp_path / "dest"
    folder.mkdir()
    (folder / "big.bin").write_bytes(b"weights" * 1000)
    (folder / "config.json").write_bytes(b"{}")
    args = ("--source", f"file://{folder}/", "--dest", str(dest), "--cache-dir", str(cache))
    assert run_fetcher(*args).code == 0
    linked = (dest / "big.bin").stat()
    assert (stat.S_IMODE(linked.st_mode), linked.st_nlink) == (0o444, 2)  # the cache's inode
    (folder / "config.json").write_bytes(b'{"v": 2}')
    run = run_fetcher(*args)
    assert run.code == 0, run.stderr
    assert (dest / "big.bin").stat().st_ino == linked.st_ino
    assert tree(dest) == {"big.bin": b"weights" * 1000, "config.json": b'{"v": 2}'}


def test_two_folders_with_the_same_names_sizes_and_times_do_not_share_files(tmp_path: Path) -> None:
    """What a review found: files with no digest were remembered by path, size and mtime alone."""
    cache = tmp_path / "cache"
    for name, data in (("a", b"AAAA-weights-v1"), ("b", b"BBBB-weights-v2")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.bin").write_bytes(data)
        os.utime(folder / "model.bin", (1_600_000_000, 1_600_000_000))

    for name in ("a", "b"):
        run = run_fetcher(
            "--source", f"file://{tmp_path / name}/", "--dest", str(tmp_path / f"d{name}"), "--cache-dir", str(cache)
        )
        assert run.code == 0, run.stderr

    assert tree(tmp_path / "da") == {"model.bin": b"AAAA-weights-v1"}
    assert tree(tmp_path / "db") == {"model.bin": b"BBBB-weights-v2"}


def test_a_cache_that_cannot_be_used_is_named_and_the_model_still_arrives(s3: S3, tmp_path: Path) -> None:
    args = _model(s3, "cache-unusable", MODEL, tmp_path)
    not_a_directory = tmp_path / "cache"
    not_a_directory.write_text("a file where the cache should be")

    run = run_fetcher(*args, "--dest", str(tmp_path / "d"), "--cache-dir", str(not_a_directory), env=s3.env)

    assert run.code == 0, run.stderr
    assert tree(tmp_path / "d") == MODEL
    assert run.event("cache unusable: fetching without it")["cache"] == str(not_a_directory)
