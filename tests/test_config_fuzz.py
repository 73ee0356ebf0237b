"""Random configuration input, as a hostile or careless user gives it: config files (YAML and
JSON, real and made-up keys, every kind of scalar, explicit tags, anchors, nesting, odd unicode,
NUL, lone surrogates), FETCHER_* env vars and flags. fetcher --dry-run must end in exit 2 with one
line naming the cause, written to the termination log, or exit 0 with a plan; never exit 1, never
a traceback, and never a secret (a marker in header values and URL passwords) in any output.

In-process through ``cli.main``, the CLI's real entry point (``run`` adds only the exit), so that
a few hundred inputs take seconds; a smaller sample runs ``python -m fetcher`` as a user does.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, seed, settings
from hypothesis import strategies as st

from fetcher import cli
from fetcher.config import OPTIONS, flag_of
from tests.conftest import run_fetcher

MARKER = "Zq9SECRETmarker"

NAMES = [option.name for option in OPTIONS if option.name not in ("config", "dry_run", "termination_log")]
CONFIG_NAMES = [option.name for option in OPTIONS if option.name not in ("config", "dry_run")]
SECRET_HEADERS = ["Authorization", "X-Api-Key", "Cookie", "X-Auth-Token", "Private-Token", "X-JFrog-Art-Api", "X-Team"]

# Any code point, lone surrogates and NUL included.
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=12)
TAGS = ["!!int", "!!float", "!!bool", "!!timestamp", "!!binary", "!!str", "!!null", "!!set", "!!omap", "!!map",
        "!!seq", "!!python/object:os.system", "!custom", "!", "&anchor", "*anchor", "!!merge"]  # fmt: skip
PLAUSIBLE = [
    "0644", "0o755", "1777", "1000:1000", "-1", "1.5", "1e5", "inf", "nan", "8Mi", "64Ki", "1Ti", "0", "65",
    "true", "no", "~", "null", "", " ", "auto", "zip", "tar.zst", "json", "console", "debug", "path",
    "http://h/m.bin", "https://h:99999/m", "s3://[bucket/key", "s3://b\u00fcck.et/k", "s3://b/k", "file:///m",
    "file://rel", "http://xn--zz/m", "http://[::1]/m", "http://\uff03/m", "/tmp/x", "/dev/null", "a\x00b",
    "\ud800", "\udcff", "x\ny", "'quoted'", '"dq"', "- item", "[a, b]", "{a: b}", "? k", "<<", "%TAG",
    "a" * 300, "9" * 30,
]  # fmt: skip


@st.composite
def secret_url(draw: st.DrawFn) -> str:
    """A source whose password carries the marker: the netloc ends only at the '@' before the host."""
    scheme = draw(st.sampled_from(["http", "https", "s3", "ftp", "HTTP"]))
    junk = draw(st.text(st.characters(exclude_characters="/?#@\\", exclude_categories=("Cs", "Cc")), max_size=6))
    host = draw(st.sampled_from(["h", "h:80", "h:x", "[h", "b\u00fcck.et", "", "xn--zz", "h]"]))
    path = draw(st.sampled_from(["/m", "/m.tar.gz", "", "/a?x=1#f", "/%00"]))
    user = draw(st.sampled_from(["user", "", "u%40x"]))
    return f"{scheme}://{user}:{MARKER}{junk}@{host}{path}"


@st.composite
def secret_header(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(SECRET_HEADERS))
    tail = draw(st.sampled_from(["", " x", "\u00e9", "\x00", "\t", "=="]))
    return f"{name}: {MARKER}{tail}"


def scalar() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from(PLAUSIBLE),
        ANY_TEXT,
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.booleans(),
        st.none(),
        secret_url(),
    )


@st.composite
def good_url(draw: st.DrawFn) -> str:
    """A source that parses, its password the marker: it must be masked in the plan."""
    junk = draw(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/?#@\\"), max_size=6))
    port = draw(st.sampled_from(["", ":8080"]))
    tail = draw(st.sampled_from(["/m", "/m.tar.gz", "/a/b?x=1", "/a?token=" + MARKER]))
    user = draw(st.sampled_from(["user", "", "u%40x"]))
    return draw(st.sampled_from([f"https://{user}:{MARKER}{junk}@h{port}{tail}", "s3://b/k/m.bin", "file:///m"]))


VALID: dict[str, st.SearchStrategy[Any]] = {
    "source": good_url(),
    "dest": st.sampled_from(["/tmp/fuzz-dest", "/tmp/fuzz dest/\u00e9"]),
    "sha256": st.sampled_from(["a" * 64, "sha256:" + "0" * 64, "A" * 64]),
    "extract": st.sampled_from(["auto", "none", "tar.gz", "ZIP"]),
    "filename": st.sampled_from(["m.bin", "model \u00e9.bin"]),
    "strip_components": st.integers(0, 3),
    "owner": st.sampled_from(["1000", "1000:1000", 0]),
    "file_mode": st.sampled_from(["0644", "600", "0o640"]),
    "dir_mode": st.sampled_from(["0755", "700"]),
    "headers": st.lists(st.sampled_from(SECRET_HEADERS[1:]).map(lambda n: f"{n}: {MARKER}=="), min_size=1, max_size=2),
    "retries": st.integers(0, 9),
    "retry_backoff": st.sampled_from(["0.5", 2, "1e-3"]),
    "concurrency": st.integers(1, 64),
    "part_size": st.sampled_from(["8Mi", "64Ki", 1048576]),
    "split_below": st.sampled_from(["0", "100G", "150M"]),
    "timeout": st.sampled_from(["10", 30.5]),
    "max_unpacked_size": st.sampled_from(["1Gi", "1Ti"]),
    "max_members": st.integers(1, 10**6),
    "progress_interval": st.sampled_from(["1", "5"]),
    "s3_anonymous": st.booleans(),
    "s3_addressing_style": st.sampled_from(["auto", "path", "virtual"]),
    "log_format": st.sampled_from(["json", "console"]),
    "log_level": st.sampled_from(["debug", "info", "error"]),
    "termination_log": st.just("/dev/null"),
}
VALID_NAMES = sorted(set(VALID) - {"termination_log"})


def value_for(name: str, valid: bool = False) -> st.SearchStrategy[Any]:
    if valid:
        return VALID[name]
    nested = st.recursive(
        scalar(), lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ANY_TEXT, inner, max_size=3), max_leaves=6
    )
    if name == "headers":
        return st.one_of(st.lists(secret_header(), min_size=1, max_size=3), secret_header(), nested)
    if name == "source":
        return st.one_of(secret_url(), scalar())
    return st.one_of(scalar(), scalar(), nested)


@st.composite
def mapping(draw: st.DrawFn, names: list[str], valid: bool) -> dict[Any, Any]:
    if valid:
        keys = draw(st.lists(st.sampled_from([n for n in names if n in VALID]), max_size=5))
        return {key: draw(value_for(key, valid=True)) for key in keys}
    keys = draw(
        st.lists(
            st.one_of(st.sampled_from(names), st.sampled_from(names).map(lambda n: n.replace("_", "-")), ANY_TEXT),
            max_size=5,
        )
    )
    return {key: draw(value_for(key if isinstance(key, str) else "")) for key in keys}


def yaml_scalar(value: Any, tag: str) -> str:
    """A value as YAML text, sometimes with a tag or anchor in front, sometimes unquoted as typed."""
    text = json.dumps(value, ensure_ascii=True) if not isinstance(value, str) or tag == "json" else value
    if tag == "plain":
        return text if "\n" not in text else json.dumps(text)
    if tag == "json":
        return text
    return f"{tag} {json.dumps(text)}" if tag not in ("*anchor",) else "*anchor"


@st.composite
def config_file(draw: st.DrawFn, valid: bool) -> bytes:
    top = draw(mapping(CONFIG_NAMES, valid))
    if draw(st.booleans()):
        entries = st.lists(mapping(NAMES, valid), min_size=int(valid), max_size=3)
        top["artifacts"] = draw(entries if valid else st.one_of(entries, scalar()))
    form = draw(st.sampled_from(["json", "yaml", "yaml-lines"] if valid else ["json", "yaml", "yaml-lines", "raw"]))
    if form == "json":
        text = json.dumps(top, ensure_ascii=draw(st.booleans()), allow_nan=True, default=str)
    elif form == "yaml":
        import yaml

        text = yaml.safe_dump(top, allow_unicode=draw(st.booleans()), default_flow_style=draw(st.booleans()))
    elif form == "yaml-lines":  # written by hand: tags, anchors, unquoted values as they come
        lines = []
        for key, value in top.items():
            tag = draw(st.sampled_from(["json", "!!str"] if valid else [*TAGS, "plain", "json", "json", "plain"]))
            lines.append(f"{json.dumps(str(key))}: {yaml_scalar(value, tag)}")
        text = "\n".join(lines) + "\n"
    else:
        text = draw(st.text(st.characters(exclude_categories=()), max_size=40))
    if not valid and draw(st.integers(0, 9)) == 0:  # deep nesting, as text
        depth = draw(st.sampled_from([20, 2000, 200_000]))
        text += "deep: " + "[" * depth + "]" * depth + "\n"
    return text.encode("utf-8", "surrogatepass")  # lone surrogates become bytes that are not UTF-8


@st.composite
def flags(draw: st.DrawFn, valid: bool) -> list[str]:
    argv: list[str] = []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(VALID_NAMES if valid else NAMES))
        option = next(o for o in OPTIONS if o.name == name)
        spellings = (
            [flag_of(option)] if valid else [flag_of(option), flag_of(option) + "s", flag_of(option)[:4], "--bogus"]
        )
        flag = draw(st.sampled_from(spellings))
        value = draw(value_for(name, valid))
        if isinstance(value, list) and valid:  # --header, repeated
            argv += [a for header in value for a in (flag, header)]
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        text = _as_os_gives_it(text)
        forms = [[flag, text], [f"{flag}={text}"]] if valid else [[flag, text], [f"{flag}={text}"], [flag]]
        argv += [flag] if option.is_flag else draw(st.sampled_from(forms))
    return argv


@st.composite
def environment(draw: st.DrawFn, valid: bool) -> dict[str, str]:
    env = {}
    for name in draw(st.lists(st.sampled_from(VALID_NAMES if valid else NAMES), max_size=4)):
        option = next(o for o in OPTIONS if o.name == name)
        value = draw(value_for(name, valid))
        text = "\n".join(value) if isinstance(value, list) and all(isinstance(v, str) for v in value) else value
        text = text if isinstance(text, str) else json.dumps(text, default=str)
        env[option.env] = _as_os_gives_it(text)
    return env


def _as_os_gives_it(text: str) -> str:
    """argv and environ hold no NUL, and non-UTF-8 bytes arrive as surrogateescapes."""
    return text.replace("\x00", "").encode("utf-8", "surrogatepass").decode("utf-8", "surrogateescape")


@dataclass
class Case:
    config: bytes | None
    argv: list[str]
    env: dict[str, str]
    with_source: bool


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """Half the cases are built only of values that parse, so that many get as far as a plan."""
    valid = draw(st.booleans())
    return Case(
        config=draw(st.none() | config_file(valid)),
        argv=draw(flags(valid)),
        env=draw(environment(valid)),
        with_source=draw(st.booleans()),
    )


def _argv(case: Case, tmp: Path) -> list[str]:
    termination = tmp / "termination-log"
    termination.unlink(missing_ok=True)
    argv = ["--termination-log", str(termination), "--dry-run"]
    if case.with_source:  # so that some runs get as far as a plan
        argv += ["--source", "http://h/m", "--dest", str(tmp / "dest")]
    if case.config is not None:
        config = tmp / "fetcher.conf"
        config.write_bytes(case.config)
        argv += ["--config", str(config)]
    return argv + case.argv


def _check(code: int, stdout: str, stderr: str, termination: Path) -> None:
    event(f"exit {code}")  # --hypothesis-show-statistics: how many runs got as far as a plan
    assert code in (0, 2), stderr
    assert "Traceback" not in stderr
    for output in (stdout, stderr):
        assert MARKER not in output
    if code == 0:
        plan = json.loads(stdout)
        assert plan["artifacts"]
        return
    (line,) = stderr.strip().splitlines()  # one event, one line
    reason = termination.read_bytes().decode("utf-8")  # strict: whatever it names, it is UTF-8
    assert MARKER not in reason
    assert reason.endswith("\n") and reason.count("\n") == 1 and reason.strip()
    if line.startswith("{"):  # JSON lines, unless the input asked for the console format
        assert reason == json.loads(line)["error"] + "\n"


@pytest.mark.fault(
    "random config files, env and flags: exit 2 with one line, or a plan; never exit 1, never a secret",
    exit=2,
    area="config",
)
@seed(20261202)
@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(case=cases())
def test_random_configuration_ends_in_exit_2_or_a_plan(tmp_path_factory: pytest.TempPathFactory, case: Case) -> None:
    tmp = tmp_path_factory.mktemp("fuzz")
    argv = _argv(case, tmp)
    capture = _Capture()
    with capture:
        code = cli.main(argv, case.env)
    _check(code, capture.stdout.getvalue(), capture.stderr.getvalue(), tmp / "termination-log")


@pytest.mark.fault(
    "random configuration through python -m fetcher: exit 2 or a plan, never a traceback", exit=2, area="config"
)
@seed(20261203)
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(case=cases())
def test_random_configuration_as_a_user_runs_it(tmp_path_factory: pytest.TempPathFactory, case: Case) -> None:
    tmp = tmp_path_factory.mktemp("fuzz")
    argv = _argv(case, tmp)
    run = run_fetcher(*argv, env=case.env)
    _check(run.code, run.stdout, run.stderr, tmp / "termination-log")


class _Capture:
    """stdout and stderr as the process's own, swapped for the length of one run."""

    def __enter__(self) -> None:
        import io

        self.stdout, self.stderr = io.StringIO(), io.StringIO()
        self._saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = self.stdout, self.stderr

    def __exit__(self, *exc: object) -> None:
        sys.stdout, sys.stderr = self._saved
