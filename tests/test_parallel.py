"""Parallel ranged GETs, and resuming across restarts from the spool on disk."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT, S3, Origin, make_tar, run_fetcher, sha256, tree

BODY = random.Random(5).randbytes(1024 * 1024)
KiB = 1024
SPLIT = ("--part-size", "64Ki", "--concurrency", "4", "--split-below", "100G")


def _ranges(origin: Origin, path: str) -> list[str]:
    return [r.headers["Range"] for r in origin.hits(path) if "Range" in r.headers]


def test_a_slow_origin_is_fetched_in_parallel_pinned_parts(origin: Origin, tmp_path: Path) -> None:
    url = origin.add("/w.bin", BODY, etag='"abc"', rate=2_000_000)

    run = run_fetcher("--source", url, "--dest", str(tmp_path), "--sha256", sha256(BODY), *SPLIT)

    assert run.code == 0, run.stderr
    assert tree(tmp_path) == {"w.bin": BODY}
    assert run.event("published")["transfer"] == "parallel"
    assert run.event("splitting")["concurrency"] == 4
    ranged = [r for r in origin.hits("/w.bin") if "Range" in r.headers]
    assert len(ranged) == 15  # part 0 came on the first stream
    assert {r.headers["If-Match"] for r in ranged} == {'"abc"'}
    assert f"bytes={64 * KiB}-{128 * KiB - 1}" in _ranges(origin, "/w.bin")
    assert not list((tmp_path / ".fetcher").glob("download-*"))  # the spool is gone once published


def test_parallel_parts_feed_the_unpacker_in_order(origin: Origin, tmp_path: Path) -> None:
    files = {f"model/shard-{i}.bin": random.Random(i).randbytes(200 * KiB) for i in range(5)}
    archive = make_tar(files)
    url = origin.add("/m.tar.gz", archive, etag='"v1"', rate=2_000_000)
    run = run_fetcher("--source", url, "--dest", str(tmp_path), "--sha256", sha256(archive), *SPLIT)
    assert run.code == 0, run.stderr
    assert run.event("published")["transfer"] == "parallel"
    assert tree(tmp_path) == files


def test_a_fast_first_part_stays_one_stream(origin: Origin, tmp_path: Path) -> None:
    url = origin.add("/w.bin", BODY, etag='"abc"')
    run = run_fetcher("--source", url, "--dest", str(tmp_path), "--part-size", "64Ki", "--split-below", "1")
    assert run.code == 0, run.stderr
    assert run.event("published")["transfer"] == "stream"
    assert len(origin.hits("/w.bin")) == 1


def test_a_server_without_ranges_gets_one_stream(origin: Origin, tmp_path: Path) -> None:
    url = origin.add("/w.bin", BODY, etag='"abc"', ranges=False, rate=4_000_000)
    run = run_fetcher("--source", url, "--dest", str(tmp_path), "--sha256", sha256(BODY), *SPLIT)
    assert run.code == 0, run.stderr
    assert run.event("published")["transfer"] == "stream"
    assert len(origin.hits("/w.bin")) == 1


def test_a_server_that_answers_ranges_with_200_falls_back_to_one_stream(origin: Origin, tmp_path: Path) -> None:
    url = origin.add("/w.bin", BODY, etag='"abc"', lie_about_ranges=True, rate=8_000_000)
    run = run_fetcher("--source", url, "--dest", str(tmp_path), "--sha256", sha256(BODY), *SPLIT)
    assert run.code == 0, run.stderr
    assert tree(tmp_path) == {"w.bin": BODY}
    assert "did not honour a range request" in run.event("falling back to one stream")["reason"]


def test_an_object_that_changes_between_parts_is_never_stitched(origin: Origin, tmp_path: Path) -> None:
    other = random.Random(6).randbytes(len(BODY))
    url = origin.add("/w.bin", BODY, etag='"v1"', rate=2_000_000, then=(other, '"v2"'))
    run = run_fetcher("--source", url, "--dest", str(tmp_path), *SPLIT)
    assert run.code == 3
    assert "changed during the download" in run.error
    assert tree(tmp_path) == {}


def test_s3_objects_are_fetched_in_parallel_parts(s3: S3, tmp_path: Path) -> None:
    source = s3.put("parts", "w.bin", BODY)
    run = run_fetcher("--source", source, "--dest", str(tmp_path), "--sha256", sha256(BODY), *SPLIT, env=s3.env)
    assert run.code == 0, run.stderr
    assert run.event("published")["transfer"] == "parallel"
    assert tree(tmp_path) == {"w.bin": BODY}


def test_a_killed_run_resumes_from_the_parts_on_disk(origin: Origin, tmp_path: Path) -> None:
    size, part, concurrency = 4 * 1024 * KiB, 128 * KiB, 2
    body = random.Random(8).randbytes(size)
    url = origin.add("/big.bin", body, etag='"big"', rate=1_000_000)
    args = [
        "--source",
        url,
        "--dest",
        str(tmp_path),
        "--sha256",
        sha256(body),
        "--part-size",
        "128Ki",
        "--concurrency",
        str(concurrency),
        "--split-below",
        "100G",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FETCHER_")} | {"FETCHER_LOG_FORMAT": "json"}
    first = subprocess.Popen(
        [sys.executable, "-m", "fetcher", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    journal = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        journals = list((tmp_path / ".fetcher").glob("download-*/journal"))
        if journals and len(journals[0].read_text().splitlines()) > 1 + 10:  # header + 10 parts
            journal = journals[0]
            break
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert journal is not None, "the first run never got 10 parts in"
    done_before = len(journal.read_text().splitlines()) - 1
    assert tree(tmp_path) == {}  # killed: nothing published
    requests_before = len(origin.requests)

    second = run_fetcher(*args)

    assert second.code == 0, second.stderr
    assert tree(tmp_path) == {"big.bin": body}
    resumed = second.event("resuming")
    assert resumed["parts_on_disk"] >= done_before
    sent_again = sum(r.sent for r in origin.requests[requests_before:])
    refetched = sent_again - (size - resumed["parts_on_disk"] * part)
    assert refetched <= concurrency * part, f"{refetched} bytes fetched twice"
