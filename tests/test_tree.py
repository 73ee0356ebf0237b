"""How members land in the staging tree: containment, fetcher's own state, GNU tar parity.

Every case runs fetcher as a user does and checks the whole promise: the exit code, a
message naming the member, dest as it was (or the new tree, equal to what GNU tar
extracts), and nothing new anywhere outside dest, not even an empty directory.
"""

from __future__ import annotations

import io
import os
import resource
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI, Origin, make_tar, run_fetcher

GNU_TAR = "/usr/bin/tar"
needs_gnu_tar = pytest.mark.skipif(not os.access(GNU_TAR, os.X_OK) and not IN_CI, reason="GNU tar is not installed")

Entry = tuple[str, ...]


def refusal(case: str) -> pytest.MarkDecorator:
    """A case of the fault suite that fetcher must refuse: exit 5."""
    return pytest.mark.fault(case, exit=5, area="archive")


def parity(case: str) -> pytest.MarkDecorator:
    """A case of the fault suite where the right outcome is GNU tar's: exit 0."""
    return pytest.mark.fault(case, exit=0, area="archive")


def snapshot(root: Path, skip: Path | None = None) -> dict[str, Entry]:
    """Every entry under root (but ``skip``), by relative path: its type and content or target."""
    found: dict[str, Entry] = {}
    for directory, dirs, files in os.walk(root):
        if skip is not None and Path(directory) == skip.parent and skip.name in dirs:
            dirs.remove(skip.name)
        for name in dirs + files:
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, root)
            if os.path.islink(path):
                found[relative] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                found[relative] = ("dir",)
            else:
                found[relative] = ("file", Path(path).read_bytes().hex())
    return found


def model(dest: Path) -> dict[str, Entry]:
    """What dest holds, fetcher's state (but its lock) included: 'the old version' to the byte."""
    return {k: v for k, v in snapshot(dest).items() if k != os.path.join(".fetcher", "lock")}


def published_tree(dest: Path) -> dict[str, Entry]:
    return {k: v for k, v in snapshot(dest).items() if k.split(os.sep)[0] != ".fetcher"}


def gnu_tar(archive: bytes, into: Path, *args: str) -> int:
    """Extract with GNU tar itself, as a person would: its exit code, or -1 where it would write outside.

    GNU tar 1.34 strips ``a//b`` with ``--strip-components 1`` to ``/b``, and then
    creates ``/b``: such an archive is not given to it.
    """
    strip = int(args[args.index("--strip-components") + 1]) if "--strip-components" in args else 0
    if strip and _escapes_gnu_tar(archive, strip):
        return -1
    into.mkdir(parents=True)
    source = into.with_name(into.name + ".tar")  # a file, not a pipe: GNU tar detects compression there
    source.write_bytes(archive)
    done = subprocess.run(
        [GNU_TAR, "-x", "--no-same-owner", "--no-same-permissions", "-C", str(into), *args, "-f", str(source)],
        capture_output=True,
        timeout=60,
    )
    return done.returncode


def gnu_stripped(name: str, strip: int) -> str | None:
    """What GNU tar 1.34 leaves of a name after --strip-components (stripped_prefix_len in its names.c)."""
    at = len(name) - len(name.lstrip("/"))
    while at < len(name):
        at += 1
        if name[at - 1] == "/":
            strip -= 1
            if strip == 0:
                return name[at:]
            while at < len(name) and name[at] == "/":
                at += 1
    return None


def _escapes_gnu_tar(archive: bytes, strip: int) -> bool:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        names = [n for m in tar for n in (m.name, m.linkname if m.islnk() else "")]
    return any((gnu_stripped(n, strip) or "").startswith("/") for n in names)


class Sandbox:
    """A dest deep inside a directory that is watched: nothing may appear or change around dest."""

    def __init__(self, tmp_path: Path, origin: Origin) -> None:
        self.top = tmp_path / "around"
        self.dest = self.top / "o1" / "o2" / "o3" / "o4" / "o5" / "o6" / "dest"
        self.dest.mkdir(parents=True)
        (self.top / "o1" / "sentinel.txt").write_text("keep")
        self.origin = origin
        self.count = 0
        self.before = snapshot(self.top, skip=self.dest)

    def fetch(self, body: bytes, *args: str) -> Any:
        self.count += 1
        url = self.origin.add(f"/m{self.count}.tar", body)
        return run_fetcher("--source", url, "--dest", str(self.dest), *args)

    def with_old_model(self) -> dict[str, Entry]:
        run = self.fetch(make_tar({"old/model.bin": b"v1", "old/config.json": b"{}"}))
        assert run.code == 0, run.stderr
        return model(self.dest)

    def outside_unchanged(self) -> None:
        assert snapshot(self.top, skip=self.dest) == self.before


@pytest.fixture
def sandbox(tmp_path: Path, origin: Origin) -> Sandbox:
    return Sandbox(tmp_path, origin)


def refused(sandbox: Sandbox, body: bytes, member: str, reason: str, *args: str) -> None:
    """The whole promise of a refusal: exit 5, one line naming the member, dest as it was, nothing outside."""
    old = sandbox.with_old_model()
    run = sandbox.fetch(body, *args)
    assert run.code == 5, run.stderr
    assert reason in run.error and member in run.error, run.error
    assert "\n" not in run.error and "staging-" not in run.error, run.error
    assert model(sandbox.dest) == old
    sandbox.outside_unchanged()


def like_gnu_tar(sandbox: Sandbox, tmp_path: Path, body: bytes, *args: str) -> dict[str, Entry]:
    """The whole promise of a success: exit 0, and dest holds what GNU tar extracts, nothing outside."""
    assert gnu_tar(body, tmp_path / "gnu", *args) == 0
    run = sandbox.fetch(body, *args)
    assert run.code == 0, run.stderr
    expected = snapshot(tmp_path / "gnu")
    assert published_tree(sandbox.dest) == expected
    sandbox.outside_unchanged()
    return expected


# --- containment, checked before anything is created -----------------------------------

# ``up`` turns ``x`` into a way out, six levels above the staging root, once both are written:
# each is harmless on its own (``up`` is an empty directory when ``x`` is written, then replaced
# by a link). dest lies deeper than that, inside the watched sandbox.
DEEP = "a/b/c/d/e/f/g/h"
ESCAPE = {
    DEEP: ("dir", 0o755),
    f"{DEEP}/up ": ("dir", 0o755),  # renamed to up by escape_tar
    "x": ("symlink", f"{DEEP}/up/" + "../" * 6),
    f"{DEEP}/up": ("symlink", "../" * 8),
}


def escape_tar(members: dict[str, Any]) -> bytes:
    return _renamed(make_tar({**ESCAPE, **members}, compression=""), {f"{DEEP}/up ": f"{DEEP}/up"})


@pytest.mark.parametrize(
    "member",
    [
        pytest.param(
            {"x/evil/deeper/f.txt": b"evil"},
            marks=refusal("a file written through a chain of links leading outside"),
            id="file",
        ),
        pytest.param(
            {"x/evil/deeper": ("dir", 0o755)},
            marks=refusal("a directory made through a chain of links"),
            id="dir",
        ),
        pytest.param(
            {"x/evil/link": ("symlink", "target")},
            marks=refusal("a symlink made through a chain of links"),
            id="symlink",
        ),
        pytest.param(
            {"ok.txt": b"ok", "x/evil/hard": ("hardlink", "ok.txt")},
            marks=refusal("a hardlink made through a chain of links"),
            id="hardlink",
        ),
    ],
)
def test_nothing_is_created_outside_through_a_chain_of_links(sandbox: Sandbox, member: dict[str, Any]) -> None:
    name = next(n for n in member if n.startswith("x/"))
    refused(sandbox, escape_tar(member), name, "symlink")


@refusal("a link whose way out appears once the link it was written through is replaced")
def test_a_link_is_checked_where_it_finally_stands(sandbox: Sandbox) -> None:
    body = make_tar(
        {
            "sub/a/b/c": ("dir", 0o755),
            "d": ("symlink", "sub"),
            "d/x": ("symlink", "a/b/c/up/../../../.."),  # lands in sub/x, harmless while up is absent
            "sub/a/b/c/up": ("symlink", "../../.."),  # sub/x now leads out of the tree
            "d ": b"a file: the name d no longer leads to sub/x",
        },
        compression="",
    )
    refused(sandbox, _renamed(body, {"d ": "d"}), "d/x", "symlink")


@refusal("a symlink chain written before the link that opens it leads outside")
def test_every_link_is_resolved_in_the_finished_tree(sandbox: Sandbox) -> None:
    refused(sandbox, escape_tar({"ok.txt": b"ok"}), "'x'", "leads outside")


# --- fetcher's own state ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("members", "member"),
    [
        pytest.param(
            {"l": ("symlink", "."), "l/.fetcher/evil.json": b"{}"},
            "l/.fetcher/evil.json",
            marks=refusal("a file written into .fetcher/ through a link to '.'"),
            id="through-dot-link",
        ),
        pytest.param(
            {"m/f": b"f", "state": ("symlink", ".fetcher")},
            "state",
            marks=refusal("a symlink to fetcher's state directory"),
            id="link-to-state",
        ),
        pytest.param(
            {"m/f": b"f", "m/state": ("symlink", "../m/../.fetcher/lock")},
            "m/state",
            marks=refusal("a symlink into fetcher's state directory, spelt the long way"),
            id="link-into-state",
        ),
        pytest.param(
            {"./.fetcher/x": b"x"},
            "./.fetcher/x",
            marks=refusal("a member named ./.fetcher/..."),
            id="dot-slash-state",
        ),
    ],
)
def test_fetchers_state_cannot_be_reached(sandbox: Sandbox, members: dict[str, Any], member: str) -> None:
    refused(sandbox, make_tar(members), member, ".fetcher")


# --- GNU tar parity ----------------------------------------------------------------------


@needs_gnu_tar
@parity("GNU tar's own archive storing a file twice, the second a hardlink to itself")
def test_gnu_tars_hardlink_to_itself_is_extracted(sandbox: Sandbox, tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "model").mkdir(parents=True)
    (source / "model" / "a.txt").write_text("weights")
    body = subprocess.run([GNU_TAR, "-C", str(source), "-cf", "-", "model", "model/a.txt"], capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(body)) as archive:
        assert archive.getmembers()[-1].islnk()  # what makes the case
    assert like_gnu_tar(sandbox, tmp_path, body)["model/a.txt"] == ("file", b"weights".hex())


@needs_gnu_tar
@pytest.mark.parametrize(
    "strip",
    [pytest.param(n, marks=parity(f"--strip-components {n} on a ./-prefixed archive")) for n in (1, 2)],
)
def test_strip_components_counts_the_dot_like_gnu_tar(sandbox: Sandbox, tmp_path: Path, strip: int) -> None:
    source = tmp_path / "src"
    (source / "model" / "tokenizer").mkdir(parents=True)
    (source / "model" / "config.json").write_text("{}")
    (source / "model" / "tokenizer" / "vocab.txt").write_text("a b c")
    (source / "README").write_text("hi")
    body = subprocess.run([GNU_TAR, "-C", str(source), "-czf", "-", "."], capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(body)) as archive:
        assert archive.getnames()[0] == "."  # "./" as GNU tar stores it
    like_gnu_tar(sandbox, tmp_path, body, "--strip-components", str(strip))


@needs_gnu_tar
@pytest.mark.parametrize(
    "members",
    [
        pytest.param(
            {"m/x": b"file first", "m/x/": ("dir", 0o755), "m/x/in.txt": b"then a directory"},
            marks=parity("a file, then a directory of the same name"),
            id="file-then-dir",
        ),
        pytest.param(
            {"m/x": ("dir", 0o700), "m/x ": b"an empty directory, then a file"},
            marks=parity("an empty directory, then a file of the same name"),
            id="empty-dir-then-file",
        ),
        pytest.param(
            {"m/t": b"t", "m/x": ("symlink", "t"), "m/x/": ("dir", 0o755), "m/x/in.txt": b"in"},
            marks=parity("a link to a file, then a directory of the same name"),
            id="link-then-dir",
        ),
        pytest.param(
            {"m/a\\b.txt": b"a backslash is part of the name", "m\\n/c": b"c"},
            marks=parity("a backslash in a member name"),
            id="backslash",
        ),
        pytest.param(
            {"m": ("dir", 0o755), "m/empty": ("dir", 0o755), "n/deeper": ("dir", 0o755)},
            marks=parity("an archive of directories only"),
            id="directories-only",
        ),
        pytest.param(
            {"C:/weights.bin": b"w", "C:\\x": b"x"},
            marks=parity("names that look like Windows drives"),
            id="drive-letters",
        ),
    ],
)
def test_an_archive_replacing_its_own_members_like_gnu_tar(
    sandbox: Sandbox, tmp_path: Path, members: dict[str, Any]
) -> None:
    # dict keys are unique: "m/x " stands in for a second member named "m/x", renamed below
    body = _renamed(make_tar(members, compression=""), {"m/x ": "m/x", "d ": "d"})
    like_gnu_tar(sandbox, tmp_path, body)


def _renamed(raw: bytes, names: dict[str, str]) -> bytes:
    """The same tar with some members renamed: the way to write two members of one name."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(raw)) as source, tarfile.open(fileobj=out, mode="w") as target:
        for info in source:
            data = source.extractfile(info) if info.isreg() else None
            info.name = names.get(info.name, info.name)
            target.addfile(info, data)
    return out.getvalue()


# --- what the archive holds is exit 5, named by the member --------------------------------


@pytest.mark.parametrize(
    ("members", "member", "reason"),
    [
        pytest.param(
            {"a": b"a file", "a/b/c.txt": b"under it"},
            "a/b/c.txt",
            "not a directory",
            marks=refusal("a member whose parent's parent is a file"),
            id="parent-is-a-file",
        ),
        pytest.param(
            {"l": ("symlink", "nothing/there"), "l/x/y.txt": b"under a dangling link"},
            "l/x/y.txt",
            "symlink",
            marks=refusal("a member under a dangling link"),
            id="dangling-parent",
        ),
        pytest.param(
            {"d": ("dir", 0o755), "s": ("symlink", "d"), "s/e": ("dir", 0o500), "s ": b"s is a file now"},
            "s/e",
            "symlink",
            marks=refusal("a directory whose deferred mode would land on a changed path"),
            id="deferred-mode",
        ),
        pytest.param(
            {"m/ok.txt": b"ok", "m/" + "n" * 300: b"x"},
            "nnnnnnnn",
            "too long",
            marks=refusal("a member name past NAME_MAX"),
            id="name-max",
        ),
        pytest.param(
            {"m/ok.txt": b"ok", "/".join(["m", *["p" * 200] * 21, "f.txt"]): b"x"},
            "pppppppp",
            "too long",
            marks=refusal("a member path past PATH_MAX"),
            id="path-max",
        ),
        pytest.param(
            {"m/ok.txt": b"ok", "m/long": ("symlink", "/".join(["q" * 200] * 21))},
            "m/long",
            "longer than",
            marks=refusal("a symlink target past PATH_MAX"),
            id="target-past-path-max",
        ),
    ],
)
def test_what_the_archive_holds_is_exit_5_named_by_the_member(
    sandbox: Sandbox, members: dict[str, Any], member: str, reason: str
) -> None:
    refused(sandbox, _renamed(make_tar(members, compression=""), {"s ": "s"}), member, reason)


def test_a_too_long_name_is_shortened_in_the_message(sandbox: Sandbox) -> None:
    run = sandbox.fetch(make_tar({"m/" + "n" * 3000: b"x"}))
    assert run.code == 5
    assert "n" * 200 not in run.error and len(run.error) < 600, run.error


@refusal("a refused member whose name is not UTF-8")
def test_a_name_that_is_not_utf8_is_escaped_in_every_message(sandbox: Sandbox, tmp_path: Path) -> None:
    old = sandbox.with_old_model()
    raw = make_tar({"m\udcff": b"a file", "m\udcff/x/y": b"under it"}, compression="")
    termination = tmp_path / "termination-log"
    run = run_fetcher(
        "--source",
        sandbox.origin.add("/bytes.tar", raw),
        "--dest",
        str(sandbox.dest),
        env={"FETCHER_TERMINATION_LOG": str(termination)},
    )
    assert run.code == 5, run.stderr
    assert "m\\xff/x/y" in run.error, run.error
    assert "m\\xff/x/y" in termination.read_text(encoding="utf-8")
    assert model(sandbox.dest) == old
    sandbox.outside_unchanged()


# --- where fetcher refuses what GNU tar extracts (the README lists each, with its reason) ----


@pytest.mark.parametrize(
    ("members", "member", "reason"),
    [
        pytest.param(
            {"m/real/a.txt": b"a", "m/link": ("symlink", "real"), "m/link/b.txt": b"through the link"},
            "m/link/b.txt",
            "written through the symlink 'm/link'",
            marks=refusal("a member written through a symlink that stays inside dest"),
            id="through-inside-link",
        ),
        pytest.param(
            {"m/real/a.txt": b"a", "m/link": ("symlink", "real"), "m/link/": ("dir", 0o755)},
            "m/link",
            "a directory over a symlink to a directory",
            marks=refusal("a directory member over a symlink to a directory"),
            id="dir-over-dir-link",
        ),
        pytest.param(
            {"m/real/a.txt": b"a", "m/link": ("symlink", "real"), "m/h": ("hardlink", "m/link/a.txt")},
            "m/h",
            "not a file unpacked before it",
            marks=refusal("a hardlink whose target is reached through a symlink"),
            id="hardlink-through-link",
        ),
        pytest.param(
            {"m/a.txt": b"a", "m/dangling": ("symlink", "missing/../../../x")},
            "m/dangling",
            "goes up ('..') past 'm/missing'",
            marks=refusal("a dangling symlink whose '..' would lead outside once its missing part exists"),
            id="dangling-dot-dot",
        ),
    ],
)
@needs_gnu_tar
def test_gnu_tar_goes_on_where_fetcher_refuses(
    sandbox: Sandbox, tmp_path: Path, members: dict[str, Any], member: str, reason: str
) -> None:
    body = make_tar(members)
    assert gnu_tar(body, tmp_path / "gnu") == 0  # the divergence is real
    refused(sandbox, body, member, reason)


# --- links whose meaning depends on what dest holds -------------------------------------------


@refusal("two artifacts into one dest: a '..' after a name the archive lacks, which another artifact makes a link")
def test_a_dot_dot_after_a_name_staging_lacks_is_refused(sandbox: Sandbox, tmp_path: Path) -> None:
    old = sandbox.with_old_model()
    first = sandbox.origin.add("/a.tar", make_tar({"a": ("symlink", "b/..")}))  # b is not in this archive
    second = sandbox.origin.add("/b.tar", make_tar({"b": ("symlink", ".")}))  # in dest, b/.. is dest's parent
    config = tmp_path / "two.yaml"
    config.write_text(f"dest: {sandbox.dest}\nartifacts:\n  - source: {first}\n  - source: {second}\n")
    run = run_fetcher("--config", str(config))
    assert run.code == 5, run.stderr
    assert "'a'" in run.error and "'b'" in run.error and "'..'" in run.error, run.error
    assert "\n" not in run.error
    assert model(sandbox.dest) == old
    sandbox.outside_unchanged()


@refusal("a symlink into .fetcher through a name the archive lacks")
def test_a_state_dir_after_a_name_staging_lacks_is_refused(sandbox: Sandbox) -> None:
    refused(sandbox, make_tar({"m/f": b"f", "m/s": ("symlink", "../b/.fetcher/lock")}), "m/s", ".fetcher")


@refusal("a symlink chain that takes more path components to resolve than the cap")
def test_a_link_taking_too_many_components_to_resolve_is_refused(sandbox: Sandbox) -> None:
    pad = "d/../" * 800  # 1,600 components a hop; 3 hops are past the cap of 4,096
    members: dict[str, Any] = {"d": ("dir", 0o755), "ok.txt": b"ok"}
    members |= {f"L{i}": ("symlink", f"{pad}L{i + 1}") for i in range(3)}
    members |= {"L3": ("symlink", "d")}
    refused(sandbox, make_tar(members), "'L0'", "4096")


@parity("a symlink chain under the cap of path components is unpacked")
def test_a_link_chain_under_the_cap_is_unpacked(sandbox: Sandbox) -> None:
    pad = "d/../" * 800
    run = sandbox.fetch(make_tar({"d/f": b"f", "L0": ("symlink", f"{pad}L1"), "L1": ("symlink", f"{pad}d")}))
    assert run.code == 0, run.stderr
    assert (sandbox.dest / "L0" / "f").read_bytes() == b"f"
    sandbox.outside_unchanged()


# --- depth --------------------------------------------------------------------------------------


@refusal("a member 1,500 directories deep (under PATH_MAX)")
def test_a_member_deeper_than_the_bound_is_refused(sandbox: Sandbox) -> None:
    refused(sandbox, make_tar({"a/" * 1500 + "f": b"x"}), "'a/a/a/", "deeper than 256 path components")


@parity("a member 256 path components deep is unpacked")
def test_a_member_at_the_depth_bound_is_unpacked(sandbox: Sandbox) -> None:
    run = sandbox.fetch(make_tar({"a/" * 255 + "f": b"x"}))
    assert run.code == 0, run.stderr
    assert (sandbox.dest / ("a/" * 255 + "f")).read_bytes() == b"x"
    sandbox.outside_unchanged()


@parity("members 256 path components deep unpack under a limit of 300 open files (fds do not grow with depth)")
def test_deep_members_hold_no_fd_per_level(sandbox: Sandbox) -> None:
    members: dict[str, Any] = {"/".join(f"{k}.{i}" for i in range(255)) + "/f": b"x" for k in range(4)}
    body = make_tar(members)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (300, hard))  # inherited by fetcher
    try:
        run = sandbox.fetch(body)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert run.code == 0, run.stderr
    assert published_tree(sandbox.dest)[next(iter(members))] == ("file", b"x".hex())
    sandbox.outside_unchanged()
