"""The plan: one fully-resolved, validated item per artifact.

Everything after this point works from ``Artifact`` alone, so a dry run can
show exactly what a real run would do.
"""

from __future__ import annotations

import functools
import hashlib
import posixpath
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from fetcher import STATE_DIR
from fetcher.config import RunConfig, Values
from fetcher.errors import UsageError
from fetcher.redact import mask_headers, redact_url
from fetcher.schemes import scheme_of


@dataclass(frozen=True)
class Artifact:
    """One thing to fetch and where it goes, with every option resolved."""

    index: int
    source: str
    dest: Path
    sha256: str | None
    sha256sums: str | None
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    extract: str
    filename: str
    strip_components: int
    owner: tuple[int, int | None] | None
    file_mode: int | None
    dir_mode: int | None
    headers: tuple[tuple[str, str], ...]
    bearer_token_file: Path | None
    retries: int
    retry_backoff: float
    concurrency: int
    part_size: int
    split_below: int
    timeout: float
    low_speed_limit: int
    low_speed_time: float
    max_unpacked_size: int
    max_members: int
    progress_interval: float
    s3_anonymous: bool
    s3_no_verify_ssl: bool
    s3_addressing_style: str
    registry_auth_file: Path | None
    oci_platform: str | None
    oci_path: str | None
    oci_plain_http: bool
    state_root: Path | None  # --state-dir: None keeps the state in dest/.fetcher
    cache_dir: Path | None
    cache_max_size: int | None
    cache_verify: str
    # Options set by KServe's environment (fetcher.kserve), each with the variable that set it: named
    # so in messages, and its patterns, as KServe's, left unused by a single object.
    from_kserve: tuple[tuple[str, str], ...] = ()
    # Names in dest where another artifact of the run has its dest (/m's "lora" for /m/lora), each
    # with that artifact's display source: entries this one may not publish (publish._plan).
    nested_dests: tuple[tuple[str, str], ...] = ()
    # Where this dest lies inside another artifact's: that dest, its state directory, and the name
    # in it this dest lies under, which no marker there may list (publish.check_nesting).
    inside: tuple[tuple[Path, Path, str], ...] = ()

    @property
    def scheme(self) -> str:
        return self.source.split("://", 1)[0].lower()

    @property
    def is_directory(self) -> bool | None:
        """Whether the source names a directory, when its text alone tells (else its source decides)."""
        return scheme_of(self.source).is_directory(self.source)

    @property
    def display_source(self) -> str:
        return redact_url(self.source)

    @functools.cached_property
    def key(self) -> str:
        """Stable name of this artifact's state: same source and dest, same key.

        The source counts with its named credentials masked (a rotated signature or token is
        the same object) but with every other value as given, even one that the display masks
        because it looks like a credential: two objects must never share one key. Only a hash
        of it is kept.
        """
        identity = f"{redact_url(self.source, guess=False)}\n{self.filename}\n{self.strip_components}\n{self.extract}"
        return hashlib.sha256(identity.encode()).hexdigest()[:16]

    @functools.cached_property
    def state_dir(self) -> Path:
        """dest/.fetcher, or dest's own directory under --state-dir: one per dest, whichever path names it."""
        if self.state_root is None:
            return self.dest / STATE_DIR
        where = self.dest.resolve()
        name = re.sub(r"[^A-Za-z0-9._-]", "_", where.name)[:40] or "root"
        return self.state_root / f"{name}-{hashlib.sha256(str(where).encode()).hexdigest()[:12]}"

    def describe(self) -> dict[str, Any]:
        """The plan item as shown to people: secrets masked."""
        shown: dict[str, Any] = {"source": self.display_source, "dest": str(self.dest)}
        if self.is_directory:  # its files' digests come from --sha256sums or the source: see the files
            shown["sha256"] = "(per file)"
        else:
            shown |= {"sha256": self.sha256 or "(not given: unverified)", "extract": self.extract}
            shown["filename"] = self.filename
        if self.sha256sums is not None:
            shown["sha256sums"] = redact_url(self.sha256sums) if "://" in self.sha256sums else self.sha256sums
        if self.include:
            shown["include"] = list(self.include)
        if self.exclude:
            shown["exclude"] = list(self.exclude)
        if self.strip_components:
            shown["strip_components"] = self.strip_components
        if self.owner is not None:
            uid, gid = self.owner
            shown["owner"] = f"{uid}:{gid}" if gid is not None else str(uid)
        if self.file_mode is not None:
            shown["file_mode"] = f"{self.file_mode:04o}"
        if self.dir_mode is not None:
            shown["dir_mode"] = f"{self.dir_mode:04o}"
        if self.state_root is not None:
            shown["state_dir"] = str(self.state_dir)
        if self.headers:
            shown["headers"] = mask_headers(self.headers)
        if self.bearer_token_file is not None:
            shown["bearer_token_file"] = str(self.bearer_token_file)
        return shown


def default_filename(source: str) -> str:
    """Last segment of the URL path, query dropped: what curl -O would pick."""
    name = posixpath.basename(unquote(urlsplit(source).path.rstrip("/")))
    return name if name not in ("", ".", "..", STATE_DIR) else "download"


def _artifact(index: int, values: Values, where: str) -> Artifact:
    for required in ("source", "dest"):
        if values.get(required) is None:
            flag = "--" + required
            raise UsageError(
                f"{where}no {required} given: set {flag}, FETCHER_{required.upper()} or '{required}' in --config"
            )
    # Every option that is an Artifact field passes straight through; a few need shaping.
    same = {field.name: values[field.name] for field in fields(Artifact) if field.name in values}
    artifact = Artifact(
        **same
        | {
            "index": index,
            "dest": _dest(Path(values["dest"])),
            "state_root": values.get("state_dir"),
            "filename": values["filename"] or default_filename(values["source"]),
            "headers": tuple(values["headers"] or ()),
            "include": tuple(values["include"] or ()),
            "exclude": tuple(values["exclude"] or ()),
            "from_kserve": tuple(sorted(values.get("from_kserve", {}).items())),
        }
    )
    check_directory_options(artifact, artifact.is_directory, where)
    # One of them would silently replace the other on the wire (httpx sends the URL's as Basic).
    credentials = [
        what
        for what, given in (
            ("user:password@ in the URL", urlsplit(artifact.source).username is not None),
            ("an Authorization header", any(name.lower() == "authorization" for name, _ in artifact.headers)),
            ("--bearer-token-file", artifact.bearer_token_file is not None),
        )
        if given
    ]
    if len(credentials) > 1:
        raise UsageError(f"{where}credentials given twice, as {' and as '.join(credentials)}: keep one")
    return artifact


def _dest(dest: Path) -> Path:
    """A dest with ``..`` in it, as the kernel would find it: ``x/y/../../m`` is ``m``, where
    ``mkdir -p`` would make ``x/y`` (outside dest, and left behind by a failed run) to get there."""
    return dest.resolve() if ".." in dest.parts else dest


def check_directory_options(artifact: Artifact, directory: bool | None, where: str = "") -> None:
    """--sha256 names one stream's digest, --sha256sums a directory's: each only where it means something.

    Called again by a source that finds out only when it resolves (an S3 key that is a prefix).
    KServe's STORAGE_ALLOW_PATTERNS and STORAGE_IGNORE_PATTERNS are no mistake with one object:
    its initializer applies them to the files of a directory only (kserve_storage.py ``_download_s3``).
    """
    kserve = dict(artifact.from_kserve)
    if directory and artifact.sha256 is not None:
        given = kserve.get("sha256", "--sha256")
        raise UsageError(
            f"{where}{given} verifies one file or archive, but {artifact.display_source} is a directory: "
            "give its files' digests with --sha256sums (sha256sum's format)"
        )
    patterns = [name for name in ("include", "exclude") if getattr(artifact, name) and name not in kserve]
    if directory is False and (artifact.sha256sums is not None or patterns):
        given = "--sha256sums" if artifact.sha256sums is not None else "--include/--exclude"
        raise UsageError(
            f"{where}{given} applies to a directory (s3://bucket/prefix/, hf://org/model, file:///dir/), "
            f"and {artifact.display_source} is one file: use --sha256"
        )


def read_bearer_token(path: Path) -> str:
    """The token, checked; a dry run reads it too, to find a bad file before a real run does."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not readable text"
        raise UsageError(f"--bearer-token-file {path}: {reason}") from None
    if not token:
        raise UsageError(f"--bearer-token-file {path}: the file is empty")
    if not re.fullmatch(r"[\x21-\x7e]+", token):  # never echo it: a broken token is still a secret
        raise UsageError(f"--bearer-token-file {path}: the token must be one line of printable ASCII")
    return token


def build_plan(config: RunConfig) -> list[Artifact]:
    many = len(config.artifacts) > 1
    plan = [_artifact(i, values, f"artifacts[{i}]: " if many else "") for i, values in enumerate(config.artifacts)]
    state_of: dict[Path, Artifact] = {}
    for item in plan:  # one dest, one lock and one set of markers: in one state directory
        other = state_of.setdefault(item.dest.resolve(), item)
        if other.state_root != item.state_root:
            raise UsageError(
                f"artifacts[{other.index}] and artifacts[{item.index}] share the dest {item.dest} but not "
                "--state-dir: give them the same one"
            )
    same: dict[tuple[Path, str], Artifact] = {}
    for item in plan:  # one key, one marker: the second would take the first's files for its old version
        first = same.setdefault((item.dest.resolve(), item.key), item)
        if replace(first, index=item.index, dest=item.dest) != item:
            raise UsageError(
                f"artifacts[{first.index}] and artifacts[{item.index}] both fetch {item.display_source} into "
                f"{item.dest}, with other options: make them one artifact (--include takes several patterns)"
            )
    seen: dict[tuple[Path, str], int] = {}
    for item in plan:
        if item.extract == "none" and not item.is_directory:  # with auto the name matters only if it is no archive
            spot = (item.dest.resolve(), item.filename)
            if spot in seen and plan[seen[spot]].source != item.source:
                raise UsageError(
                    f"artifacts[{seen[spot]}] and artifacts[{item.index}] both write {item.dest / item.filename}"
                )
            seen[spot] = item.index
    return _with_nested_dests(plan)


def _with_nested_dests(plan: list[Artifact]) -> list[Artifact]:
    """Each artifact with the names in its dest that hold another's dest, and the plan in the order
    to run it: an artifact after every one whose dest holds its own, so an outer model that no
    longer has an entry removes it before an inner one is published there (else in config order).

    Nesting is found by a walk up each dest's parents, not by comparing every pair, as a run may
    have thousands of artifacts.
    """
    by_dest: dict[Path, list[int]] = {}
    for item in plan:
        by_dest.setdefault(item.dest.resolve(), []).append(item.index)
    nested: dict[int, list[tuple[str, str]]] = {}
    inside: dict[Path, list[tuple[Path, Path, str]]] = {}
    for inner in by_dest:
        for outer in inner.parents:
            if outer not in by_dest:
                continue
            name = inner.relative_to(outer).parts[0]
            holder = plan[by_dest[outer][0]]
            inside.setdefault(inner, []).append((holder.dest, holder.state_dir, name))
            for index in by_dest[outer]:
                nested.setdefault(index, []).extend((name, plan[i].display_source) for i in by_dest[inner])
    placed = [
        replace(item, nested_dests=tuple(nested.get(item.index, ())), inside=tuple(inside.get(dest, ())))
        if item.index in nested or dest in inside
        else item
        for item, dest in ((item, item.dest.resolve()) for item in plan)
    ]
    return sorted(placed, key=lambda item: len(item.inside))  # how many dests of the run hold this one
