"""--state-dir: fetcher's state outside dest, for servers that take every directory of dest as a model.

Triton loads each directory of its model repository, dot-names included, and exits on one it cannot
load; KServe's sklearn, xgboost and lightgbm servers do the same in their one-directory-per-model
layout. With --state-dir, dest holds the model and nothing else, while publishing, resuming and the
restart skip work as they do with dest/.fetcher.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT, Origin, _clean_env, make_tar, run_fetcher, sha256, small_volume, tree

MODEL = {"resnet/config.pbtxt": b'name: "resnet"', "resnet/1/model.onnx": b"weights" * 1000}
KiB = 1024


def only(directory: Path) -> Path:
    [entry] = directory.iterdir()
    return entry


def test_dest_holds_the_model_alone_and_a_restart_asks_nothing(origin: Origin, tmp_path: Path) -> None:
    archive = make_tar(MODEL)
    dest, state = tmp_path / "volume" / "repository", tmp_path / "volume" / "state"
    args = ["--source", origin.add("/m.tar.gz", archive), "--dest", str(dest), "--sha256", sha256(archive)]

    first = run_fetcher(*args, "--state-dir", str(state))

    assert first.code == 0, first.stderr
    assert sorted(os.listdir(dest)) == ["resnet"]  # what Triton lists: the model, no .fetcher
    assert tree(dest) == MODEL
    here = only(state)
    assert here.name.startswith("repository-")
    [marker] = here.glob("*.json")
    assert json.loads(marker.read_text())["sha256"] == sha256(archive)
    asked = len(origin.requests)

    again = run_fetcher(*args, env={"FETCHER_STATE_DIR": str(state)})

    assert again.code == 0, again.stderr
    assert again.event("already present")
    assert len(origin.requests) == asked  # the marker in --state-dir was found: no request at all
    assert sorted(os.listdir(dest)) == ["resnet"]


def test_the_dry_run_shows_where_the_state_goes(tmp_path: Path) -> None:
    run = run_fetcher(
        "--source",
        "https://example.com/m.tar.gz",
        "--dest",
        str(tmp_path / "d"),
        "--state-dir",
        "/var/fetcher",
        "--dry-run",
    )
    assert run.code == 0, run.stderr
    assert '"state_dir": "/var/fetcher/d-' in run.stdout
    assert not (tmp_path / "d").exists()


def test_state_left_in_dest_by_an_earlier_run_moves_to_the_state_dir(origin: Origin, tmp_path: Path) -> None:
    archive = make_tar(MODEL)
    dest, state = tmp_path / "repository", tmp_path / "state"
    args = ["--source", origin.add("/m.tar.gz", archive), "--dest", str(dest), "--sha256", sha256(archive)]
    assert run_fetcher(*args).code == 0
    assert (dest / ".fetcher").is_dir()
    asked = len(origin.requests)

    run = run_fetcher(*args, "--state-dir", str(state))

    assert run.code == 0, run.stderr
    assert run.event("state moved to --state-dir")["state_dir"] == str(only(state))
    assert run.event("already present")  # its marker moved with it
    assert len(origin.requests) == asked
    assert sorted(os.listdir(dest)) == ["resnet"]


def test_a_state_dir_on_another_mount_is_refused_before_any_download(origin: Origin, tmp_path: Path) -> None:
    archive = make_tar(MODEL)
    dest = tmp_path / "repository"
    url = origin.add("/m.tar.gz", archive)
    with small_volume(tmp_path / "elsewhere", "16m") as elsewhere:
        run = run_fetcher(
            "--source", url, "--dest", str(dest), "--sha256", sha256(archive), "--state-dir", str(elsewhere / "s")
        )
        assert run.code == 2, run.stderr
        assert "is not on the mount of --dest" in run.error
        assert os.listdir(elsewhere / "s") == []
    assert origin.requests == []
    assert not dest.exists()  # created by this run, and left as it was found


def test_a_killed_download_resumes_from_the_state_dir(origin: Origin, tmp_path: Path) -> None:
    body = random.Random(3).randbytes(4096 * KiB)
    dest, state = tmp_path / "repository", tmp_path / "state"
    url = origin.add("/big.bin", body, etag='"big"', rate=1_000_000)
    args = ["--source", url, "--dest", str(dest), "--sha256", sha256(body), "--state-dir", str(state)]
    args += ["--part-size", "128Ki", "--concurrency", "2", "--split-below", "100G"]
    first = subprocess.Popen(
        [sys.executable, "-m", "fetcher", *args],
        cwd=ROOT,
        env=_clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline, journal = time.monotonic() + 60, None
    while time.monotonic() < deadline and journal is None:
        found = list(state.glob("*/download-*/journal"))
        if found and len(found[0].read_text().splitlines()) > 1 + 10:  # header + 10 parts
            journal = found[0]
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert journal is not None, "the first run never got 10 parts in"
    assert os.listdir(dest) == []  # killed: nothing published, and nothing of fetcher's in dest either

    second = run_fetcher(*args)

    assert second.code == 0, second.stderr
    assert second.event("resuming")["parts_on_disk"] >= 10
    assert os.listdir(dest) == ["big.bin"]
    assert tree(dest) == {"big.bin": body}


def test_artifacts_sharing_a_dest_share_its_state_dir(tmp_path: Path) -> None:
    config = tmp_path / "fetcher.yaml"
    config.write_text(
        f"dest: {tmp_path / 'models'}\nartifacts:\n"
        f"  - source: https://example.com/a.tar.gz\n    state_dir: {tmp_path / 'one'}\n"
        "  - source: https://example.com/b.tar.gz\n"
    )
    run = run_fetcher("--config", str(config), "--dry-run")
    assert run.code == 2
    assert "share the dest" in run.error and "--state-dir" in run.error
