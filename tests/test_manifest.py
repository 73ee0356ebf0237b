"""The manifest's pure parts, against the references users copy from: huggingface_hub's pattern
filter and GNU coreutils' sha256sum."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
from huggingface_hub.utils import filter_repo_objects
from hypothesis import given, settings
from hypothesis import strategies as st

from fetcher.errors import UsageError
from fetcher.manifest import parse_sha256sums, selected

_PART = st.sampled_from(["a", "b", "original", "model.safetensors", "params.json", "x.bin", ".hidden", "c\\d"])
_PATH = st.lists(_PART, min_size=1, max_size=3).map("/".join)
_PATTERN = st.sampled_from(
    ["*", "*.json", "*.safetensors", "original/", "original/*", "a/*", "*/params.json", "?.bin", "[ab]*", "c\\*", ".*"]
)


@settings(max_examples=400, derandomize=True)
@given(
    paths=st.lists(_PATH, max_size=8), include=st.lists(_PATTERN, max_size=3), exclude=st.lists(_PATTERN, max_size=3)
)
def test_include_exclude_select_what_huggingface_hub_selects(
    paths: list[str], include: list[str], exclude: list[str]
) -> None:
    theirs = list(filter_repo_objects(paths, allow_patterns=include or None, ignore_patterns=exclude or None))
    assert [p for p in paths if selected(p, include, exclude)] == theirs


def test_sha256sums_reads_what_sha256sum_writes(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.bin").write_bytes(b"w")
    (tmp_path / "c.json").write_bytes(b"{}")
    text = subprocess.run(
        ["sha256sum", "./c.json", "sub/w.bin"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    binary = subprocess.run(["sha256sum", "-b", "c.json"], cwd=tmp_path, capture_output=True, text=True).stdout
    sums = parse_sha256sums(f"# sums\n\n{text}{binary}", "sums")
    assert set(sums) == {"c.json", "sub/w.bin"}


def test_sha256sums_reads_the_names_sha256sum_escapes(tmp_path: Path) -> None:
    """A name with a backslash or a newline: sha256sum writes the line with a leading backslash."""
    names = ["back\\slash.bin", "new\nline.bin"]
    for name in names:
        (tmp_path / name).write_bytes(name.encode())
    text = subprocess.run(["sha256sum", *names], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert all(line.startswith("\\") for line in text.splitlines())  # as GNU coreutils writes them
    sums = parse_sha256sums(text, "sums")  # was a usage error: "line 1 is not 'SHA256  path'"
    assert sums == {name: hashlib.sha256(name.encode()).hexdigest() for name in names}


@pytest.mark.parametrize(
    ("text", "line"),
    [("abc  file\n", 1), (f"{'0' * 64}  ok\n{'1' * 64} nospace\n", 2), (f"{'0' * 64}  ../up\n", 1)],
)
def test_a_line_sha256sum_would_not_write_is_named(text: str, line: int) -> None:
    with pytest.raises(UsageError, match=f"line {line}"):
        parse_sha256sums(text, "sums")
