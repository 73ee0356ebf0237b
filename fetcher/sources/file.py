"""file:// sources: a local path, e.g. a model on a mounted volume."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from fetcher.errors import FetchError, SourceChangedError
from fetcher.plan import Artifact
from fetcher.sources.base import CHUNK_SIZE, Body, ObjectInfo


class FileSource:
    def __init__(self, artifact: Artifact) -> None:
        self.path = Path(unquote(urlsplit(artifact.source).path))
        self.display = artifact.display_source
        self._pin: tuple[int, int] | None = None

    @contextmanager
    def open(self, start: int = 0, end: int | None = None) -> Iterator[Body]:
        try:
            handle = self.path.open("rb")
        except FileNotFoundError as exc:
            raise FetchError(f"{self.display} does not exist") from exc
        except OSError as exc:
            raise FetchError(f"cannot read {self.display}: {exc.strerror}") from exc
        with handle:
            stat = os.fstat(handle.fileno())
            pin = (stat.st_size, stat.st_mtime_ns)
            if self._pin is not None and pin != self._pin:
                raise SourceChangedError(f"{self.display} changed while it was being read")
            self._pin = pin
            handle.seek(start)
            info = ObjectInfo(size=stat.st_size, ranges=True, version=f"{pin[0]}-{pin[1]}")
            limit = (end if end is not None else stat.st_size) - start
            yield Body(info, start, self._chunks(handle, limit), partial=True)

    def _chunks(self, handle: BinaryIO, limit: int) -> Iterator[bytes]:
        try:
            while limit > 0 and (chunk := handle.read(min(CHUNK_SIZE, limit))):
                limit -= len(chunk)
                yield chunk
        except OSError as exc:
            raise FetchError(f"cannot read {self.display}: {exc.strerror}") from exc

    def close(self) -> None:
        pass
