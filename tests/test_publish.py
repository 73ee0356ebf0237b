"""What lands in dest, and when: only verified content, old versions kept on failure."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fetcher.cli import main
from tests.conftest import Origin, make_tar, needs, run_fetcher, sha256, tree

V1 = {"model/config.json": b'{"v": 1}', "model/w.bin": b"1" * 5000}
V2 = {"model/config.json": b'{"v": 2}', "model/w.bin": b"2" * 5000}


def test_a_checksum_mismatch_is_exit_4_and_publishes_nothing(origin: Origin, tmp_path: Path) -> None:
    archive = make_tar(V1)
    termination = tmp_path / "termination-log"
    dest = tmp_path / "models"
    run = run_fetcher(
        "--source",
        origin.add("/m.tar.gz", archive),
        "--dest",
        str(dest),
        "--sha256",
        "0" * 64,
        "--termination-log",
        str(termination),
    )
    assert run.code == 4
    assert run.error.startswith("sha256 mismatch: expected 000")
    assert not dest.exists()  # no staging, no lock, not even the dest this run created
    assert termination.read_text().startswith("sha256 mismatch")


def test_a_failed_update_leaves_the_previous_model_intact(origin: Origin, tmp_path: Path) -> None:
    v1, v2 = make_tar(V1), make_tar(V2)
    assert (
        run_fetcher("--source", origin.add("/v1.tar.gz", v1), "--dest", str(tmp_path), "--sha256", sha256(v1)).code == 0
    )
    bad = run_fetcher("--source", origin.add("/v2.tar.gz", v2), "--dest", str(tmp_path), "--sha256", sha256(v1))
    assert bad.code == 4
    assert tree(tmp_path) == V1


def test_an_update_replaces_the_previous_model(origin: Origin, tmp_path: Path) -> None:
    v1, v2 = make_tar(V1), make_tar(V2)
    url = origin.add("/m.tar.gz", v1)
    assert run_fetcher("--source", url, "--dest", str(tmp_path), "--sha256", sha256(v1)).code == 0
    origin.add("/m.tar.gz", v2)
    run = run_fetcher("--source", url, "--dest", str(tmp_path), "--sha256", sha256(v2))
    assert run.code == 0
    assert tree(tmp_path) == V2
    assert run.event("fetching again")["reason"] == f"published with sha256 {sha256(v1)}, now {sha256(v2)} is asked for"


def test_leftovers_of_a_crashed_run_are_cleaned_up(origin: Origin, tmp_path: Path) -> None:
    crashed = tmp_path / ".fetcher" / "staging-0123456789ab"
    (crashed / "tree" / "model").mkdir(parents=True)
    (crashed / "tree" / "model" / "half.bin").write_bytes(b"half")
    archive = make_tar(V1)
    run = run_fetcher(
        "--source", origin.add("/m.tar.gz", archive), "--dest", str(tmp_path), "--sha256", sha256(archive)
    )
    assert run.code == 0
    assert not crashed.exists()
    assert tree(tmp_path) == V1


def test_the_marker_records_what_was_published_without_secrets(origin: Origin, tmp_path: Path) -> None:
    import json

    archive = make_tar(V1)
    origin.add("/m.tar.gz", archive)
    url = origin.url("/m.tar.gz?X-Amz-Signature=topsecret")
    assert run_fetcher("--source", url, "--dest", str(tmp_path), "--sha256", sha256(archive)).code == 0
    [marker_file] = (tmp_path / ".fetcher").glob("*.json")
    marker = json.loads(marker_file.read_text())
    assert marker["sha256"] == sha256(archive) and marker["size"] == len(archive) and marker["files"] == 2
    assert "topsecret" not in marker_file.read_text()
    assert marker["source"].endswith("X-Amz-Signature=***")
    assert marker["published_at"]


def test_owner_and_modes_apply_to_everything_published(origin: Origin, tmp_path: Path) -> None:
    archive = make_tar(V1)
    args = [
        "--source",
        origin.add("/m.tar.gz", archive),
        "--dest",
        str(tmp_path),
        "--owner",
        "1234:5678",
        "--file-mode",
        "0444",
        "--dir-mode",
        "0555",
    ]
    run = run_fetcher(*args)
    if os.geteuid() != 0:
        assert run.code == 6 and "cannot chown" in run.error
        return
    assert run.code == 0, run.stderr
    for path in (tmp_path / "model", tmp_path / "model/w.bin", tmp_path / "model/config.json"):
        info = path.stat()
        assert (info.st_uid, info.st_gid) == (1234, 5678)
        assert info.st_mode & 0o777 == (0o555 if path.is_dir() else 0o444)


NESTED_V1 = {"model/config.json": b'{"v": 1}', "model/layers/0/w.bin": b"1" * 5000, "model/layers/1/w.bin": b"1"}
NESTED_V2 = {"model/config.json": b'{"v": 2}', "model/layers/0/w.bin": b"2" * 5000, "model/layers/1/w.bin": b"2"}


@needs("setpriv")
@pytest.mark.parametrize(
    ("capabilities", "settings", "owner"),
    [
        (False, ("--file-mode", "0444", "--dir-mode", "0555"), None),
        ("chown", ("--file-mode", "0440", "--dir-mode", "0550", "--owner", "1234:5678"), (1234, 5678)),
    ],
    ids=["no capabilities", "only CAP_CHOWN"],
)
def test_closed_modes_and_owners_publish_update_and_clean_up_in_a_locked_down_pod(
    origin: Origin, tmp_path: Path, capabilities: bool | str, settings: tuple[str, ...], owner: tuple[int, int] | None
) -> None:
    # Without CAP_DAC_OVERRIDE and CAP_FOWNER, a directory moves to another parent only while its mover
    # owns it with the write bit set, and nothing leaves a directory that is not writable: modes and
    # owners must come after the move, and an old closed tree must be opened up to be replaced or removed.
    dir_mode, file_mode = int(settings[3], 8), int(settings[1], 8)

    def check(expected: dict[str, bytes]) -> None:
        assert tree(tmp_path) == expected
        for path in [tmp_path / "model", *(tmp_path / "model").rglob("*")]:
            info = path.stat()
            assert info.st_mode & 0o777 == (dir_mode if path.is_dir() else file_mode), path
            if owner:
                assert (info.st_uid, info.st_gid) == owner, path
        state = [p.name for p in (tmp_path / ".fetcher").iterdir() if not p.name.endswith(".json")]
        assert state == ["lock"]  # no staging or trash left behind

    v1, v2 = make_tar(NESTED_V1), make_tar(NESTED_V2)
    url = origin.add("/m.tar.gz", v1)
    args = ("--dest", str(tmp_path), *settings)
    first = run_fetcher("--source", url, "--sha256", sha256(v1), *args, capabilities=capabilities)
    assert first.code == 0, first.error
    check(NESTED_V1)

    # A failure after the modes and owner were applied in staging: another artifact publishing 'model'.
    config = tmp_path.parent / f"{tmp_path.name}.yaml"
    other = origin.add("/other.tar.gz", make_tar({"model/x.bin": b"x", "model/sub/y.bin": b"y"}))
    config.write_text(f"artifacts:\n  - source: {url}\n    sha256: {sha256(v1)}\n  - source: {other}\n")
    clash = run_fetcher("--config", str(config), *args, capabilities=capabilities)
    assert clash.code == 2 and "both publish 'model'" in clash.error
    check(NESTED_V1)

    origin.add("/m.tar.gz", v2)
    update = run_fetcher("--source", url, "--sha256", sha256(v2), *args, capabilities=capabilities)
    assert update.code == 0, update.error
    check(NESTED_V2)


@needs("setpriv")
def test_an_owner_that_cannot_be_applied_fails_before_the_download(origin: Origin, tmp_path: Path) -> None:
    url = origin.add("/m.tar.gz", make_tar(V1))
    run = run_fetcher("--source", url, "--dest", str(tmp_path), "--owner", "1234:5678", capabilities=False)
    assert run.code == 6
    assert run.error.startswith("cannot chown to 1234:5678: permission denied (--owner needs root or CAP_CHOWN")
    assert origin.hits("/m.tar.gz") == []  # a restart loop would otherwise download the model each time
    assert tree(tmp_path) == {}


def test_a_dest_that_cannot_be_created_is_exit_6(origin: Origin, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    run = run_fetcher("--source", origin.add("/w.bin", b"x"), "--dest", str(tmp_path / "a-file" / "models"))
    assert run.code == 6
    assert "cannot create --dest" in run.error


@pytest.mark.parametrize("found", [True, False], ids=["published", "missing-source"])
def test_a_dest_spelled_through_missing_directories_creates_nothing_outside_it(
    origin: Origin, tmp_path: Path, found: bool
) -> None:
    # mkdir -p of x/y/../../m makes x/y, outside dest, and a failed run left them behind
    source = origin.add("/w.bin", b"w") if found else origin.url("/nowhere.bin")
    run = run_fetcher("--source", source, "--dest", f"{tmp_path}/x/y/../../m", "--retries", "0")
    assert run.code == (0 if found else 3), run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == (["m"] if found else [])
    assert not found or tree(tmp_path / "m") == {"w.bin": b"w"}


@needs("setpriv")
def test_an_unwritable_dest_is_exit_6(origin: Origin) -> None:
    import sys
    import tempfile

    # pytest's tmp_path is private to root; this one the unprivileged user can reach
    dest = Path(tempfile.mkdtemp(prefix="fetcher-readonly-"))
    dest.chmod(0o555)
    url = origin.add("/w.bin", b"x")

    command = [sys.executable, "-m", "fetcher", "--source", url, "--dest", str(dest), "--log-format", "json"]
    if os.geteuid() == 0:  # root writes anywhere: run as nobody, as the image does
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FETCHER_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    process = subprocess.run(command, capture_output=True, text=True, env=env)
    dest.rmdir()
    assert process.returncode == 6, process.stderr
    assert "cannot write to --dest" in process.stderr


def test_an_internal_error_is_exit_1_with_a_last_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    class BrokenEnviron(dict[str, str]):
        """A bug stand-in: anything that is not a FetcherError must still end in one line and exit 1."""

        def get(self, key: str, default: object = None) -> str:  # type: ignore[override]
            raise RuntimeError("boom")

    termination = tmp_path / "termination-log"
    code = main(["--termination-log", str(termination)], BrokenEnviron())
    assert code == 1
    err = capsys.readouterr().err
    assert '"internal error"' in err and "RuntimeError: boom" in err
    assert "Traceback" in err  # a bug report needs the stack, in JSON logs too


def test_console_script_is_installed() -> None:
    path = shutil.which("fetcher", path=str(Path(os.sys.executable).parent))
    assert path is not None
    process = subprocess.run([path, "--help"], capture_output=True, text=True)
    assert process.returncode == 0
    assert "--strip-components" in process.stdout and "FETCHER_FOO_BAR" in process.stdout


def test_file_source(tmp_path: Path) -> None:
    archive = make_tar(V1)
    source = tmp_path / "model.tar.gz"
    source.write_bytes(archive)
    run = run_fetcher("--source", f"file://{source}", "--dest", str(tmp_path / "out"), "--sha256", sha256(archive))
    assert run.code == 0, run.stderr
    assert tree(tmp_path / "out") == V1


def test_missing_file_source_is_exit_3(tmp_path: Path) -> None:
    run = run_fetcher("--source", "file:///nonexistent/model.tar.gz", "--dest", str(tmp_path))
    assert run.code == 3
    assert "does not exist" in run.error


def test_a_model_file_changed_in_place_is_fetched_again(origin: Origin, tmp_path: Path) -> None:
    archive = make_tar(V1)
    args = ("--source", origin.add("/m.tar.gz", archive), "--dest", str(tmp_path), "--sha256", sha256(archive))
    assert run_fetcher(*args).code == 0
    weights = tmp_path / "model" / "w.bin"
    weights.write_bytes(b"X" * weights.stat().st_size)  # same size, other bytes
    os.utime(weights, ns=(0, weights.stat().st_mtime_ns + 1_000_000_000))
    again = run_fetcher(*args)
    assert again.code == 0
    assert again.event("fetching again")["reason"] == "model/w.bin changed since it was published (size or mtime)"
    assert len(origin.hits("/m.tar.gz")) == 2
    assert tree(tmp_path) == V1
    weights.unlink()
    assert run_fetcher(*args).event("fetching again")["reason"] == "model/w.bin: No such file or directory"
    assert tree(tmp_path) == V1


def test_urls_that_differ_in_a_parameter_are_different_artifacts(origin: Origin, tmp_path: Path) -> None:
    # Masking is for secrets only: objectKey=v1 and objectKey=v2 name two objects, never one.
    origin.add("/get", b"v1 weights")
    assert run_fetcher("--source", origin.url("/get?objectKey=models/v1.bin"), "--dest", str(tmp_path)).code == 0
    origin.add("/get", b"v2 weights")
    run = run_fetcher("--source", origin.url("/get?objectKey=models/v2.bin"), "--dest", str(tmp_path))
    assert run.code == 0
    assert run.all("already present") == []
    assert tree(tmp_path) == {"get": b"v2 weights"}
    assert "objectKey=models/v2.bin" in run.event("published")["source"]


def test_new_modes_are_applied_on_the_next_run(origin: Origin, tmp_path: Path) -> None:
    archive = make_tar(V1)
    args = ("--source", origin.add("/m.tar.gz", archive), "--dest", str(tmp_path))
    assert run_fetcher(*args).code == 0
    assert run_fetcher(*args).all("fetching again") == []  # unchanged: skipped without a word
    again = run_fetcher(*args, "--file-mode", "0400")
    assert again.code == 0
    assert again.event("fetching again")["reason"] == (
        "published with owner=None file_mode=None dir_mode=None, now owner=None file_mode=0400 dir_mode=None"
    )
    assert (tmp_path / "model" / "w.bin").stat().st_mode & 0o777 == 0o400


def test_two_artifacts_publishing_the_same_entry_is_a_configuration_error(origin: Origin, tmp_path: Path) -> None:
    first, second = make_tar({"model/a.txt": b"a"}), make_tar({"model/b.txt": b"b"})
    config = tmp_path / "fetcher.yaml"
    config.write_text(
        f"dest: {tmp_path / 'models'}\nartifacts:\n"
        f"  - source: {origin.add('/a/model.tar.gz', first)}\n"
        f"  - source: {origin.add('/b/model.tar.gz', second)}\n"
    )
    run = run_fetcher("--config", str(config))
    assert run.code == 2
    assert "both publish 'model'" in run.error
    assert tree(tmp_path / "models") == {"model/a.txt": b"a"}  # the first one stands


def _models(root: Path) -> dict[str, bytes]:
    """``tree``, without the state of a dest nested in it either."""
    return {path: data for path, data in tree(root).items() if "/.fetcher/" not in path}


@pytest.mark.parametrize("outer_first", [True, False], ids=["outer-first", "inner-first"])
def test_an_entry_where_another_artifact_has_its_dest_is_a_configuration_error(
    origin: Origin, tmp_path: Path, outer_first: bool
) -> None:
    # /m and /m/lora, as KServe's adapters are laid out, work; unless the outer model has a 'lora' of its own.
    outer = f"  - source: {origin.add('/base.tar.gz', make_tar({'lora/x.bin': b'x', 'w.bin': b'w'}))}\n"
    outer += f"    dest: {tmp_path / 'm'}\n"
    inner = f"  - source: {origin.add('/lora.tar.gz', make_tar({'adapter.bin': b'a'}))}\n"
    inner += f"    dest: {tmp_path / 'm' / 'lora'}\n"
    config = tmp_path / "fetcher.yaml"
    config.write_text("artifacts:\n" + (outer + inner if outer_first else inner + outer))
    run = run_fetcher("--config", str(config))
    assert run.code == 2, run.stderr
    assert f"'lora' into {tmp_path / 'm'}, where" in run.error and "has its dest" in run.error
    # The outer dest's artifact runs first, whatever the order given: it stops the run before either is published
    assert not (tmp_path / "m").exists() or _models(tmp_path / "m") == {}


def _nested(tmp_path: Path, name: str, *items: tuple[str, Path]) -> Path:
    config = tmp_path / name
    config.write_text("artifacts:\n" + "".join(f"  - source: {s}\n    dest: {d}\n" for s, d in items))
    return config


@pytest.mark.parametrize("outer_first", [True, False], ids=["outer-first", "inner-first"])
def test_an_inner_dest_added_where_the_published_outer_model_has_that_entry_is_refused(
    origin: Origin, tmp_path: Path, outer_first: bool
) -> None:
    # The outer model stands from an earlier run (a PVC), so it is skipped, not published: its marker tells.
    outer = (origin.add("/base.tar.gz", make_tar({"lora/x.bin": b"x", "w.bin": b"w"})), tmp_path / "m")
    inner = (origin.add("/lora.tar.gz", make_tar({"adapter.bin": b"a"})), tmp_path / "m" / "lora")
    assert run_fetcher("--config", str(_nested(tmp_path, "one.yaml", outer))).code == 0
    both = _nested(tmp_path, "both.yaml", *([outer, inner] if outer_first else [inner, outer]))
    for _ in range(2):
        run = run_fetcher("--config", str(both))
        assert run.code == 2, run.stderr
        assert "'lora' into" in run.error and "has its dest" in run.error
        assert _models(tmp_path / "m") == {"lora/x.bin": b"x", "w.bin": b"w"}  # as it was: nothing mixed in


@pytest.mark.parametrize("outer_first", [True, False], ids=["outer-first", "inner-first"])
def test_an_outer_model_that_drops_an_entry_makes_room_for_an_inner_dest_in_either_order(
    origin: Origin, tmp_path: Path, outer_first: bool
) -> None:
    v1 = (origin.add("/base1.tar.gz", make_tar({"lora/x.bin": b"x", "w.bin": b"w"})), tmp_path / "m")
    v2 = (origin.add("/base2.tar.gz", make_tar({"w.bin": b"w2"})), tmp_path / "m")
    inner = (origin.add("/lora.tar.gz", make_tar({"adapter.bin": b"a"})), tmp_path / "m" / "lora")
    assert run_fetcher("--config", str(_nested(tmp_path, "one.yaml", v1))).code == 0
    both = _nested(tmp_path, "both.yaml", *([v2, inner] if outer_first else [inner, v2]))
    for _ in range(2):  # the outer dest's artifact runs first: the inner one is never published into the old lora/
        run = run_fetcher("--config", str(both))
        assert run.code == 0, run.stderr
        assert _models(tmp_path / "m") == {"w.bin": b"w2", "lora/adapter.bin": b"a"}
    assert run.event("done")["already_present"] == 2


def test_an_inner_dest_in_an_entry_of_an_artifact_no_longer_configured_is_refused(
    origin: Origin, tmp_path: Path
) -> None:
    old = (origin.add("/c1.tar.gz", make_tar({"model.bin": b"1", "lora/x.bin": b"x"})), tmp_path / "m")
    other = (origin.add("/d.bin", b"d"), tmp_path / "m")  # shares no entry with the old one: it stays
    inner = (origin.add("/lora.tar.gz", make_tar({"adapter.bin": b"a"})), tmp_path / "m" / "lora")
    assert run_fetcher("--config", str(_nested(tmp_path, "one.yaml", old))).code == 0
    run = run_fetcher("--config", str(_nested(tmp_path, "two.yaml", other, inner)))
    assert run.code == 2, run.stderr
    assert f"lies in 'lora', which {old[0]} published into {tmp_path / 'm'} and is no longer" in run.error
    assert _models(tmp_path / "m") == {"model.bin": b"1", "lora/x.bin": b"x", "d.bin": b"d"}


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_a_directory_clash_with_an_inner_dest_is_refused_before_its_download(
    origin: Origin, tmp_path: Path, dry_run: bool
) -> None:
    # A folder's names are known from its listing: no model downloaded and spooled, only to be refused.
    src = tmp_path / "src"
    (src / "lora").mkdir(parents=True)
    (src / "lora" / "x.bin").write_bytes(b"x")
    (src / "w.bin").write_bytes(b"w")
    outer = (f"file://{src}/", tmp_path / "m")
    inner = (origin.add("/lora.tar.gz", make_tar({"adapter.bin": b"a"})), tmp_path / "m" / "lora")
    run = run_fetcher(
        "--config", str(_nested(tmp_path, "both.yaml", outer, inner)), *(["--dry-run"] if dry_run else [])
    )
    assert run.code == 2, run.stderr
    assert "'lora' into" in run.error and "has its dest" in run.error
    assert not (tmp_path / "m").exists()
    assert not run.all("downloading")


def test_nested_dests_without_a_clash_both_publish(origin: Origin, tmp_path: Path) -> None:
    config = tmp_path / "fetcher.yaml"
    config.write_text(
        "artifacts:\n"
        f"  - source: {origin.add('/base.tar.gz', make_tar({'w.bin': b'w'}))}\n    dest: {tmp_path / 'm'}\n"
        f"  - source: {origin.add('/lora.tar.gz', make_tar({'adapter.bin': b'a'}))}\n"
        f"    dest: {tmp_path / 'm' / 'lora'}\n"
    )
    for _ in range(2):
        run = run_fetcher("--config", str(config))
        assert run.code == 0, run.stderr
        assert _models(tmp_path / "m") == {"w.bin": b"w", "lora/adapter.bin": b"a"}


def test_one_source_twice_into_one_dest_with_other_options_is_a_configuration_error(tmp_path: Path) -> None:
    # They would share one marker: each run, the second would take the first for its old version and remove it.
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_bytes(b"{}")
    (src / "w.bin").write_bytes(b"w")
    config = tmp_path / "fetcher.yaml"
    config.write_text(
        f"dest: {tmp_path / 'm'}\nartifacts:\n"
        f"  - {{source: 'file://{src}/', include: ['*.json']}}\n"
        f"  - {{source: 'file://{src}/', include: ['*.bin']}}\n"
    )
    run = run_fetcher("--config", str(config))
    assert run.code == 2, run.stderr
    assert run.error == (
        f"artifacts[0] and artifacts[1] both fetch file://{src}/ into {tmp_path / 'm'}, with other options: "
        "make them one artifact (--include takes several patterns)"
    )
    assert not (tmp_path / "m").exists()


def test_the_same_dest_spelled_two_ways_is_still_one_dest(origin: Origin, tmp_path: Path) -> None:
    first, second = make_tar({"model/a.txt": b"a"}), make_tar({"model/b.txt": b"b"})
    (tmp_path / "models").mkdir()
    config = tmp_path / "fetcher.yaml"
    config.write_text(
        "artifacts:\n"
        f"  - source: {origin.add('/a/model.tar.gz', first)}\n    dest: {tmp_path / 'models'}\n"
        f"  - source: {origin.add('/b/model.tar.gz', second)}\n    dest: {tmp_path / 'models' / '..' / 'models'}/\n"
    )
    run = run_fetcher("--config", str(config))
    assert run.code == 2
    assert "both publish 'model'" in run.error
    assert tree(tmp_path / "models") == {"model/a.txt": b"a"}


def test_two_archives_with_the_same_file_name_in_one_dest(origin: Origin, tmp_path: Path) -> None:
    first, second = make_tar({"tokenizer/t.json": b"{}"}), make_tar({"weights/w.bin": b"w"})
    config = tmp_path / "fetcher.yaml"
    config.write_text(
        f"dest: {tmp_path / 'models'}\nartifacts:\n"
        f"  - source: {origin.add('/tok/model.tar.gz', first)}\n"
        f"  - source: {origin.add('/w/model.tar.gz', second)}\n"
    )
    run = run_fetcher("--config", str(config))
    assert run.code == 0, run.stderr
    assert tree(tmp_path / "models") == {"tokenizer/t.json": b"{}", "weights/w.bin": b"w"}
    again = run_fetcher("--config", str(config))
    assert again.event("done")["already_present"] == 2


@pytest.mark.fault("a new version drops an entry of the old one: the old entry leaves with it", exit=0, area="publish")
def test_entries_the_new_version_no_longer_has_are_removed(origin: Origin, tmp_path: Path) -> None:
    v1 = make_tar({"adapter-v1.bin": b"a1", "model/w.bin": b"1"}, compression="")
    v2 = make_tar({"adapter-v2.bin": b"a2", "model/w.bin": b"2"}, compression="")
    url = origin.add("/m.tar", v1)
    (tmp_path / "user-notes.txt").write_bytes(b"mine")  # never published by fetcher: stays
    assert run_fetcher("--source", url, "--dest", str(tmp_path)).code == 0
    origin.add("/m.tar", v2)
    run = run_fetcher("--source", url, "--dest", str(tmp_path), "--sha256", sha256(v2))
    assert run.code == 0, run.stderr
    assert tree(tmp_path) == {"adapter-v2.bin": b"a2", "model/w.bin": b"2", "user-notes.txt": b"mine"}
    # a new version under another URL retires the old marker, and the old entries with it
    v3 = make_tar({"adapter-v3.bin": b"a3", "model/w.bin": b"3"}, compression="")
    run = run_fetcher("--source", origin.add("/v3/m.tar", v3), "--dest", str(tmp_path))
    assert run.code == 0, run.stderr
    assert tree(tmp_path) == {"adapter-v3.bin": b"a3", "model/w.bin": b"3", "user-notes.txt": b"mine"}
    assert len(list((tmp_path / ".fetcher").glob("*.json"))) == 1


@pytest.mark.parametrize("kind", ["dir", "file", "symlink"])
@pytest.mark.fault("an entry fetcher did not publish has the name of a new entry: refused", exit=6, area="publish")
def test_what_fetcher_did_not_publish_is_never_replaced(origin: Origin, tmp_path: Path, kind: str) -> None:
    mine = tmp_path / "model"
    if kind == "dir":
        mine.mkdir()
        (mine / "notes.txt").write_bytes(b"mine")
    elif kind == "file":
        mine.write_bytes(b"mine")
    else:
        mine.symlink_to("elsewhere")
    before = sorted((str(p), p.is_symlink() or p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*"))
    url = origin.add("/m.tar.gz", make_tar(V1))
    run = run_fetcher("--source", url, "--dest", str(tmp_path))
    assert run.code == 6
    assert run.error == (
        f"'model' in --dest {tmp_path} was not published by fetcher: move it away, or choose another dest"
    )
    after = sorted((str(p), p.is_symlink() or p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*"))
    assert after == before  # nothing changed, not even a state directory


@pytest.mark.fault("a failed first run into an empty dest leaves it as it was", exit=3, area="publish")
def test_a_failed_first_run_leaves_no_state_behind(origin: Origin, tmp_path: Path) -> None:
    empty, missing = tmp_path / "empty", tmp_path / "missing" / "models"
    empty.mkdir()
    for dest in (empty, missing):
        run = run_fetcher("--source", origin.url("/nowhere.tar.gz"), "--dest", str(dest), "--retries", "0")
        assert run.code == 3
    assert os.listdir(empty) == []
    assert os.listdir(tmp_path) == ["empty"]  # a dest fetcher created, it removes again


@needs("setpriv")
@pytest.mark.parametrize("file_mode", [None, "0444"])
@pytest.mark.parametrize("member_mode", [0o000, 0o200])
@pytest.mark.fault("members without read permission, capabilities dropped", exit=0, area="publish")
def test_members_without_read_permission_publish_in_a_locked_down_pod(
    origin: Origin, tmp_path: Path, member_mode: int, file_mode: str | None
) -> None:
    archive = make_tar({"model/secret.bin": ("file", (b"s" * 100, member_mode)), "model/w.bin": b"w"})
    args = ["--source", origin.add("/m.tar.gz", archive), "--dest", str(tmp_path), "--sha256", sha256(archive)]
    run = run_fetcher(*args, *(["--file-mode", file_mode] if file_mode else []), capabilities=False)
    assert run.code == 0, run.stderr
    secret = tmp_path / "model" / "secret.bin"
    assert secret.stat().st_mode & 0o777 == (int(file_mode, 8) if file_mode else member_mode)
    assert secret.stat().st_size == 100


@pytest.mark.fault("fetchers failing at once on one dest: still one at a time, nothing left", exit=4, area="process")
def test_fetchers_failing_together_on_one_dest_still_take_turns(origin: Origin, tmp_path: Path) -> None:
    # Each failure removes the lock file with the state directory, while the others wait on it: a waiter
    # that then holds a lock on a removed file must take the lock again, or two would download at once.
    import sys

    from tests.conftest import ROOT, _clean_env

    dest = tmp_path / "models"
    dest.mkdir()
    args = ("--dest", str(dest), "--sha256", "0" * 64)
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "fetcher", "--source", origin.add(f"/m{i}.bin", b"x" * 100, stall=0.2), *args],
            cwd=ROOT,
            env=_clean_env() | {"FETCHER_TERMINATION_LOG": "/dev/null"},
            stderr=subprocess.DEVNULL,
        )
        for i in range(6)
    ]
    assert [p.wait(timeout=60) for p in processes] == [4] * 6
    assert len(origin.requests) == 6
    assert origin.peak == 1  # never two downloads at once
    assert os.listdir(dest) == []
