"""Every archive format, decided from the bytes, and every way an archive can be hostile."""

from __future__ import annotations

import bz2
import ctypes
import gzip
import lzma
import mmap
import os
import random
import stat
from pathlib import Path

import pytest

from tests.conftest import (
    Origin,
    make_tar,
    make_tar_zst,
    make_zip,
    published,
    run_fetcher,
    sha256,
    small_volume,
    tree,
)
from tests.test_tree import Sandbox, refusal, refused


@pytest.fixture
def sandbox(tmp_path: Path, origin: Origin) -> Sandbox:
    """dest deep in a watched directory, for cases that check the whole promise (tests/test_tree.py)."""
    return Sandbox(tmp_path, origin)


FILES = {"m/config.json": b'{"a": 1}\n', "m/weights.bin": b"\x00\x01" * 5000}


def _fetch(origin: Origin, tmp_path: Path, body: bytes, name: str = "/artifact", *args: str) -> tuple[int, Path, str]:
    dest = tmp_path / "dest"
    run = run_fetcher("--source", origin.add(name, body), "--dest", str(dest), *args)
    return run.code, dest, run.error if run.code else ""


@pytest.mark.parametrize(
    ("fmt", "build"),
    [
        ("tar", lambda: make_tar(FILES, compression="")),
        ("tar.gz", lambda: make_tar(FILES, compression="gz")),
        ("tar.bz2", lambda: make_tar(FILES, compression="bz2")),
        ("tar.xz", lambda: make_tar(FILES, compression="xz")),
        ("tar.zst", lambda: make_tar_zst(FILES)),
        ("zip", lambda: make_zip(FILES)),
    ],
)
def test_each_format_is_detected_from_its_bytes_not_the_url(origin: Origin, tmp_path: Path, fmt: str, build) -> None:
    body = build()
    dest = tmp_path / "dest"
    # the URL says nothing about the format
    run = run_fetcher("--source", origin.add("/download", body), "--dest", str(dest), "--sha256", sha256(body))
    assert run.code == 0, run.stderr
    assert run.event("published")["format"] == fmt
    assert tree(dest) == FILES


@pytest.mark.parametrize("fmt", ["tar", "tar.gz", "tar.bz2", "tar.xz", "tar.zst", "zip"])
def test_an_explicit_format_is_honoured(origin: Origin, tmp_path: Path, fmt: str) -> None:
    builders = {
        "tar": lambda: make_tar(FILES, compression=""),
        "tar.gz": lambda: make_tar(FILES),
        "tar.bz2": lambda: make_tar(FILES, compression="bz2"),
        "tar.xz": lambda: make_tar(FILES, compression="xz"),
        "tar.zst": lambda: make_tar_zst(FILES),
        "zip": lambda: make_zip(FILES),
    }
    code, dest, error = _fetch(origin, tmp_path, builders[fmt](), "/a", "--extract", fmt)
    assert code == 0, error
    assert tree(dest) == FILES


def test_explicit_format_that_does_not_match_the_bytes(origin: Origin, tmp_path: Path) -> None:
    code, dest, error = _fetch(origin, tmp_path, make_zip(FILES), "/a.tar.gz", "--extract", "tar.gz")
    assert code == 5
    assert "--extract tar.gz" in error and "zip" in error
    assert published(dest) == []


def test_extract_none_keeps_the_archive_as_a_file(origin: Origin, tmp_path: Path) -> None:
    body = make_tar(FILES)
    code, dest, _ = _fetch(origin, tmp_path, body, "/bundle.tar.gz", "--extract", "none")
    assert code == 0
    assert tree(dest) == {"bundle.tar.gz": body}


@pytest.mark.parametrize(("declared", "kind"), [("tar.xz", "xz"), ("tar.zst", "zst"), ("zip", "zip")])
def test_an_extract_that_does_not_match_the_data_says_what_arrived(
    origin: Origin, tmp_path: Path, declared: str, kind: str
) -> None:
    code, dest, error = _fetch(origin, tmp_path, make_tar(FILES), "/model.tar.gz", "--extract", declared)
    assert code == 5
    assert error == f"--extract {declared}, but the data is not {kind} (it looks like: tar.gz)"
    assert tree(dest) == {}


def test_extract_zip_on_a_gzipped_file_says_it_is_gzip(origin: Origin, tmp_path: Path) -> None:
    code, dest, error = _fetch(origin, tmp_path, gzip.compress(b"notes\n" * 100), "/notes.gz", "--extract", "zip")
    assert code == 5
    assert error == "--extract zip, but the data is not zip (it looks like: gz)"
    assert tree(dest) == {}


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress])
def test_a_compressed_file_that_is_not_a_tar_is_saved_as_is(origin: Origin, tmp_path: Path, compress) -> None:
    body = compress(b"just some text, not a tar archive\n" * 50)
    code, dest, _ = _fetch(origin, tmp_path, body, "/notes.txt.gz")
    assert code == 0
    assert tree(dest) == {"notes.txt.gz": body}


def test_filename_names_a_plain_file(origin: Origin, tmp_path: Path) -> None:
    code, dest, _ = _fetch(origin, tmp_path, b"onnx bytes", "/download", "--filename", "model.onnx")
    assert code == 0
    assert tree(dest) == {"model.onnx": b"onnx bytes"}


def test_strip_components(origin: Origin, tmp_path: Path) -> None:
    body = make_tar({"release-1.2/model/config.json": b"{}", "release-1.2/README": b"hi"})
    code, dest, _ = _fetch(origin, tmp_path, body, "/a", "--strip-components", "1")
    assert code == 0
    assert tree(dest) == {"model/config.json": b"{}", "README": b"hi"}


def test_multi_member_gzip_is_read_to_the_end(origin: Origin, tmp_path: Path) -> None:
    # pigz and concatenated gzip files produce several members; all of it is one tar
    raw = make_tar(FILES, compression="")
    body = gzip.compress(raw[:10240]) + gzip.compress(raw[10240:])
    code, dest, error = _fetch(origin, tmp_path, body, "/a", "--sha256", sha256(body))
    assert code == 0, error
    assert tree(dest) == FILES


def test_symlinks_and_hardlinks_inside_the_tree_are_kept(origin: Origin, tmp_path: Path) -> None:
    body = make_tar(
        {
            "m/weights-v1.bin": b"w" * 100,
            "m/weights.bin": ("symlink", "weights-v1.bin"),
            "m/copy.bin": ("hardlink", "m/weights-v1.bin"),
        }
    )
    code, dest, error = _fetch(origin, tmp_path, body)
    assert code == 0, error
    assert (dest / "m/weights.bin").is_symlink() and (dest / "m/weights.bin").read_bytes() == b"w" * 100
    assert (dest / "m/copy.bin").read_bytes() == b"w" * 100


def test_setuid_and_setgid_are_stripped(origin: Origin, tmp_path: Path) -> None:
    body = make_tar({"bin/tool": ("file", (b"#!/bin/sh\n", 0o6755)), "bin/data": ("file", (b"x", 0o2644))})
    code, dest, _ = _fetch(origin, tmp_path, body)
    assert code == 0
    assert stat.S_IMODE((dest / "bin/tool").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "bin/data").stat().st_mode) == 0o644


HOSTILE = {
    "absolute path": ({"/etc/cron.d/evil": b"x"}, "absolute path"),
    "dot-dot": ({"m/../../evil": b"x"}, "'..'"),
    "symlink to absolute": ({"m/link": ("symlink", "/etc/passwd")}, "symlink to absolute"),
    "symlink escaping": ({"m/link": ("symlink", "../../../etc")}, "leads outside"),
    "hardlink escaping": ({"m/link": ("hardlink", "../etc/passwd")}, "'..'"),
    "hardlink to nothing": ({"m/link": ("hardlink", "m/absent")}, "not a file unpacked before it"),
    "hardlink to a directory": ({"m/link": ("hardlink", "m")}, "not a file unpacked before it"),
    "device": ({"m/dev": ("chr", None)}, "device files"),
    "fifo": ({"m/pipe": ("fifo", None)}, "FIFOs"),
    "state dir": ({".fetcher/evil.json": b"{}"}, "state directory"),
    "file named '.'": ({"m/.": b"x"}, "cannot be named '.'"),
}


@pytest.mark.parametrize(
    "case", [pytest.param(case, marks=refusal(f"a tar member: {case}"), id=case) for case in sorted(HOSTILE)]
)
def test_hostile_tar_members_are_refused_and_nothing_is_published(sandbox: Sandbox, case: str) -> None:
    members, reason = HOSTILE[case]
    body = make_tar({"m/fine.txt": b"fine", **members})
    refused(sandbox, body, next(iter(members)), reason, "--sha256", sha256(body))


def test_a_member_name_made_to_stall_the_log_scrubber_is_refused_at_once(origin: Origin, tmp_path: Path) -> None:
    # The refusal names the member, and every log line passes the secret scrubber: a regex that
    # backtracked on long runs of name characters took minutes over this 64 KB name.
    name = "/" + "a-" * 32_000
    url = origin.add("/a", make_tar({name: b"x"}))
    run = run_fetcher("--source", url, "--dest", str(tmp_path / "dest"), timeout=30)
    assert run.code == 5
    assert "absolute path" in run.error and name[:50] in run.error and f"({len(name)} bytes)" in run.error
    assert published(tmp_path / "dest") == []


@refusal("zip slip: a zip entry named ../../evil.txt")
def test_zip_slip_is_refused(sandbox: Sandbox) -> None:
    refused(sandbox, make_zip({"../../evil.txt": b"x"}), "../../evil.txt", "'..'")


@refusal("a zip symlink to an absolute path")
def test_zip_symlink_out_of_dest_is_refused(sandbox: Sandbox) -> None:
    refused(sandbox, make_zip({"a.txt": b"a"}, symlinks={"link": "/etc/passwd"}), "'link'", "symlink")


@refusal("more members than --max-members")
def test_too_many_members(sandbox: Sandbox) -> None:
    body = make_tar({f"m/{i}.txt": b"x" for i in range(20)})
    refused(sandbox, body, "", "--max-members", "--max-members", "10")


@refusal("a tar.gz bomb: 20 KB that unpacks to 20 MB, over --max-unpacked-size")
def test_a_decompression_bomb_is_stopped_at_the_size_limit(sandbox: Sandbox) -> None:
    body = make_tar({"m/zeros.bin": b"\0" * 20_000_000})  # ~20 KB compressed
    assert len(body) < 100_000
    refused(sandbox, body, "", "--max-unpacked-size", "--max-unpacked-size", "1Mi")


def test_a_corrupt_archive_is_exit_5(origin: Origin, tmp_path: Path) -> None:
    good = make_tar(FILES)
    corrupt = good[:40] + bytes(b ^ 0xFF for b in good[40:200]) + good[200:]
    code, dest, error = _fetch(origin, tmp_path, corrupt)
    assert code == 5
    assert "corrupt" in error
    assert published(dest) == []


def test_a_corrupt_archive_with_the_wrong_checksum_is_an_integrity_failure(origin: Origin, tmp_path: Path) -> None:
    good = make_tar(FILES)
    corrupt = good[:40] + bytes(b ^ 0xFF for b in good[40:200]) + good[200:]
    code, _dest, error = _fetch(origin, tmp_path, corrupt, "/a", "--sha256", sha256(good))
    assert code == 4
    assert "sha256 mismatch" in error


def test_a_truncated_archive_is_refused(origin: Origin, tmp_path: Path) -> None:
    good = make_tar({"m/w.bin": bytes(range(256)) * 4000})
    code, dest, error = _fetch(origin, tmp_path, good[: len(good) // 2])
    assert code == 5
    assert "truncated" in error or "ends in the middle" in error, error
    assert published(dest) == []


# A chain: each link is harmless when written, but ``up`` (an empty directory when ``x`` is
# written, then replaced by a link) turns ``x`` into a way out.
CHAIN = {
    "a/b/c/up/": ("dir", 0o755),
    "x": ("symlink", "a/b/c/up/.."),
    "a/b/c/up": ("symlink", "../../.."),
}


def test_a_symlink_chain_that_ends_outside_is_refused(origin: Origin, tmp_path: Path) -> None:
    code, dest, error = _fetch(origin, tmp_path, make_tar({**CHAIN, "ok.txt": b"ok"}))
    assert code == 5, error
    assert "'x'" in error and "leads outside" in error
    assert published(dest) == []


def test_a_file_cannot_be_written_through_a_symlink_chain(origin: Origin, tmp_path: Path) -> None:
    code, _dest, error = _fetch(origin, tmp_path, make_tar({**CHAIN, "x/evil.txt": b"evil"}))
    assert code == 5, error
    assert "written through the symlink 'x'" in error
    assert not (tmp_path / "evil.txt").exists()


def test_a_zip_symlink_target_is_read_no_further_than_a_path_can_be(origin: Origin, tmp_path: Path) -> None:
    code, _dest, error = _fetch(origin, tmp_path, make_zip({"a.txt": b"a"}, symlinks={"link": "x" * 100_000}))
    assert code == 5
    assert "symlink target longer than 4096 bytes" in error


@pytest.mark.parametrize(
    ("members", "args", "message"),
    [
        (
            {"release/model/config.json": b"{}"},
            ("--strip-components", "5"),
            "nothing to unpack after --strip-components 5",
        ),
        ({"./": ("dir", 0o755)}, (), "the archive has nothing to unpack"),
    ],
)
def test_an_archive_that_yields_no_files_is_refused(origin: Origin, tmp_path: Path, members, args, message) -> None:
    code, _dest, error = _fetch(origin, tmp_path, make_tar(members), "/a", *args)
    assert code == 5
    assert message in error


def test_a_hardlink_to_a_symlink_and_a_colon_in_a_name_are_fine(origin: Origin, tmp_path: Path) -> None:
    body = make_tar(
        {"m/data:v1.bin": b"d", "m/latest": ("symlink", "data:v1.bin"), "m/current": ("hardlink", "m/latest")}
    )
    code, dest, error = _fetch(origin, tmp_path, body)
    assert code == 0, error
    assert (dest / "m/current").read_bytes() == b"d"


@refusal("a tar.zst bomb over --max-unpacked-size")
def test_a_zstd_bomb_is_stopped_at_the_size_limit(sandbox: Sandbox) -> None:
    body = make_tar_zst({"m/zeros.bin": b"\0" * 50_000_000})
    assert len(body) < 100_000
    refused(sandbox, body, "", "--max-unpacked-size", "--max-unpacked-size", "1Mi")


def test_zero_padding_after_the_gzip_stream_is_ignored_like_gzip_does(origin: Origin, tmp_path: Path) -> None:
    padded = make_tar(FILES) + b"\0" * 10240  # tape-style blocking, as `tar -b` or dd leave it
    code, dest, error = _fetch(origin, tmp_path, padded, "/padded.tar.gz", "--sha256", sha256(padded))
    assert code == 0, error
    assert tree(dest) == FILES


def test_bytes_after_zero_padding_are_still_refused(origin: Origin, tmp_path: Path) -> None:
    code, dest, error = _fetch(origin, tmp_path, make_tar(FILES) + b"\0" * 2048 + b"junk", "/junk.tar.gz")
    assert code == 5
    assert "corrupt gz data" in error
    assert published(dest) == []


def test_an_unsafe_member_fails_at_once_without_waiting_for_the_rest(origin: Origin, tmp_path: Path) -> None:
    noise = random.Random(3).randbytes
    hostile = make_tar({"m/a.bin": noise(10 * 2**17), "../evil": b"x", "m/b.bin": noise(4 * 2**20)})
    url = origin.add("/slow.tar.gz", hostile, stall_after=(3 * 2**19, 60))  # past the 1 MiB sniffed, then silent
    run = run_fetcher("--source", url, "--dest", str(tmp_path / "dest"), "--timeout", "120", timeout=30)
    assert run.code == 5
    assert "'..' in its path" in run.error


def test_a_connection_lost_while_finishing_the_hash_is_not_called_a_mismatch(origin: Origin, tmp_path: Path) -> None:
    noise = random.Random(4).randbytes
    hostile = make_tar({"m/a.bin": noise(10 * 2**17), "../evil": b"x", "m/b.bin": noise(4 * 2**20)})
    # The unsafe member arrives, then the server goes quiet and drops the connection.
    url = origin.add("/cut.tar.gz", hostile, stall_after=(3 * 2**19, 1), cut_after=[0])
    run = run_fetcher("--source", url, "--dest", str(tmp_path / "dest"), "--sha256", sha256(hostile), "--retries", "0")
    assert run.code == 3, run.stderr
    assert "sha256 mismatch" not in run.error


MiB = 1024 * 1024


LARGE_FILES = {
    "model/weights-1.safetensors": random.Random(21).randbytes(20 * MiB + 4097),
    "model/weights-2.safetensors": random.Random(22).randbytes(8 * MiB - 1),
    "model/weights-3.safetensors": random.Random(23).randbytes(8 * MiB),
    "model/config.json": b'{"hidden_size": 64}\n',
}


def test_large_files_of_any_size_arrive_intact(origin: Origin, tmp_path: Path) -> None:
    """Large files are written around the page cache in whole blocks; their odd ends must still land."""
    run = run_fetcher("--source", origin.add("/m.tar.gz", make_tar(LARGE_FILES)), "--dest", str(tmp_path / "a"))
    assert run.code == 0, run.stderr
    assert tree(tmp_path / "a") == LARGE_FILES

    raw = random.Random(24).randbytes(12 * MiB + 513)
    run = run_fetcher("--source", origin.add("/w.bin", raw), "--dest", str(tmp_path / "b"), "--sha256", sha256(raw))
    assert run.code == 0, run.stderr
    assert tree(tmp_path / "b") == {"w.bin": raw}


def test_a_volume_without_direct_io_gets_the_same_files(origin: Origin, tmp_path: Path) -> None:
    """ramfs refuses O_DIRECT, as FUSE and some network filesystems do: files are written through the cache."""
    with small_volume(tmp_path / "volume", "64m", kind="ramfs") as volume:
        run = run_fetcher("--source", origin.add("/m.tar.gz", make_tar(LARGE_FILES)), "--dest", str(volume))
        assert run.code == 0, run.stderr
        assert tree(volume) == LARGE_FILES


def _cached_bytes(path: Path) -> int:
    """How much of the file the page cache holds (mincore(2) over a mapping of it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    resident = (ctypes.c_ubyte * pages)()
    with path.open("rb") as file, mmap.mmap(file.fileno(), size, access=mmap.ACCESS_COPY) as mapping:
        start = ctypes.c_char.from_buffer(mapping)
        failed = libc.mincore(ctypes.c_void_p(ctypes.addressof(start)), ctypes.c_size_t(size), resident)
        del start  # the mapping cannot close while it is exported
    assert failed == 0, os.strerror(ctypes.get_errno())
    return sum(page & 1 for page in resident) * mmap.PAGESIZE


def _filesystem(path: Path) -> str:
    mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    return max((m for m in mounts if str(path).startswith(m[1].rstrip("/") + "/")), key=lambda m: len(m[1]))[2]


def test_a_large_file_is_written_around_the_page_cache(origin: Origin, tmp_path: Path) -> None:
    """Past its first 8 MiB, a file goes to disk with O_DIRECT: no CPU spent filling the cache, none charged."""
    if _filesystem(tmp_path) == "tmpfs":
        pytest.skip("on tmpfs the page cache is the storage")
    probe = tmp_path / "probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
    except OSError:
        pytest.skip(f"{_filesystem(tmp_path)} refuses O_DIRECT")
    probe.unlink()
    body = random.Random(23).randbytes(40 * MiB + 100)
    run = run_fetcher("--source", origin.add("/w.bin", body, ranges=False), "--dest", str(tmp_path))
    assert run.code == 0, run.stderr
    written = tmp_path / "w.bin"
    assert _cached_bytes(written) <= 8 * MiB + mmap.PAGESIZE  # the buffered start and the last partial block
    assert written.read_bytes() == body
    assert _cached_bytes(written) > 39 * MiB  # once read it is cached: the measure can tell


def test_a_full_volume_fails_with_exit_6_and_leaves_nothing(origin: Origin, tmp_path: Path) -> None:
    body = random.Random(22).randbytes(16 * MiB)
    url = origin.add("/w.bin", body, ranges=False)  # one stream, written as it comes
    with small_volume(tmp_path / "volume", "10m") as volume:
        run = run_fetcher("--source", url, "--dest", str(volume / "models"), "--sha256", sha256(body))
        assert run.code == 6
        assert "No space left on device" in run.error
        assert tree(volume / "models") == {}
        assert os.listdir(volume) == []  # no staging, no lock, not even the dest this run created
