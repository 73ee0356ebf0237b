"""Parallel ranged GETs, and resuming across restarts from the spool on disk."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fetcher.pace import CPU_BOUND
from tests.conftest import ROOT, S3, Origin, cpu_hogs, make_tar, run_fetcher, sha256, small_volume, tree

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


def test_a_slowish_stream_on_a_saturated_cpu_stays_one_stream(origin: Origin, tmp_path: Path) -> None:
    """A stream within a factor of 4 of --split-below, while tasks waited for a CPU most of the
    time, may be slow for want of CPU: more connections would only add work. fetcher's own CPU
    share is small here, so it alone cannot tell this from a capped connection."""
    body = random.Random(6).randbytes(2 * 1024 * KiB)
    url = origin.add("/w.bin", body, etag='"abc"', rate=2_000_000)
    args = ("--sha256", sha256(body), "--part-size", "256Ki", "--concurrency", "4", "--split-below", "5M")
    with cpu_hogs():
        run = run_fetcher("--source", url, "--dest", str(tmp_path), *args)
    assert run.code == 0, run.stderr
    assert tree(tmp_path) == {"w.bin": body}
    assert run.all("splitting") == [], run.stderr
    assert run.event(CPU_BOUND)["cpu_stalled"] >= 0.5
    assert run.event("published")["transfer"] == "stream"
    assert len(origin.hits("/w.bin")) == 1


def test_a_server_without_ranges_gets_one_stream(origin: Origin, tmp_path: Path) -> None:
    url = origin.add("/w.bin", BODY, etag='"abc"', ranges=False, rate=4_000_000)
    run = run_fetcher("--source", url, "--dest", str(tmp_path), "--sha256", sha256(BODY), *SPLIT)
    assert run.code == 0, run.stderr
    assert run.event("published")["transfer"] == "stream"
    assert len(origin.hits("/w.bin")) == 1


@pytest.mark.fault("a server that advertises ranges, then answers parts with 200: one stream", exit=0, area="protocol")
def test_a_server_that_answers_ranges_with_200_falls_back_to_one_stream(origin: Origin, tmp_path: Path) -> None:
    url = origin.add("/w.bin", BODY, etag='"abc"', lie_about_ranges=True, rate=8_000_000)
    run = run_fetcher("--source", url, "--dest", str(tmp_path), "--sha256", sha256(BODY), *SPLIT)
    assert run.code == 0, run.stderr
    assert tree(tmp_path) == {"w.bin": BODY}
    assert "did not honour a range request" in run.event("falling back to one stream")["reason"]


@pytest.mark.fault(
    "an object pinned by a strong ETag changes between parallel parts: never stitched", exit=3, area="protocol"
)
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


def test_a_range_answered_with_other_bytes_falls_back_to_one_stream(origin: Origin, tmp_path: Path) -> None:
    url = origin.add("/w.bin", BODY, etag='"abc"', align_ranges=48 * KiB, rate=4_000_000)
    run = run_fetcher("--source", url, "--dest", str(tmp_path), "--sha256", sha256(BODY), *SPLIT)
    assert run.code == 0, run.stderr
    assert tree(tmp_path) == {"w.bin": BODY}
    assert "did not honour a range request" in run.event("falling back to one stream")["reason"]


def test_every_connection_asked_for_is_used(origin: Origin, tmp_path: Path) -> None:
    body = random.Random(9).randbytes(25 * 64 * KiB)  # the first part, then one for each connection
    # Slow enough that every part lasts ~1.6 s: all 24 overlap even on a loaded machine.
    url = origin.add("/w.bin", body, etag='"abc"', rate=40_000)
    run = run_fetcher(
        "--source", url, "--dest", str(tmp_path), "--part-size", "64Ki", "--concurrency", "24", "--split-below", "100G"
    )
    assert run.code == 0, run.stderr
    assert tree(tmp_path) == {"w.bin": body}
    assert origin.peak >= 24  # not capped by a connection pool smaller than --concurrency


def test_a_spool_whose_data_is_gone_is_not_trusted(origin: Origin, tmp_path: Path) -> None:
    """A journal left behind (say, the run was stopped after the file was moved out) must not yield zeros."""
    url = origin.add("/w.bin", BODY, etag='"abc"', rate=2_000_000)
    args = ("--source", url, "--dest", str(tmp_path), *SPLIT)
    dry = run_fetcher(*args, "--dry-run")
    assert dry.code == 0
    spools = tmp_path / ".fetcher"
    first = run_fetcher(*args)
    assert first.code == 0, first.stderr
    key = next(spools.glob("*.json")).stem
    (tmp_path / "w.bin").unlink()  # fetch it again, with a journal claiming every part but no data
    spool = spools / f"download-{key}"
    spool.mkdir()
    identity = {"source": url, "version": '"abc"', "size": len(BODY), "part_size": 64 * KiB}
    parts = range(len(BODY) // (64 * KiB))
    (spool / "journal").write_text(json.dumps(identity) + "\n" + "".join(f"{i}\n" for i in parts))

    again = run_fetcher(*args)

    assert again.code == 0, again.stderr
    assert tree(tmp_path) == {"w.bin": BODY}
    assert not again.all("resuming")


def test_spools_of_objects_no_longer_asked_for_are_removed(origin: Origin, tmp_path: Path) -> None:
    stale = tmp_path / ".fetcher" / "download-0123456789abcdef"
    stale.mkdir(parents=True)
    (stale / "data").write_bytes(b"\0" * 4096)
    url = origin.add("/w.bin", BODY, etag='"abc"')
    run = run_fetcher("--source", url, "--dest", str(tmp_path))
    assert run.code == 0, run.stderr
    assert not stale.exists()


def test_sigterm_while_the_first_part_is_timed_leaves_no_spool_and_no_dest(origin: Origin, tmp_path: Path) -> None:
    """A spool with no part on disk is no resume point: a failed first run leaves the filesystem as it
    found it. It left dest/.fetcher, its lock and a sparse spool the size of the object."""
    body = random.Random(13).randbytes(4 * 1024 * KiB)
    url = origin.add("/w.bin", body, etag='"abc"', rate=500_000)  # the 1 MiB first part takes ~2 s
    dest = tmp_path / "dest"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FETCHER_")} | {"FETCHER_LOG_FORMAT": "json"}
    process = subprocess.Popen(
        [sys.executable, "-m", "fetcher", "--source", url, "--dest", str(dest), "--part-size", "1Mi"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while not list(dest.glob(".fetcher/download-*/journal")):
        assert time.monotonic() < deadline and process.poll() is None, "the spool never appeared"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=15)
    finally:
        process.kill()
    assert code == 143, process.stderr.read() if process.stderr else ""
    assert not dest.exists(), sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))


def test_sigterm_stops_parallel_workers_stuck_on_a_silent_server(origin: Origin, tmp_path: Path) -> None:
    body = random.Random(10).randbytes(2 * 1024 * KiB)
    url = origin.add("/w.bin", body, etag='"abc"', rate=2_000_000, stall_after=(32 * KiB, 60), stall_ranged_only=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FETCHER_")} | {"FETCHER_LOG_FORMAT": "json"}
    process = subprocess.Popen(
        [sys.executable, "-m", "fetcher", "--source", url, "--dest", str(tmp_path), *SPLIT, "--timeout", "120"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    for line in process.stderr:  # the first part arrives at once, then every part request stalls
        if '"splitting"' in line:
            break
    time.sleep(1)
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=15)  # not the 60 s the server stays silent, nor the 120 s timeout
    finally:
        process.kill()
    assert code == 143, process.stderr.read()
    assert tree(tmp_path) == {}
    assert list(tmp_path.glob(".fetcher/download-*/journal")), "its first part is journalled: kept to resume"


def test_a_big_plain_file_is_moved_out_of_its_spool_not_copied(origin: Origin, tmp_path: Path) -> None:
    body = random.Random(12).randbytes(24 * 1024 * KiB)
    url = origin.add("/w.bin", body, etag='"abc"')
    with small_volume(tmp_path / "volume", "36m") as volume:  # room for it once and a half, not twice
        run = run_fetcher(
            "--source",
            url,
            "--dest",
            str(volume),
            "--sha256",
            sha256(body),
            "--part-size",
            "8Mi",
            "--split-below",
            "100G",
        )
        assert run.code == 0, run.stderr
        assert run.event("published")["transfer"] == "parallel"
        assert tree(volume) == {"w.bin": body}


def test_a_disk_filled_by_a_parallel_run_gets_one_stream_on_the_restart(origin: Origin, tmp_path: Path) -> None:
    noise = random.Random(13).randbytes
    weights = b"".join(noise(400) + bytes(624) for _ in range(12 * 1024))  # 12 MiB, gzip shrinks it ~2.5x
    archive = make_tar({"m/w.bin": weights})
    url = origin.add("/m.tar.gz", archive, etag='"v1"')
    # Unpacked files and spool together do not fit; the files alone do; the estimate (2x the archive) passes.
    size_kib = (len(weights) + len(archive) // 2) // KiB
    with small_volume(tmp_path / "volume", f"{size_kib}k") as volume:
        args = ("--source", url, "--dest", str(volume), "--sha256", sha256(archive), *SPLIT)
        first = run_fetcher(*args)
        assert first.code == 6, first.stderr
        assert "No space left on device" in first.error
        (spool,) = (volume / ".fetcher").glob("download-*")
        assert [entry.name for entry in spool.iterdir()] == ["no-room"]  # the parts went, a note stays

        again = run_fetcher(*args)

        assert again.code == 0, again.stderr
        assert again.event("published")["transfer"] == "stream"
        assert again.all("one stream: the last parallel attempt filled the disk")
        assert tree(volume) == {"m/w.bin": weights}
        assert not list((volume / ".fetcher").glob("download-*"))


def test_a_spool_left_by_an_earlier_run_goes_once_published(origin: Origin, tmp_path: Path) -> None:
    url = origin.add("/w.bin", BODY, etag='"abc"')
    first = run_fetcher("--source", url, "--dest", str(tmp_path))
    assert first.code == 0, first.stderr
    key = next((tmp_path / ".fetcher").glob("*.json")).stem
    leftover = tmp_path / ".fetcher" / f"download-{key}"  # as a killed parallel run leaves it
    leftover.mkdir()
    (leftover / "data").write_bytes(bytes(len(BODY)))
    (tmp_path / "w.bin").unlink()

    again = run_fetcher("--source", url, "--dest", str(tmp_path), "--concurrency", "1")

    assert again.code == 0, again.stderr
    assert tree(tmp_path) == {"w.bin": BODY}
    assert not leftover.exists()


def test_the_spool_is_used_only_where_the_volume_has_room_for_it(origin: Origin, tmp_path: Path) -> None:
    with small_volume(tmp_path / "volume", "3m") as volume:
        # A plain file is moved out of its spool: 2 MiB fits on 3 MiB.
        body = random.Random(11).randbytes(2 * 1024 * KiB)
        url = origin.add("/w.bin", body, etag='"abc"', rate=4_000_000)
        plain = run_fetcher("--source", url, "--dest", str(volume / "plain"), "--sha256", sha256(body), *SPLIT)
        assert plain.code == 0, plain.stderr
        assert plain.event("published")["transfer"] == "parallel"
        assert tree(volume / "plain") == {"w.bin": body}
        (volume / "plain" / "w.bin").unlink()

        # An archive is unpacked besides its spool: 2 x 2 MiB does not fit, so it comes on one stream.
        archive = make_tar({"m/w.bin": body})
        url = origin.add("/m.tar.gz", archive, etag='"v1"', rate=4_000_000)
        packed = run_fetcher("--source", url, "--dest", str(volume / "packed"), "--sha256", sha256(archive), *SPLIT)
        assert packed.code == 0, packed.stderr
        assert packed.event("published")["transfer"] == "stream"
        assert packed.event("one stream: too little free space to spool parallel parts")["needed"] == 2 * len(archive)
        assert tree(volume / "packed") == {"m/w.bin": body}


def test_a_weak_etag_does_not_pin_parts_so_the_object_is_one_stream(origin: Origin, tmp_path: Path) -> None:
    url = origin.add("/w.bin", BODY, etag='W/"abc"', rate=2_000_000)
    run = run_fetcher("--source", url, "--dest", str(tmp_path), "--sha256", sha256(BODY), *SPLIT)
    assert run.code == 0, run.stderr
    assert tree(tmp_path) == {"w.bin": BODY}
    assert run.event("published")["transfer"] == "stream"
    assert _ranges(origin, "/w.bin") == []


LAST_MODIFIED = "Wed, 01 Jan 2025 00:00:00 GMT"


def test_parts_are_pinned_by_last_modified_without_a_strong_etag(origin: Origin, tmp_path: Path) -> None:
    url = origin.add("/w.bin", BODY, etag='W/"abc"', last_modified=LAST_MODIFIED, rate=2_000_000)
    run = run_fetcher("--source", url, "--dest", str(tmp_path), "--sha256", sha256(BODY), *SPLIT)
    assert run.code == 0, run.stderr
    assert tree(tmp_path) == {"w.bin": BODY}
    assert run.event("published")["transfer"] == "parallel"
    ranged = [r.headers for r in origin.hits("/w.bin") if "Range" in r.headers]
    assert len(ranged) == 15
    assert {r["If-Unmodified-Since"] for r in ranged} == {LAST_MODIFIED}
    assert not any("If-Match" in r for r in ranged)


@pytest.mark.parametrize("conditionals", [True, False], ids=["412", "preconditions-ignored"])
@pytest.mark.fault(
    "an object pinned by Last-Modified changes between parallel parts: never stitched", exit=3, area="protocol"
)
def test_an_object_pinned_by_last_modified_that_changes_between_parts_is_never_stitched(
    origin: Origin, tmp_path: Path, conditionals: bool
) -> None:
    other = random.Random(6).randbytes(len(BODY))
    url = origin.add(
        "/w.bin",
        BODY,
        etag='W/"v1"',
        last_modified=LAST_MODIFIED,
        rate=2_000_000,
        then=(other, 'W/"v2"'),
        then_modified="Thu, 02 Jan 2025 00:00:00 GMT",
        conditionals=conditionals,
    )
    run = run_fetcher("--source", url, "--dest", str(tmp_path), *SPLIT)
    assert run.code == 3
    assert "changed during the download" in run.error
    assert tree(tmp_path) == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".fetcher"]


@pytest.mark.fault("a parallel part that trickles is cut and fetched again", exit=0, area="network")
def test_a_trickling_part_is_cut_and_fetched_again(origin: Origin, tmp_path: Path) -> None:
    # The first stream is slow enough to split; then one part request trickles at 100 bytes/s.
    url = origin.add("/w.bin", BODY, etag='"abc"', rate=2_000_000, trickle=[2_000_000, 100])
    low_speed = ("--low-speed-limit", "1Ki", "--low-speed-time", "1")
    run = run_fetcher("--source", url, "--dest", str(tmp_path), "--sha256", sha256(BODY), *SPLIT, *low_speed)
    assert run.code == 0, run.stderr
    assert tree(tmp_path) == {"w.bin": BODY}
    assert run.event("published")["transfer"] == "parallel"
    [retry] = run.all("retrying")
    assert "part" in retry and "below --low-speed-limit 1024 bytes/s" in retry["reason"]


def test_parts_cut_more_times_than_retries_go_on_while_each_cut_makes_progress(origin: Origin, tmp_path: Path) -> None:
    # Two connections, so each of the first two parts is cut, retried from where it broke, and cut again.
    url = origin.add("/w.bin", BODY, etag='"abc"', rate=2_000_000, cut_after=[10**9, 10_000, 10_000, 10_000, 10_000])
    split = ("--part-size", "64Ki", "--concurrency", "2", "--split-below", "100G")
    run = run_fetcher("--source", url, "--dest", str(tmp_path), "--sha256", sha256(BODY), *split, "--retries", "1")
    assert run.code == 0, run.stderr
    assert tree(tmp_path) == {"w.bin": BODY}
    assert run.event("published")["transfer"] == "parallel"
    retries = run.all("retrying")
    assert len(retries) == 4 and all("part" in r for r in retries)
    assert {r["attempt"] for r in retries} == {1}


def test_the_spool_of_an_artifact_no_longer_asked_for_goes_though_the_model_stands(
    origin: Origin, tmp_path: Path
) -> None:
    # Every artifact still configured is present, so no run takes the lock to clean: the spool stayed.
    url = origin.add("/w.bin", BODY, etag='"abc"')
    assert run_fetcher("--source", url, "--dest", str(tmp_path)).code == 0
    stale = tmp_path / ".fetcher" / "download-0123456789abcdef"
    stale.mkdir()
    (stale / "data").write_bytes(b"\0" * 4096)
    run = run_fetcher("--source", url, "--dest", str(tmp_path))
    assert run.code == 0, run.stderr
    assert run.all("already present")
    assert not stale.exists()
    assert len(origin.hits("/w.bin")) == 1
