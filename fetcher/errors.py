"""The failures fetcher can report.

Each class is one documented exit code; the mapping to numbers lives only in
``fetcher.cli``. Messages are one line, safe to show in ``kubectl describe``:
they never carry secrets.
"""

from __future__ import annotations

import errno


class FetcherError(Exception):
    """Base of every failure fetcher reports on purpose."""


class UsageError(FetcherError):
    """The options or configuration are wrong: retrying will not help."""


class FetchError(FetcherError):
    """The source could not deliver the bytes (after the retries that make sense)."""


class TransientFetchError(FetchError):
    """A failure worth retrying: connection reset, timeout, 408/429/5xx, throttling."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SourceChangedError(FetchError):
    """The object changed while we were reading it: never stitch two versions."""


class IntegrityError(FetcherError):
    """The bytes are not the ones that were asked for (sha256 or size)."""


class ArchiveError(FetcherError):
    """The archive is unsafe, corrupt, unsupported or over the limits."""


class LocalFilesystemError(FetcherError):
    """Writing to the destination failed: no space, permission denied, read-only."""


class DiskFullError(LocalFilesystemError):
    """No space left (or over quota): a download spool only makes this worse, so it is dropped."""


def local_error(exc: OSError, doing: str) -> LocalFilesystemError:
    """One line for a failed filesystem call, without the traceback."""
    kind = DiskFullError if exc.errno in (errno.ENOSPC, errno.EDQUOT) else LocalFilesystemError
    return kind(f"{doing}: {exc.strerror or exc}")
