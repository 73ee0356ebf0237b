"""structlog set-up: key=value events on a console, JSON lines elsewhere.

Every event passes through ``scrub_secrets`` last before rendering, so a
credential that slipped into a message is masked rather than printed, and a
name that is not UTF-8 or holds a line break is escaped rather than breaking
the writer or the line.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from fetcher.redact import scrub

_FIRST = ("timestamp", "level", "event")
_MULTILINE = frozenset({"exception"})  # a traceback keeps its lines (JSON escapes them anyway)

_SURROGATE = re.compile(r"[\ud800-\udfff]")
# What str.splitlines() splits on, and the other control characters: all but the tab.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def writable(text: str) -> str:
    """Text that any UTF-8 writer takes: a name's undecodable bytes, which Python carries
    as surrogates (surrogateescape), shown as ``\\xNN``, any other lone surrogate as ``\\uNNNN``."""
    return _SURROGATE.sub(lambda m: _escape_surrogate(ord(m[0])), text)


def _escape_surrogate(code: int) -> str:
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def one_line(text: str) -> str:
    """``writable``, and line breaks and control characters escaped as Python writes them."""
    return _CONTROL.sub(lambda m: repr(m[0])[1:-1], writable(text))


def safe_message(text: str) -> str:
    """A message as it may leave the process: credentials masked, one line, encodable."""
    return one_line(scrub(text))


def scrub_secrets(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Mask credentials and escape what cannot be written in every string value;
    put time, level and event first for readers of JSON."""
    ordered = {key: event[key] for key in _FIRST if key in event} | dict(event)
    return {key: _safe(key, value) for key, value in ordered.items()}


def _safe(key: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    return writable(scrub(value)) if key in _MULTILINE else safe_message(value)


def configure(log_format: str | None, level: str, stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    if log_format is None:
        log_format = "console" if stream.isatty() else "json"
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=stream.isatty(), pad_event_to=0)
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,  # tracebacks as text, in JSON too, and scrubbed
            scrub_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
