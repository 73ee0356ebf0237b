"""Random archives against the promise: fetcher never writes outside dest, and either publishes
the archive whole, as GNU tar extracts it, or refuses it (exit 5) with dest as it was.

Archives mix files, directories, symlinks and hardlinks; names come from a small alphabet
(with ``.``, ``..``, ``./``, a backslash, fetcher's ``.fetcher``) so that members collide,
replace one another, and link through one another, in chains, relative and absolute.
Each example runs ``python -m fetcher`` as a user does, on a ``file://`` source.
"""

from __future__ import annotations

import io
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import make_tar, run_fetcher
from tests.test_tree import Entry, gnu_tar, model, needs_gnu_tar, published_tree, snapshot

COMPONENTS = ["a", "b", "c", "a", "b", ".", "..", "a\\b", ".fetcher"]
PREFIXES = ["", "", "", "", "./", "./", "/", "a//"]
SIZES = [0, 1, 511, 512, 513, 4096, 70_000]


@dataclass(frozen=True)
class Member:
    kind: str  # file, dir, symlink, hardlink
    name: str
    arg: str | int = 0  # a link's target, or a file's size

    def __repr__(self) -> str:  # what a failing example prints: short enough to read
        return f"{self.kind}({self.name!r}, {self.arg!r})"


paths = st.builds(
    lambda prefix, parts, slash: prefix + "/".join(parts) + slash,
    st.sampled_from(PREFIXES),
    st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=3),
    st.sampled_from(["", "", "/"]),
)
names = paths.filter(lambda n: n.strip("/") != "")
link_targets = st.one_of(
    paths,
    st.sampled_from(["/etc", "/tmp/x", ".", "..", "../..", "a/../..", "a/b/../../.."]),
    st.builds(lambda n: "/".join([".."] * n + ["o1"]), st.integers(1, 9)),  # up to the watched sandbox
)
members = st.one_of(
    st.builds(Member, st.just("file"), names.map(lambda n: n.rstrip("/") or "a"), st.sampled_from(SIZES)),
    st.builds(Member, st.just("dir"), names),
    st.builds(Member, st.just("symlink"), names.map(lambda n: n.rstrip("/") or "a"), link_targets),
    st.builds(Member, st.just("hardlink"), names.map(lambda n: n.rstrip("/") or "a"), names),
)
archives = st.lists(members, min_size=1, max_size=8)


def build(archive: list[Member], compression: str) -> bytes:
    """The members in order, duplicates and all (make_tar takes a dict, which cannot repeat a name)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=f"w:{compression}" if compression else "w") as tar:
        for number, member in enumerate(archive):
            info = tarfile.TarInfo(member.name)
            info.mtime = 1_700_000_000
            data = None
            if member.kind == "file":
                size = int(member.arg)
                payload = bytes((number + i) % 251 for i in range(size))
                info.size, info.mode, data = size, 0o644, io.BytesIO(payload)
            elif member.kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            else:
                info.type = tarfile.SYMTYPE if member.kind == "symlink" else tarfile.LNKTYPE
                info.linkname = str(member.arg)
            tar.addfile(info, data)
    return out.getvalue()


class World:
    """Directories around a dest and around GNU tar's output, each watched for anything new."""

    def __init__(self, top: Path, old_dest: Path) -> None:
        self.top = top
        self.dest = top / "o1" / "o2" / "o3" / "o4" / "o5" / "o6" / "dest"
        self.gnu = top / "g1" / "g2" / "g3" / "g4" / "g5" / "g6" / "gnu"
        shutil.copytree(old_dest, self.dest, symlinks=True)  # the old model, its marker intact
        (top / "o1" / "sentinel").mkdir()
        self.gnu.parent.mkdir(parents=True)
        self.old = model(self.dest)
        self.around = self._around()

    def _around(self) -> dict[str, Entry]:
        return {k: v for k, v in snapshot(self.top).items() if not k.startswith(("o1/o2/o3/o4/o5/o6/dest", "g1/"))}

    def gnu_outside(self) -> dict[str, Entry]:
        return {k: v for k, v in snapshot(self.top / "g1").items() if not k.startswith("g2/g3/g4/g5/g6/gnu")}


@pytest.fixture(scope="module")
def old_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("old")
    (where / "old.tar").write_bytes(make_tar({"old/model.bin": b"v1", "old/config.json": b"{}"}))
    run = run_fetcher("--source", f"file://{where / 'old.tar'}", "--dest", str(where / "dest"))
    assert run.code == 0, run.stderr
    return where / "dest"


def check(archive: list[Member], compression: str, strip: int, old_model: Path) -> None:
    body = build(archive, compression)
    with tempfile.TemporaryDirectory(prefix="props-") as scratch:
        world = World(Path(scratch) / "top", old_model)
        source = Path(scratch) / ("m.tar.gz" if compression else "m.tar")
        source.write_bytes(body)
        strip_args = ("--strip-components", str(strip)) if strip else ()

        gnu_before = world.gnu_outside()
        gnu_code = gnu_tar(body, world.gnu, *strip_args)
        assert world.gnu_outside() == gnu_before, "GNU tar wrote outside its directory"
        gnu_accepts = gnu_code == 0

        run = run_fetcher("--source", f"file://{source}", "--dest", str(world.dest), *strip_args)
        assert run.code in (0, 5), run.stderr
        assert world._around() == world.around, "something was created or changed outside dest"
        if run.code == 0:
            if gnu_code == -1:  # GNU tar would write outside its directory: no reference to compare with
                return
            assert gnu_accepts, f"fetcher published what GNU tar refuses (exit {gnu_code})"
            expected = {k: v for k, v in world.old.items() if not k.startswith(".fetcher")}
            expected |= snapshot(world.gnu)
            quirks = gnu_resurrects(archive, strip)
            assert without(published_tree(world.dest), quirks) == without(expected, quirks)
        else:
            error = run.error
            assert "\n" not in error and "staging-" not in error, error
            assert model(world.dest) == world.old, "a refusal changed dest"


def normal(name: str, strip: int) -> str | None:
    """Where a member lands, as GNU tar counts components for --strip-components."""
    parts = [p for p in name.split("/") if p]
    return None if len(parts) <= strip else "/".join(p for p in parts[strip:] if p != ".")


def gnu_resurrects(archive: list[Member], strip: int) -> set[str]:
    """Names where GNU tar may put back a symlink over the later member that replaced it.

    GNU tar writes a symlink whose target is absolute or has '..' at the very end, over an
    empty placeholder file, if that file is still there: it recognises it by inode number
    and ctime, which the member that replaced it often reuses. A later member wins in
    tar's model and in fetcher; the comparison leaves these names out.
    """
    delayed: set[str] = set()
    found: set[str] = set()
    for member in archive:
        name = normal(member.name, strip)
        if name is None:
            continue
        if name in delayed:
            found.add(name)
        target = str(member.arg)
        placeholder = member.kind == "symlink" and (target.startswith("/") or ".." in target.split("/"))
        if placeholder or (member.kind == "hardlink" and normal(target, strip) in delayed):
            delayed.add(name)
    return found


def without(tree: dict[str, Entry], names: set[str]) -> dict[str, Entry]:
    return {k: v for k, v in tree.items() if not any(k == n or k.startswith(n + "/") for n in names)}


PROPERTIES = settings(
    max_examples=50,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@needs_gnu_tar
@PROPERTIES
@given(archive=archives, compression=st.sampled_from(["", "gz"]))
def test_random_archives_are_published_as_gnu_tar_extracts_them_or_refused(
    old_model: Path, archive: list[Member], compression: str
) -> None:
    check(archive, compression, 0, old_model)


@needs_gnu_tar
@settings(PROPERTIES, max_examples=30)
@given(archive=archives, strip=st.integers(1, 3))
def test_random_archives_with_strip_components_too(old_model: Path, archive: list[Member], strip: int) -> None:
    check(archive, "", strip, old_model)
