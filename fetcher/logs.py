"""structlog set-up: key=value events on a console, JSON lines elsewhere.

Every event passes through ``scrub_secrets`` last before rendering, so a
credential that slipped into a message is masked rather than printed.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from fetcher.redact import scrub

_FIRST = ("timestamp", "level", "event")


def scrub_secrets(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Mask credentials in every string value; put time, level and event first for readers of JSON."""
    ordered = {key: event[key] for key in _FIRST if key in event} | dict(event)
    return {key: scrub(value) if isinstance(value, str) else value for key, value in ordered.items()}


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
