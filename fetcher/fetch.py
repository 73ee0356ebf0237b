"""One artifact, end to end: skip if present, else source → pipeline → publish."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from fetcher.errors import ArchiveError, DiskFullError, IntegrityError, LocalFilesystemError
from fetcher.plan import Artifact
from fetcher.progress import Progress, human_bytes
from fetcher.publish import (
    Marker,
    already_present,
    check_owner,
    interrupted,
    previous,
    publish,
    spool_dir,
    stale,
    workspace,
)

log = structlog.get_logger("fetcher")


@dataclass(frozen=True)
class Result:
    artifact: Artifact
    skipped: bool
    size: int
    files: int
    seconds: float


def fetch(artifact: Artifact, siblings: frozenset[str] = frozenset()) -> Result:
    """``siblings``: keys of the other artifacts of this run that publish into the same dest.

    A dest that this call created is removed again when the call fails and
    leaves it empty: a failed first run leaves the filesystem as it found it.
    """
    created = _ensure_dest(artifact)
    try:
        return _fetch(artifact, siblings)
    except BaseException:
        for directory in reversed(created):
            try:
                directory.rmdir()
            except OSError:  # not empty (another fetcher, a resumable download): it stays
                break
        raise


def _fetch(artifact: Artifact, siblings: frozenset[str]) -> Result:
    started = time.monotonic()
    # A marker is trusted without the lock only when no publish is pending in dest: else the
    # workspace finishes or undoes that one first, and looks again.
    if not interrupted(artifact) and (earlier := previous(artifact)) is not None:
        if (why := stale(artifact, earlier)) is None:
            return _skip(artifact, earlier, started)
        log.info("fetching again", source=artifact.display_source, dest=str(artifact.dest), reason=why)
    if artifact.sha256 is None:
        log.warning(
            "no sha256 given: the download will not be verified",
            source=artifact.display_source,
            hint="set --sha256 / FETCHER_SHA256",
        )

    # Imported here: a run that finds everything present never loads httpx or boto3.
    from fetcher import pipeline
    from fetcher.sources import open_source
    from fetcher.transfer import Download, Parallelism

    with workspace(artifact, siblings) as staging:
        if (present := already_present(artifact)) is not None:  # another pod sharing the volume just did it
            return _skip(artifact, present, started)
        check_owner(artifact, staging)
        progress = Progress(artifact.display_source, None, artifact.progress_interval)
        download = Download(
            open_source(artifact),
            retries=artifact.retries,
            backoff=artifact.retry_backoff,
            expect_html=artifact.filename.endswith((".html", ".htm")),
            parallelism=Parallelism(
                concurrency=artifact.concurrency,
                part_size=artifact.part_size,
                spool_dir=spool_dir(artifact),
                split_below=artifact.split_below,
                copies=lambda head: {"file": 1, "zip": 3}.get(pipeline.detect_format(head, artifact.extract), 2),
            ),
        )
        keep_spool = True  # a later run resumes from it, unless its bytes are known to be useless
        disk_full = False
        try:
            info = download.start()
            total = info.size if info else None
            log.info(
                "downloading", source=artifact.display_source, size=total, size_h=human_bytes(total) if total else None
            )
            progress.total = total
            outcome = pipeline.run(
                download,
                extract=artifact.extract,
                filename=artifact.filename,
                staging=staging,
                limits=pipeline.Limits(artifact.strip_components, artifact.max_unpacked_size, artifact.max_members),
                expected_sha256=artifact.sha256,
                on_bytes=progress,
                spool_file=lambda: download.spooled,
            )
            marker = publish(
                artifact,
                staging,
                sha256=outcome.sha256,
                size=outcome.size,
                fmt=outcome.format,
                expected_size=total,
                siblings=siblings,
            )
            keep_spool = False
        except (IntegrityError, ArchiveError):
            keep_spool = False
            raise
        except DiskFullError:
            disk_full = True
            raise
        finally:
            download.close(keep_spool=keep_spool, disk_full=disk_full)
    seconds = time.monotonic() - started
    log.info(
        "published",
        source=artifact.display_source,
        dest=str(artifact.dest),
        format=outcome.format,
        transfer=download.mode,
        sha256=outcome.sha256,
        verified=artifact.sha256 is not None,
        size=outcome.size,
        files=marker.files,
        entries=marker.entries[:10],
        seconds=round(seconds, 2),
        mb_per_s=round(outcome.size / max(seconds, 1e-9) / 1e6, 1),
    )
    return Result(artifact, False, outcome.size, marker.files, seconds)


def _skip(artifact: Artifact, present: Marker, started: float) -> Result:
    log.info(
        "already present",
        source=artifact.display_source,
        dest=str(artifact.dest),
        sha256=present.sha256,
        files=present.files,
        published_at=present.published_at,
    )
    return Result(artifact, True, present.size, present.files, time.monotonic() - started)


def _ensure_dest(artifact: Artifact) -> list[Path]:
    """Create dest if need be; the directories this created, outermost first."""
    missing = list(itertools.takewhile(lambda path: not path.exists(), (artifact.dest, *artifact.dest.parents)))[::-1]
    try:
        artifact.dest.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise LocalFilesystemError(f"--dest {artifact.dest} exists and is not a directory") from None
    except OSError as exc:
        raise LocalFilesystemError(f"cannot create --dest {artifact.dest}: {exc.strerror}") from exc
    return missing
