"""Flags, env vars and ConfigMap files, their precedence, and every kind of bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fetcher import __version__
from tests.conftest import ROOT, Origin, make_tar, run_fetcher, sha256, tree


def test_env_vars_alone_configure_a_run(origin: Origin, tmp_path: Path) -> None:
    body = b"model bytes"
    env = {"FETCHER_SOURCE": origin.add("/m.bin", body), "FETCHER_DEST": str(tmp_path), "FETCHER_SHA256": sha256(body)}
    run = run_fetcher(env=env)
    assert run.code == 0, run.stderr
    assert tree(tmp_path) == {"m.bin": body}


def test_flags_win_over_env(origin: Origin, tmp_path: Path) -> None:
    origin.add("/right.bin", b"right")
    origin.add("/wrong.bin", b"wrong")
    env = {"FETCHER_SOURCE": origin.url("/wrong.bin"), "FETCHER_DEST": str(tmp_path)}
    run = run_fetcher("--source", origin.url("/right.bin"), env=env)
    assert run.code == 0
    assert tree(tmp_path) == {"right.bin": b"right"}


def test_a_configmap_file_with_several_artifacts_and_defaults(origin: Origin, tmp_path: Path) -> None:
    archive = make_tar({"model/config.json": b"{}", "model/w.bin": b"w" * 1000})
    vocab = b"good\nbad\n"
    config = tmp_path / "fetcher.yaml"
    config.write_text(
        f"""
# top-level keys are defaults for every artifact
dest: {tmp_path / "models"}
file_mode: 0640
dir_mode: 0750
artifacts:
  - source: {origin.add("/sentiment.tar.gz", archive)}
    sha256: {sha256(archive)}
  - source: {origin.add("/vocab.txt", vocab)}
    sha256: "{sha256(vocab)}"
    filename: vocabulary.txt
    file_mode: "0600"
"""
    )
    run = run_fetcher("--config", str(config))
    assert run.code == 0, run.stderr
    dest = tmp_path / "models"
    assert tree(dest) == {"model/config.json": b"{}", "model/w.bin": b"w" * 1000, "vocabulary.txt": vocab}
    assert oct((dest / "model/w.bin").stat().st_mode & 0o777) == "0o640"
    assert oct((dest / "model").stat().st_mode & 0o777) == "0o750"
    assert oct((dest / "vocabulary.txt").stat().st_mode & 0o777) == "0o600"
    assert run.event("done")["fetched"] == 2


def test_a_json_config_and_env_over_file(origin: Origin, tmp_path: Path) -> None:
    body = b"weights"
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"source": origin.add("/w.bin", body), "dest": str(tmp_path / "from-file")}))
    run = run_fetcher("--config", str(config), env={"FETCHER_DEST": str(tmp_path / "from-env")})
    assert run.code == 0, run.stderr
    assert tree(tmp_path / "from-env") == {"w.bin": body}
    assert not (tmp_path / "from-file").exists()


def test_headers_from_env_one_per_line(origin: Origin, tmp_path: Path) -> None:
    url = origin.add("/w.bin", b"ok", require={"X-A": "1", "X-B": "two words"})
    run = run_fetcher("--source", url, "--dest", str(tmp_path), env={"FETCHER_HEADERS": "X-A: 1\nX-B: two words\n"})
    assert run.code == 0, run.stderr


def test_dry_run_prints_the_plan_with_secrets_masked_and_fetches_nothing(origin: Origin, tmp_path: Path) -> None:
    url = origin.url("/m.tar.gz?X-Amz-Signature=deadbeefsecret&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE&v=2")
    run = run_fetcher(
        "--source",
        url,
        "--dest",
        str(tmp_path),
        "--header",
        "Authorization: Bearer hunter2",
        "--dry-run",
        "--owner",
        "1000:2000",
    )
    assert run.code == 0, run.stderr
    plan = json.loads(run.stdout)["artifacts"][0]
    assert plan["headers"] == ["Authorization: ***"]
    assert "X-Amz-Signature=***" in plan["source"] and "v=2" in plan["source"]
    assert plan["owner"] == "1000:2000" and plan["filename"] == "m.tar.gz"
    for secret in ("hunter2", "deadbeefsecret", "AKIAIOSFODNN7EXAMPLE"):
        assert secret not in run.stdout + run.stderr
    assert origin.requests == []


def test_the_readme_config_file_is_accepted_as_written(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    (text,) = [block for block in re.findall(r"```yaml\n(.*?)```", readme, re.S) if block.startswith("dest:")]
    digests = {"9f2c...e1": "9f2c" + "0" * 58 + "e1", "4b1a...07": "4b1a" + "0" * 58 + "07"}  # placeholders
    for placeholder, digest in digests.items():
        text = text.replace(placeholder, digest)
    config = tmp_path / "fetcher.yaml"
    config.write_text(text)
    run = run_fetcher("--config", str(config), "--dry-run")
    assert run.code == 0, run.stderr
    model, vocab = json.loads(run.stdout)["artifacts"]
    assert (model["dest"], model["owner"], model["dir_mode"], model["strip_components"]) == (
        "/models",
        "1000:1000",
        "0755",
        1,
    )
    assert (vocab["filename"], vocab["file_mode"], vocab["headers"]) == ("vocab.txt", "0444", ["X-Team: ***"])


def test_help_shows_the_defaults_the_readme_table_gives() -> None:
    run = run_fetcher("--help")
    assert run.code == 0
    help_text = " ".join(run.stdout.split())  # argparse wraps lines
    readme_defaults = {
        row[0].split()[0]: row[2].replace("`", "")
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.startswith("| `--") and len(row := [cell.strip("` ") for cell in line.strip("|").split(" | ")]) == 4
    }
    entries = re.split(r" (?=--[a-z][a-z0-9-]+\b)", help_text.split("options:", 1)[1])
    shown = {entry.split()[0]: found[1] for entry in entries if (found := re.search(r"\(default: ([^)]+)\)", entry))}
    assert len(shown) == 16, shown
    for flag, default in shown.items():
        assert readme_defaults[flag] == default, flag


def test_choices_are_not_case_sensitive(tmp_path: Path) -> None:
    source = tmp_path / "m.tar.gz"
    source.write_bytes(make_tar({"model/w.bin": b"w"}))
    env = {"FETCHER_LOG_LEVEL": "INFO", "FETCHER_LOG_FORMAT": "JSON", "FETCHER_S3_ADDRESSING_STYLE": "Path"}
    run = run_fetcher("--source", f"file://{source}", "--dest", str(tmp_path / "d"), "--extract", "TAR.GZ", env=env)
    assert run.code == 0, run.stderr
    assert tree(tmp_path / "d") == {"model/w.bin": b"w"}
    assert run.event("published")["format"] == "tar.gz"  # JSON lines, at info


def test_version() -> None:
    run = run_fetcher("--version")
    assert run.code == 0
    assert run.stdout.strip() == f"fetcher {__version__}"


BAD = [
    (
        ["--source", "http://u@h/m", "--dest", "/x", "--bearer-token-file", "/t"],
        "credentials given twice, as user:password@ in the URL and as --bearer-token-file: keep one",
    ),
    (
        ["--source", "http://u:p@h/m", "--dest", "/tmp/x", "--header", "authorization: Bearer t"],
        "credentials given twice, as user:password@ in the URL and as an Authorization header: keep one",
    ),
    (
        [
            "--source",
            "http://h/m",
            "--dest",
            "/tmp/x",
            "--header",
            "Authorization: Bearer t",
            "--bearer-token-file",
            "/t",
        ],
        "credentials given twice, as an Authorization header and as --bearer-token-file: keep one",
    ),
    (["--source", "ftp://host/m.tar.gz", "--dest", "/tmp/x"], "--source: unsupported URL scheme 'ftp'"),
    (["--source", "s3://bucket-only", "--dest", "/tmp/x"], "--source: an S3 source looks like s3://bucket/key"),
    (["--source", "file://relative/path", "--dest", "/tmp/x"], "--source: a file source needs an absolute path"),
    (["--source", "http://h/m"], "no dest given"),
    (["--dest", "/tmp/x"], "no source given"),
    (["--source", "http://h/m", "--dest", "/tmp/x", "--sha256", "abc123"], "--sha256: expected 64 hex digits"),
    (["--source", "http://h/m", "--dest", "/tmp/x", "--extract", "rar"], "--extract: expected one of"),
    (["--source", "http://h/m", "--dest", "/tmp/x", "--file-mode", "rwx"], "--file-mode: expected an octal mode"),
    (["--source", "http://h/m", "--dest", "/tmp/x", "--owner", "root"], "--owner: expected numeric UID"),
    (["--source", "http://h/m", "--dest", "/tmp/x", "--header", "no colon"], "--header: expected 'Name: value'"),
    (
        ["--source", "http://h/m", "--dest", "/tmp/x", "--retries", "-1"],
        "--retries: expected a whole number of 0 or more",
    ),
    (["--source", "http://h/m", "--dest", "/tmp/x", "--filename", "../x"], "--filename: '../x' is not a plain file"),
    (["--config", "/nonexistent/fetcher.yaml"], "--config /nonexistent/fetcher.yaml: cannot read it"),
    (["--source", "http://h/m", "--dest", "/tmp/x", "--timeout", "inf"], "--timeout: must be more than 0 and at most"),
    (["--source", "http://[::1/m", "--dest", "/tmp/x"], "--source: not a valid URL"),
    (["--source", "http://", "--dest", "/tmp/x"], "--source: the URL has no host"),
    (
        ["--source", "http://h/m", "--dest", "/tmp/x", "--header", "X-Key: caf\u00e9"],
        "--header: the value of X-Key must",
    ),
    (["--source", "http://h/m", "--dest", "/tmp/x", "--retries", "1.5"], "--retries: expected a whole number"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--source", "http://h/m", "--dest", "/tmp/x", "--s=v"], "unrecognized arguments: --s"),
    (["--source", "http://h/m", "--dest", "/tmp/x", "--part-size", "0"], "--part-size: must be between 64Ki and 64Mi"),
    (["--source", "http://h/m", "--dest", "/tmp/x", "--part-size", "1Gi"], "--part-size: must be between 64Ki"),
    (["--source", "http://h/m", "--dest", "/tmp/x", "--concurrency", "0"], "--concurrency: must be between 1 and 64"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    run = run_fetcher(*args)
    assert run.code == 2, run.stderr
    assert message in run.error
    assert "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_a_bad_setting_is_reported_as_the_flags_ask(tmp_path: Path) -> None:
    termination = tmp_path / "termination-log"
    run = run_fetcher("--log-format", "console", "--termination-log", str(termination), "--retries", "many")
    assert run.code == 2
    (line,) = run.stderr.strip().splitlines()
    assert "[error    ] failed error=" in line and "--retries" in line  # console, not JSON
    assert termination.read_text().startswith("--retries: expected a whole number")
    unknown = run_fetcher("--log-format", "console", "--termination-log", str(termination), "--retires", "3")
    assert unknown.code == 2
    assert "[error    ] failed error=" in unknown.stderr
    assert termination.read_text().startswith("unrecognized arguments: --retires (did you mean --retries?), 1 value")


def test_bad_env_value_names_the_env_var() -> None:
    run = run_fetcher(env={"FETCHER_SOURCE": "http://h/m", "FETCHER_DEST": "/tmp/x", "FETCHER_SHA256": "nothex"})
    assert run.code == 2
    assert run.error.startswith("FETCHER_SHA256:")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("artifacts: [oops", "not valid YAML or JSON at line"),
        ("- just\n- a list\n", "expected a mapping"),
        ("artifacts:\n  - source: http://h/m\n    colour: blue\n", "artifacts[0]: unknown key 'colour'"),
        ("artifacts:\n  - source: http://h/m\n    sha256: 1234\n", "artifacts[0].sha256: expected 64 hex digits"),
        ("artifacts: []\n", "'artifacts' must be a non-empty list"),
    ],
)
def test_bad_config_files(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "fetcher.yaml"
    config.write_text(text)
    run = run_fetcher("--config", str(config), "--dest", str(tmp_path))
    assert run.code == 2
    assert message in run.error


def test_source_flag_cannot_override_a_list_of_artifacts(tmp_path: Path) -> None:
    config = tmp_path / "fetcher.yaml"
    config.write_text("dest: /tmp/x\nartifacts:\n  - source: http://h/a\n  - source: http://h/b\n")
    run = run_fetcher("--config", str(config), "--source", "http://h/c")
    assert run.code == 2
    assert "cannot be combined with a --config listing 2 artifacts" in run.error


def test_console_logs_are_key_value(origin: Origin, tmp_path: Path) -> None:
    url = origin.add("/w.bin", b"x")
    run = run_fetcher("--source", url, "--dest", str(tmp_path), "--log-format", "console")
    assert run.code == 0
    assert any("published" in line and "sha256=" in line for line in run.stderr.splitlines())


@pytest.mark.parametrize("libyaml", [True, False], ids=["libyaml", "pure-python"])
def test_the_yaml_reader_reads_the_same_with_or_without_libyaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, libyaml: bool
) -> None:
    """Where libyaml is missing, PyYAML's own parser feeds the same reader: same values, same refusals."""
    import yaml

    from fetcher.config import load_config_file
    from fetcher.errors import UsageError

    if libyaml and not yaml.__with_libyaml__:
        pytest.skip("PyYAML built without libyaml")
    if not libyaml:
        monkeypatch.delattr(yaml, "CSafeLoader")
    config = tmp_path / "c.yaml"
    config.write_text(
        "file_mode: 0640\ndir_mode: !!str 0750\nretries: !!int 3\nfilename: ~\n"
        "artifacts:\n  - source: http://h/m\n    headers: {X-A: '1', X-B: \"2\"}\n    sha256: "
        + "1e5"
        + "0" * 61
        + "\n"
    )
    top, (entry,) = load_config_file(config)
    assert top == {"file_mode": 0o640, "dir_mode": 0o750, "retries": 3}
    assert entry == {"source": "http://h/m", "headers": (("X-A", "1"), ("X-B", "2")), "sha256": "1e5" + "0" * 61}
    for text, message in [
        ("a: &x [1]\nb: *x\n", "line 1: anchors and aliases"),
        ("retries: !!set {a}\n", "line 1: the tag !!set is not supported"),
        ("deep: " + "[" * 40 + "]" * 40 + "\n", "line 1: nested more than"),
        ("a: b\n---\nc: d\n", "line 2: more than one YAML document"),
        ("? [a]\n: b\n", "line 1: a key must be a plain value"),
        ("a: [b\n", "not valid YAML or JSON at line 2, column 1"),
    ]:
        config.write_text(text)
        with pytest.raises(UsageError) as refused:
            load_config_file(config)
        assert str(refused.value).startswith(f"--config {config}: {message}"), str(refused.value)
