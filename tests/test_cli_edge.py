"""The CLI's edge: every configuration input ends in exit 2 with one line naming the setting, or a
valid plan; nothing that leaves the process (log, termination log, stdout) carries a secret or a
character that cannot be written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import Origin, make_tar, run_fetcher, small_volume

SECRET = "S3CR3Tmarker"


def _refused(run_args: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> str:
    """Run as a user would; the run must end in exit 2, one line, no traceback, the reason in the termination log."""
    termination = tmp_path / "termination-log"
    run = run_fetcher(*run_args, env={"FETCHER_TERMINATION_LOG": str(termination)} | (env or {}))
    assert run.code == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    reason = termination.read_text(encoding="utf-8")
    assert reason.endswith("\n") and "\n" not in reason[:-1]
    assert reason.strip() == run.error
    return run.error


def _config(tmp_path: Path, text: str, name: str = "fetcher.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


BAD_SOURCES = [
    ("s3://[bucket/key", "--source: "),
    ("s3://b\u00fcck.et/key", "--source: "),
    ("s3://bucket\uff03x/key", "--source: "),
    ("http://b\u2100d/m", "--source: "),
    ("http://xn--zz/m", "--source: "),
    ("http://h/m\nx", "--source: "),
    ("https://h:99999/m", "--source: "),
    ("file:///tmp/a%00b", "--source: "),
    ("http://h/\udcff", "--source: "),
]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        pytest.param(
            s, m, marks=pytest.mark.fault(f"a source URL urllib/httpx cannot take: {s!r}", exit=2, area="config")
        )
        for s, m in BAD_SOURCES
    ],
)
def test_a_source_that_cannot_be_parsed_is_refused_naming_the_flag(tmp_path: Path, source: str, message: str) -> None:
    error = _refused(["--dry-run", "--source", source, "--dest", str(tmp_path / "d")], tmp_path)
    assert error.startswith(message)


@pytest.mark.fault("a source URL urllib cannot parse, from a config file, names the key", exit=2, area="config")
def test_a_bad_source_in_a_config_file_names_the_key(tmp_path: Path) -> None:
    config = _config(tmp_path, f"dest: {tmp_path / 'd'}\nartifacts:\n  - source: 's3://[bucket/key'\n")
    error = _refused(["--dry-run", "--config", str(config)], tmp_path)
    assert "artifacts[0].source:" in error


CONFIG_FAULTS = [
    ("retries: !!int abc\n", "retries: expected a whole number"),
    ("retries: !!timestamp never\n", "retries: expected a whole number"),
    ("timeout: !!float x\n", "timeout: expected a number of seconds"),
    ("s3_anonymous: !!bool maybe\n", "s3_anonymous: expected true or false"),
    ("retries: !!binary '***'\n", "retries: expected a whole number"),
    ("retries: !!python/object:os.system ls\n", "line 3"),
    ("retries: !!set {a, b}\n", "line 3"),
    ("retries: !custom 3\n", "line 3"),
    ("dest: " + "[" * 5000 + "]" * 5000 + "\n", "line 3"),
    ("dest: " + "{a: " * 3000 + "x" + "}" * 3000 + "\n", "line 3"),
    ('{"dest": ' + "[" * 100_000 + "]" * 100_000 + "}\n", "line 3"),  # json's RecursionError, then YAML's
    ('dest: "/tmp/a\\0b"\n', "dest: "),
    ('dest: "/tmp/a\\ud800b"\n', "line 3"),  # libyaml refuses the escape; the pure-Python reader does not
    ('bearer_token_file: "/t\\0"\n', "bearer_token_file: "),
    ('bearer_token_file: "/t\\udfff"\n', "line 3"),
    ('termination_log: "/t\\0"\n', "termination_log: "),
    ('filename: "a\\udc80\\ud800"\n', "line 3"),
    ("headers: !!omap [a: b]\n", "line 3"),
    ("? [a, b]\n: c\n", "line 3"),
    ("---\na: b\n---\nc: d\n", "line 3: more than one YAML document"),
]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(t, m, marks=pytest.mark.fault(f"config file: {t[:40]!r}", exit=2, area="config"), id=t[:30])
        for t, m in CONFIG_FAULTS
    ],
)
def test_config_file_input_ends_in_exit_2_naming_the_key_or_line(tmp_path: Path, text: str, message: str) -> None:
    head = "source: http://h/m\n" if not text.startswith("---") else ""
    head += f"dest: {tmp_path / 'd'}\n" if not text.startswith(("dest", "---")) else "\n"
    config = _config(tmp_path, head + text if not text.startswith("---") else text)
    error = _refused(["--dry-run", "--config", str(config)], tmp_path)
    assert error.startswith(f"--config {config}"), error
    assert message in error, error


JSON_FAULTS = [
    ({"dest": "/tmp/a\ud800b"}, "dest: the path holds characters"),
    ({"dest": "/tmp/a\x00b"}, "dest: the path holds a NUL"),
    ({"bearer_token_file": "/t\udfff"}, "bearer_token_file: the path holds characters"),
    ({"termination_log": "/t\x00"}, "termination_log: the path holds a NUL"),
    ({"filename": "a\udc80\ud800"}, "filename: the path holds characters"),
    ({"source": "http://h\ud800/m"}, "source: "),
    ({"source": "s3://b/k\udfff"}, "source: the URL holds characters"),
    ({"headers": {"X-Key": "v\ud800"}}, "headers: the value of X-Key must"),
    ({"retries": True}, "retries: expected a whole number"),
    ({"retries": 1e400}, "retries: expected a whole number"),
    ({"timeout": float("nan")}, "timeout: must be more than 0"),
    ({"owner": 99999999999}, "owner: expected numeric UID"),
    ({"retries": "\u00b2"}, "retries: expected a whole number"),
    ({"artifacts": [{"source": "http://h/m", "max_members": "9" * 5000}]}, "artifacts[0].max_members: expected"),
    ({"artifacts": [[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]}, "'artifacts' must be a non-empty list of mappings"),
]


@pytest.mark.parametrize(
    ("document", "message"),
    [
        pytest.param(d, m, marks=pytest.mark.fault(f"JSON config: {m}", exit=2, area="config"), id=m)
        for d, m in JSON_FAULTS
    ],
)
def test_json_config_input_ends_in_exit_2_naming_the_key(
    tmp_path: Path, document: dict[str, object], message: str
) -> None:
    full = {"source": "http://h/m", "dest": str(tmp_path / "d")} | document
    config = _config(tmp_path, json.dumps(full, allow_nan=True), "fetcher.json")
    error = _refused(["--dry-run", "--config", str(config)], tmp_path)
    assert error.startswith(f"--config {config}"), error
    assert message in error, error


@pytest.mark.fault("a YAML alias bomb in headers: refused at once, naming the file and line", exit=2, area="config")
def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    lines = ["source: http://h/m", f"dest: {tmp_path / 'd'}", "a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 12)]
    lines.append("headers: *a11")
    config = _config(tmp_path, "\n".join(lines) + "\n")
    assert config.stat().st_size < 1000
    error = _refused(["--dry-run", "--config", str(config)], tmp_path)
    assert error.startswith(f"--config {config}: line 3") and "alias" in error


def test_yaml_keeps_its_text_semantics(tmp_path: Path) -> None:
    """Octal modes stay octal, digests stay text, explicit string tags are text, ~ is unset."""
    config = _config(
        tmp_path,
        f"source: http://h/m\ndest: {tmp_path / 'd'}\nfile_mode: 0640\ndir_mode: !!str 0750\n"
        "sha256: 1e50000000000000000000000000000000000000000000000000000000000000\n"
        "retries: !!int 3\nfilename: ~\nowner: 1000:1000\ns3_anonymous: yes\n",
    )
    run = run_fetcher("--dry-run", "--config", str(config))
    assert run.code == 0, run.stderr
    plan = json.loads(run.stdout)["artifacts"][0]
    assert plan["file_mode"] == "0640" and plan["dir_mode"] == "0750"
    assert plan["sha256"].startswith("1e5") and plan["filename"] == "m" and plan["owner"] == "1000:1000"


def test_json_keeps_numbers_as_written_and_reports_errors_by_line(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        json.dumps({"dest": str(tmp_path / "d"), "file_mode": 644, "artifacts": [{"source": "http://h/m"}]}),
        "fetcher.json",
    )
    run = run_fetcher("--dry-run", "--config", str(config))
    assert run.code == 0, run.stderr
    assert json.loads(run.stdout)["artifacts"][0]["file_mode"] == "0644"
    broken = _config(
        tmp_path, '{\n  "dest": "/tmp/d",\n  "artifacts": [\n    {"source": "http://h/m",}\n  ]\n', "b.json"
    )
    error = _refused(["--dry-run", "--config", str(broken)], tmp_path)
    assert "line 4" in error or "line 6" in error, error


def test_a_large_json_config_is_planned_whole(tmp_path: Path) -> None:
    """87k artifacts, as the issue's 5 MB config: its speed is bench/config_load.py's to show, not a timed assert."""
    entries = [{"source": f"http://h/models/m{i}.bin", "dest": f"/tmp/d/{i}"} for i in range(87_000)]
    config = _config(tmp_path, json.dumps({"artifacts": entries}), "big.json")
    assert config.stat().st_size > 4_000_000
    run = run_fetcher("--dry-run", "--config", str(config), "--log-level", "error")
    assert run.code == 0, run.stderr[-2000:]
    assert len(json.loads(run.stdout)["artifacts"]) == 87_000


def test_a_large_yaml_config_is_planned_whole(tmp_path: Path) -> None:
    body = "".join(f"  - source: http://h/models/m{i}.bin\n    dest: /tmp/d/{i}\n" for i in range(30_000))
    config = _config(tmp_path, "artifacts:\n" + body)
    run = run_fetcher("--dry-run", "--config", str(config), "--log-level", "error")
    assert run.code == 0, run.stderr[-2000:]
    assert len(json.loads(run.stdout)["artifacts"]) == 30_000


# --- secrets in usage errors -------------------------------------------------------


_BASE = ["--source", "http://h/m", "--dest", "/tmp/x"]
SECRET_USAGE = [
    ("an unknown --headers flag: argparse echoed its value", [*_BASE, "--headers", f"X-Api-Key: {SECRET}"]),
    ("an abbreviation --s=VALUE: argparse echoed the value", [*_BASE, f"--s={SECRET}"]),
    ("an unknown --token=VALUE", [*_BASE, "--bogus", f"--token={SECRET}"]),
    ("a stray positional value", [*_BASE, SECRET]),
    ("--bearer-token SECRET: argparse took it for --bearer-token-file", [*_BASE, "--bearer-token", SECRET]),
    ("a URL whose password holds '?': urllib quoted it in its port error", ["--source", f"https://u:{SECRET}?x@h/m"]),
    ("a URL with a bad port after a password", ["--source", f"https://u:{SECRET}@h:port/m"]),
    ("a URL with an unbalanced [ after a password", ["--source", f"https://u:{SECRET}@[h/m"]),
    ("an s3:// URL with user:password@", ["--source", f"s3://u:{SECRET}@bucket/key"]),
    ("a URL with a line break after a password", ["--source", f"http://:{SECRET}@h\n/m"]),
    ("a header value that is not ASCII", [*_BASE, "--header", f"X-Key: {SECRET}\u00e9"]),
    ("a header without a colon", [*_BASE, "--header", f"{SECRET} no colon"]),
]


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(
            [*a, "--dest", "/tmp/x"] if "--dest" not in a else a,
            marks=pytest.mark.fault(f"usage error does not repeat a secret: {d}", exit=2, area="secrets"),
            id=d,
        )
        for d, a in SECRET_USAGE
    ],
)
def test_usage_errors_never_repeat_a_secret(tmp_path: Path, args: list[str]) -> None:
    termination = tmp_path / "termination-log"
    run = run_fetcher(*args, env={"FETCHER_TERMINATION_LOG": str(termination)})
    assert run.code == 2, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    for output in (run.stdout, run.stderr, termination.read_text()):
        assert SECRET not in output


def test_an_unknown_option_is_named_without_its_value(tmp_path: Path) -> None:
    error = _refused(["--source", "http://h/m", "--dest", "/tmp/x", "--headers", f"X-Api-Key: {SECRET}"], tmp_path)
    assert "--headers" in error and "--header" in error.split("--headers", 1)[1]  # a suggestion
    positional = _refused(["--source", "http://h/m", "--dest", "/tmp/x", SECRET, "two"], tmp_path)
    assert "2 values" in positional


@pytest.mark.fault("a secret given in a FETCHER_* env var with a bad value is not echoed", exit=2, area="secrets")
def test_env_values_are_not_echoed_when_they_may_be_secret(tmp_path: Path) -> None:
    error = _refused([], tmp_path, env={"FETCHER_SOURCE": f"https://u:{SECRET}@h:x/m", "FETCHER_DEST": "/tmp/x"})
    assert error.startswith("FETCHER_SOURCE:") and SECRET not in error


@pytest.mark.fault("a misspelt FETCHER_* env var is named in a warning, not silently ignored", exit=0, area="config")
def test_a_misspelt_env_var_is_named_with_the_likely_one(tmp_path: Path) -> None:
    env = {"FETCHER_SOURCE": "http://h/m", "FETCHER_DEST": str(tmp_path), "FETCHER_SHA": SECRET}
    run = run_fetcher("--dry-run", env=env)
    assert run.code == 0, run.stderr
    [warning] = run.all("unknown env var ignored")
    assert warning["name"] == "FETCHER_SHA (did you mean FETCHER_SHA256?)"
    assert SECRET not in run.stdout + run.stderr


# --- messages that cannot be encoded ---------------------------------------------------


@pytest.mark.fault(
    "disk full while unpacking a member whose name is not UTF-8: the reason is still written", exit=6, area="disk"
)
@pytest.mark.parametrize("log_format", ["json", "console"])
def test_a_non_utf8_member_name_in_a_disk_full_error_is_escaped(
    origin: Origin, tmp_path: Path, log_format: str
) -> None:
    name = b"model/w\xff\xfe\n.bin".decode("utf-8", "surrogateescape")  # not UTF-8, and a line break
    data = make_tar({name: bytes(3 * 2**20)}, compression="")
    url = origin.add("/m.tar", data)
    termination = tmp_path / "termination-log"
    with small_volume(tmp_path / "vol", "1m") as dest:
        run = run_fetcher(
            "--source", url, "--dest", str(dest), "--log-format", log_format,
            env={"FETCHER_TERMINATION_LOG": str(termination)},
        )  # fmt: skip
        assert [p.name for p in dest.iterdir() if p.name != ".fetcher"] == []
    assert run.code == 6, run.stderr
    assert "Traceback" not in run.stderr  # and run_fetcher decoded stderr as strict UTF-8
    reason = termination.read_bytes().decode("utf-8")  # strict: every byte is UTF-8
    assert reason.endswith("\n") and reason.count("\n") == 1
    assert "w\\xff\\xfe\\n.bin" in reason and "space" in reason.lower(), reason  # escaped as Python shows them
    failed = [line for line in run.stderr.splitlines() if "failed" in line]
    assert len(failed) == 1
    if log_format == "json":
        assert reason.strip() == run.error
    else:
        assert "w\\xff\\xfe\\n.bin" in failed[0].replace("\\\\", "\\")
