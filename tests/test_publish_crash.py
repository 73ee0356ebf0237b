"""A publish killed or failing at any instant: the next run, healthy or not, finds the old version or the new.

Kills land at exact points through strace's fault injection (``inject=rename:signal=KILL:when=N``: the
process dies at its Nth rename, the syscall a publish is made of), at random instants with SIGKILL, and
during the recovery itself. Failures land through ``inject=rename:error=EIO``. After each, a run whose
origin is down (503, no retries) must find dest exactly as one version left it, with a marker that
matches it and nothing of the interrupted publish left; then a healthy run publishes the new version.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, Origin, Run, _clean_env, make_tar, needs, run_fetcher, sha256, small_volume

needs_strace = needs("strace")

RENAMES = "rename,renameat,renameat2"
TOP = 400  # top-level entries: a rename or two each


def version(n: int) -> dict[str, bytes | tuple[str, Any]]:
    """Many top-level files, a directory of many more, and entries only this version has."""
    members: dict[str, bytes | tuple[str, Any]] = {f"f{i:04d}.bin": f"v{n} {i}".encode() for i in range(TOP)}
    members |= {f"model/layer{i:04d}.bin": f"v{n} layer {i}".encode() for i in range(1600)}
    members[f"adapter-v{n}.bin"] = f"adapter {n}".encode()
    members["latest"] = ("symlink", "model")
    return members


V1, V2 = make_tar(version(1), compression=""), make_tar(version(2), compression="")


def snapshot(dest: Path) -> dict[str, Any]:
    """Everything in dest but fetcher's state: kind, content or target, mode."""
    found: dict[str, Any] = {}
    for directory, dirs, files in os.walk(dest):
        dirs[:] = sorted(d for d in dirs if not (directory == str(dest) and d == ".fetcher"))
        for name in [*dirs, *files]:
            path = Path(directory, name)
            info = path.lstat()
            kind = (
                ("link", os.readlink(path))
                if path.is_symlink()
                else ("dir", None)
                if path.is_dir()
                else ("file", path.read_bytes())
            )
            found[str(path.relative_to(dest))] = (*kind, info.st_mode & 0o7777)
    return found


def state(where: Path) -> list[str]:
    """What a state directory holds (dest/.fetcher, or dest's under --state-dir)."""
    return sorted(os.listdir(where))


def markers(where: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(where.glob("*.json"))]


class Scene:
    """A dest holding V1 (and a file of the user's), the origin serving V2 at the same URL."""

    def __init__(self, origin: Origin, tmp_path: Path, *settings: str, elsewhere: bool = False) -> None:
        """``elsewhere``: fetcher's state under --state-dir, beside dest on its volume."""
        self.origin, self.dest = origin, tmp_path / "dest"
        self.root = tmp_path / "state" if elsewhere else None
        self.settings = (*settings, "--state-dir", str(self.root)) if self.root else settings
        self.url = origin.add("/m.tar", V1)
        self.dest.mkdir()
        (self.dest / "notes.txt").write_bytes(b"the user's")
        assert run_fetcher(*self.args(V1)).code == 0
        self.state = self.dest / ".fetcher" if self.root is None else next(self.root.iterdir())
        self.pristine = tmp_path / "pristine"
        shutil.copytree(self.dest, self.pristine, symlinks=True)  # mtimes too: V1's marker still holds
        if self.root is not None:
            shutil.copytree(self.root, self.pristine.with_name("pristine-state"), symlinks=True)
        self.old = snapshot(self.dest)
        self.serve(V2)
        assert self.strace("", *self.args(V2)).returncode == 0
        self.total = self.calibrate()  # renames of a healthy publish of the update
        assert self.total > 2 * TOP
        self.new = snapshot(self.dest)
        assert self.old != self.new and "adapter-v1.bin" in self.old and "adapter-v1.bin" not in self.new
        self.reset()

    def args(self, archive: bytes, *extra: str) -> list[str]:
        return ["--source", self.url, "--dest", str(self.dest), "--sha256", sha256(archive), *self.settings, *extra]

    def serve(self, archive: bytes, down: bool = False) -> None:
        self.origin.add("/m.tar", archive, fail=[503] * 1000 if down else [])

    def reset(self) -> None:
        shutil.rmtree(self.dest)
        shutil.copytree(self.pristine, self.dest, symlinks=True)
        if self.root is not None:
            shutil.rmtree(self.root)
            shutil.copytree(self.pristine.with_name("pristine-state"), self.root, symlinks=True)
        self.serve(V2)

    def strace(self, inject: str, *args: str, calls: str = RENAMES) -> subprocess.CompletedProcess[str]:
        """fetcher under strace, ``calls`` (renames) injected as asked; the strace log says which ran.

        ``when=N`` counts a thread's renames (a publish's are all the main thread's), whatever it
        renames: the Nth must be one of dest's, or the fault landed outside the publish and the case
        tests nothing. For other ``calls``, the caller checks with ``traced``.
        """
        log = self.dest.parent / "strace.log"
        command = ["strace", "-f", "-qq", "-y", "-o", str(log), "-e", f"trace={calls}"]
        if inject:
            command += ["-e", f"inject={calls}:{inject}"]
        env = _clean_env() | {"FETCHER_RETRY_BACKOFF": "0.05", "FETCHER_TERMINATION_LOG": "/dev/null"}
        ran = subprocess.run(
            [*command, sys.executable, "-m", "fetcher", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=120,
        )
        if calls == RENAMES and (when := re.search(r"when=(\d+)", inject)) is not None:
            renames, n = self.renames(), int(when[1])
            assert len(renames) >= n, f"only {len(renames)} renames ran, none was the {n}th: {ran.stderr[-2000:]}"
            assert self.in_dest(renames[n - 1]), f"the {n}th rename is not one of dest's: {renames[n - 1]}"
        return ran

    def renames(self) -> list[str]:
        """The renames of the last run under strace, in order (a call a thread resumes is one line)."""
        return [line for line in self.traced() if "rename" in line]

    def traced(self) -> list[str]:
        """The calls the last run under strace made, in order (a call a thread resumes is one line)."""
        lines = (self.dest.parent / "strace.log").read_text().splitlines()
        calls = [line for line in lines if "resumed>" not in line]
        return [line for line in calls if not line.split(" ", 1)[-1].startswith(("+++", "---"))]  # exits, signals

    def in_dest(self, rename: str) -> bool:
        """Whether a rename of the strace log moves something of dest (or of its state directory)."""
        source = re.search(r'"((?:[^"\\]|\\.)*)"', rename)
        places = (f"{self.dest}/", f"{self.root}/") if self.root else (f"{self.dest}/",)
        return source is not None and source[1].startswith(places)

    def calibrate(self) -> int:
        """How many renames the publish makes, once it is checked they are the run's first.

        Then when=1..total land inside the publish, whatever else the process renames after it:
        under ``coverage run`` (scripts/test) fetcher renames its coverage data file at exit.
        """
        renames = self.renames()
        total = sum(1 for line in renames if self.in_dest(line))
        others = [line for line in renames[:total] if not self.in_dest(line)]
        assert not others, f"renames outside dest during the publish shift every kill point: {others[:3]}"
        return total

    def check_down(self, capabilities: bool = True) -> Run:
        """With the origin down: exactly one version, its marker, nothing of the interrupted publish."""
        self.serve(V2, down=True)
        run = run_fetcher(*self.args(V2), "--retries", "0", capabilities=capabilities)
        now = snapshot(self.dest)
        [marker] = markers(self.state)
        if now == self.new:
            assert run.code == 0, run.stderr  # finished: already present
            assert marker["sha256"] == sha256(V2)
        else:
            assert now == self.old, sorted(set(now.items()) ^ set(self.old.items()))[:5]
            assert run.code == 3, run.stderr
            assert run.error.startswith("HTTP 503"), run.error
            assert marker["sha256"] == sha256(V1)
        assert state(self.state) == sorted(["lock", f"{marker_key(self.state)}.json"])
        return run

    def check_healthy(self, capabilities: bool = True) -> None:
        self.serve(V2)
        run = run_fetcher(*self.args(V2), capabilities=capabilities)
        assert run.code == 0, run.stderr
        assert snapshot(self.dest) == self.new
        assert [m["sha256"] for m in markers(self.state)] == [sha256(V2)]


def marker_key(where: Path) -> str:
    [path] = where.glob("*.json")
    return path.stem


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs: thousands of fsyncs and copies, many times over, at memory speed."""
    with small_volume(tmp_path / "volume", "512m") as path:
        yield path


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    """One V1 dest and its snapshots for the module: built once, reset for each test."""
    origin = Origin()
    try:
        with small_volume(tmp_path_factory.mktemp("crash") / "volume", "512m") as path:
            yield Scene(origin, path)
    finally:
        origin.close()


@pytest.fixture
def scene(base: Scene) -> Scene:
    base.reset()
    return base


@pytest.fixture(scope="module")
def scene_elsewhere(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    """The same, with fetcher's state under --state-dir on dest's volume."""
    origin = Origin()
    try:
        with small_volume(tmp_path_factory.mktemp("crash-elsewhere") / "volume", "512m") as path:
            yield Scene(origin, path, elsewhere=True)
    finally:
        origin.close()


def kill_points(total: int, count: int, seed: int) -> list[int]:
    """The first and last renames, and a seeded sample of those between.

    FETCHER_CRASH_POINTS raises the sample for a longer soak (every rename: the number of renames).
    """
    count = min(int(os.environ.get("FETCHER_CRASH_POINTS", count)), total - 5)
    chosen = {1, 2, 3, total - 1, total}
    chosen |= set(random.Random(seed).sample(range(4, total - 1), count))
    return sorted(chosen)


@needs_strace
@pytest.mark.fault("kill -9 at exact renames of a publish of thousands of entries", exit=3, area="process")
@pytest.mark.parametrize("seed", [1])
def test_a_kill_at_any_rename_leaves_the_old_or_the_new_version(scene: Scene, seed: int) -> None:
    outcomes = set()
    for n in kill_points(scene.total, 4, seed):
        scene.reset()
        killed = scene.strace(f"signal=KILL:when={n}", *scene.args(V2))
        assert killed.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), (n, killed.stderr[-2000:])
        run = scene.check_down()
        outcomes.add(run.code)
        if run.code == 0:
            assert run.event("interrupted publish finished")["dest"] == str(scene.dest)
        scene.check_healthy()
    assert outcomes == {0, 3}  # kills before the journal and after it: both were hit


@needs_strace
@pytest.mark.fault("kill -9 at exact renames of a publish from --state-dir", exit=3, area="process")
def test_a_kill_at_any_rename_with_the_state_elsewhere_leaves_the_old_or_the_new_version(
    scene_elsewhere: Scene,
) -> None:
    scene, outcomes = scene_elsewhere, set()
    for n in kill_points(scene.total, 3, 2):
        scene.reset()
        killed = scene.strace(f"signal=KILL:when={n}", *scene.args(V2))
        assert killed.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), (n, killed.stderr[-2000:])
        outcomes.add(scene.check_down().code)
        assert ".fetcher" not in os.listdir(scene.dest)
        scene.check_healthy()
    assert outcomes == {0, 3}


@needs_strace
@pytest.mark.fault("kill -9 during the recovery of an interrupted publish", exit=0, area="process")
def test_a_kill_during_recovery_is_recovered_from(scene: Scene) -> None:
    total = scene.total
    for n, m in [(total // 2, 1), (total // 3, TOP // 2), (total - 1, 1)]:
        scene.reset()
        scene.strace(f"signal=KILL:when={n}", *scene.args(V2))
        scene.serve(V2, down=True)  # the recovering run is killed too, at its mth rename
        killed = scene.strace(f"signal=KILL:when={m}", *scene.args(V2, "--retries", "0"))
        assert killed.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), (n, m, killed.stderr[-2000:])
        assert scene.check_down().code == 0
        scene.check_healthy()


@needs_strace
@pytest.mark.fault("kill -9 once the new version is in, while the old one is removed", exit=0, area="process")
def test_a_kill_while_the_old_version_is_removed_leaves_nothing_behind(scene: Scene) -> None:
    """The journal is gone, so the publish is complete; the trash (the old version, as large as the
    model) and staging are not gone yet. The next run finds the new version present, and must still
    clear them: no later run would, and the old version would hold its disk for good."""
    assert scene.strace("", *scene.args(V2), calls="unlinkat").returncode == 0
    removals = scene.traced()
    n = next(i for i, line in enumerate(removals, 1) if "/trash-" in line)  # the first entry of the trash
    assert len({line.split(" ", 1)[0] for line in removals[:n]}) == 1  # strace counts each thread's calls
    scene.reset()
    killed = scene.strace(f"signal=KILL:when={n}", *scene.args(V2), calls="unlinkat")
    assert killed.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), killed.stderr[-2000:]
    assert snapshot(scene.dest) == scene.new
    assert [name for name in state(scene.state) if name.startswith("trash-")], state(scene.state)
    assert scene.check_down().code == 0  # already present, and nothing of the publish left
    scene.check_healthy()


def test_a_run_whose_model_is_present_does_not_wait_on_another_runs_staging(scene: Scene) -> None:
    """Another fetcher holds dest's lock, its staging beside the marker (a replica on a shared
    volume): a run whose model is present skips at once, and leaves them to their owner."""
    scene.serve(V1, down=True)
    staging = scene.state / "staging-0123456789ab"
    staging.mkdir()
    fd = os.open(scene.state / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        run = run_fetcher(*scene.args(V1), "--retries", "0", timeout=15)
    finally:
        os.close(fd)
    assert run.code == 0, run.stderr
    assert run.event("already present")["dest"] == str(scene.dest)
    assert staging.is_dir()


@pytest.mark.fault("SIGKILL at random instants of a run that publishes an update", exit=3, area="process")
def test_a_kill_at_a_random_instant_leaves_the_old_or_the_new_version(scene: Scene) -> None:
    env = _clean_env() | {"FETCHER_TERMINATION_LOG": "/dev/null"}
    started = time.monotonic()
    assert run_fetcher(*scene.args(V2)).code == 0
    healthy = time.monotonic() - started
    rng = random.Random(5)
    for _ in range(3):
        scene.reset()
        process = subprocess.Popen(
            [sys.executable, "-m", "fetcher", *scene.args(V2)], cwd=ROOT, env=env, stderr=subprocess.DEVNULL
        )
        time.sleep(rng.uniform(0.2, 1.0) * healthy)  # a random instant, not a wait for something
        process.send_signal(signal.SIGKILL)
        process.wait()
        scene.check_down()
        scene.check_healthy()


@needs_strace
@pytest.mark.fault(
    "a rename fails in the middle of a publish: rolled back to exactly the old tree", exit=6, area="publish"
)
def test_a_failed_rename_rolls_back_to_exactly_the_old_version(scene: Scene) -> None:
    total = scene.total
    for n in (total // 2, total):  # in the middle of the moves; the marker's own rename, the last
        scene.reset()
        failed = scene.strace(f"error=EIO:when={n}", *scene.args(V2, "--log-format", "json"))
        assert failed.returncode == 6, failed.stderr[-2000:]
        last = json.loads(failed.stderr.splitlines()[-1])
        assert last["error"] == f"moving files into {scene.dest}: Input/output error"
        assert snapshot(scene.dest) == scene.old
        assert [m["sha256"] for m in markers(scene.state)] == [sha256(V1)]
        assert state(scene.state) == sorted(["lock", f"{marker_key(scene.state)}.json"])
        assert scene.check_down().code == 3
        scene.check_healthy()


@needs_strace
@pytest.mark.fault("the rollback itself fails: the next run finishes the publish", exit=6, area="publish")
def test_a_publish_that_can_be_neither_finished_nor_undone_is_finished_by_the_next_run(scene: Scene) -> None:
    total = scene.total
    failed = scene.strace(f"error=EIO:when={total // 2}+", *scene.args(V2, "--log-format", "json"))
    assert failed.returncode == 6
    assert "publish left unfinished: the next run completes it" in failed.stderr
    assert "journal.json" in state(scene.state)
    assert scene.check_down().code == 0  # finished before anything else, though the origin is down
    scene.check_healthy()


@needs_strace
@needs("setpriv")
@pytest.mark.fault("kill -9 mid-publish of closed modes in a locked-down pod", exit=3, area="process")
def test_a_kill_mid_publish_of_closed_modes_without_capabilities(origin: Origin, volume: Path) -> None:
    # The killed run has its capabilities (strace runs it); the runs that recover have none, as in a pod.
    scene = Scene(origin, volume, "--dir-mode", "0555", "--file-mode", "0444")
    total = scene.total
    outcomes = set()
    for n in (1, total // 2, total - 1):
        scene.reset()
        scene.strace(f"signal=KILL:when={n}", *scene.args(V2))
        outcomes.add(scene.check_down(capabilities=False).code)
        scene.check_healthy(capabilities=False)
    assert outcomes == {0, 3}


@needs_strace
@pytest.mark.fault(
    "after a kill mid-publish, a run for another artifact or with a bad --owner recovers first", exit=6, area="process"
)
def test_any_run_into_the_dest_recovers_first(scene: Scene) -> None:
    other = make_tar({"tokenizer/t.json": b"{}"}, compression="")
    other_url = scene.origin.add("/other.tar", other)
    scene.reset()
    assert run_fetcher("--source", other_url, "--dest", str(scene.dest)).code == 0
    with_other = snapshot(scene.dest)
    total = scene.total
    for n, rerun in [(total // 2, "other"), (total // 3, "owner")]:
        scene.reset()
        assert run_fetcher("--source", other_url, "--dest", str(scene.dest)).code == 0
        killed = scene.strace(f"signal=KILL:when={n}", *scene.args(V2))
        assert killed.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), (n, killed.stderr[-2000:])
        assert "journal.json" in state(scene.state), state(scene.state)
        scene.serve(V2, down=True)
        if rerun == "other":  # its own marker holds: still, the interrupted publish is finished first
            run = run_fetcher("--source", other_url, "--dest", str(scene.dest))
            assert run.code == 0 and run.event("already present")
        else:  # a setting that fails under the lock, before the download
            run = run_fetcher(*scene.args(V2, "--owner", "1234:5678"), capabilities=False)
            assert run.code == 6 and run.error.startswith("cannot chown to 1234:5678"), run.stderr
        assert run.event("interrupted publish finished")
        now = snapshot(scene.dest)
        assert {k: v for k, v in now.items() if not k.startswith("tokenizer")} == scene.new
        assert {k: v for k, v in now.items() if k.startswith("tokenizer")} == {
            k: v for k, v in with_other.items() if k.startswith("tokenizer")
        }
        assert sorted(m["sha256"] for m in markers(scene.state)) == sorted([sha256(V2), sha256(other)])


@needs_strace
@pytest.mark.fault("SIGTERM in the middle of the moves into dest: the old version, exit 143", exit=143, area="process")
def test_a_sigterm_mid_publish_puts_the_old_version_back(scene: Scene) -> None:
    stopped = scene.strace(f"signal=TERM:when={scene.total // 2}", *scene.args(V2, "--log-format", "json"))
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert json.loads(stopped.stderr.splitlines()[-1])["error"] == "stopped by SIGTERM before the model was published"
    assert snapshot(scene.dest) == scene.old
    assert [m["sha256"] for m in markers(scene.state)] == [sha256(V1)]
    assert state(scene.state) == sorted(["lock", f"{marker_key(scene.state)}.json"])
    scene.check_healthy()
