"""The edge: arguments in, exit code out.

This is the only place that prints, exits, or knows exit-code numbers. Every
failure becomes one line on the log and in the termination log (so
``kubectl describe pod`` shows it), never a traceback, unless it is a bug.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import structlog

from fetcher import __version__, kserve, logs, memory
from fetcher.config import BY_NAME, QuietParser, Values, build_parser, resolve, unknown_env
from fetcher.errors import (
    ArchiveError,
    FetcherError,
    FetchError,
    IntegrityError,
    LocalFilesystemError,
    UsageError,
)
from fetcher.plan import Artifact, build_plan, read_bearer_token
from fetcher.schemes import scheme_of

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_CODES: dict[type[FetcherError], int] = {
    UsageError: 2,
    FetchError: 3,
    IntegrityError: 4,
    ArchiveError: 5,
    LocalFilesystemError: 6,
}
DEFAULT_TERMINATION_LOG = Path("/dev/termination-log")

log = structlog.get_logger("fetcher")


def exit_code(error: BaseException) -> int:
    for cls in type(error).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return EXIT_INTERNAL


class Terminated(BaseException):
    """SIGTERM, as the kubelet sends it: unwind like Ctrl-C, so staging is cleaned and the reason recorded."""


def _raise_terminated(_signum: int, _frame: object) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    memory.tune()  # before any thread starts
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    termination_log: Path | None = None
    plan: list[Artifact] = []
    results: list[Any] = []  # fetch.Result, one per artifact done: fetch is imported only to fetch
    logs.configure(None, "info")  # so that even a failure in reading the environment is logged
    try:
        # Until the options are parsed, errors are logged in the format the env asks for;
        # until the configuration is resolved, as the flags or env ask, if they ask well.
        early = _early_flags(parser, argv)
        logs.configure(_early(early, environ, "log_format"), "info")
        termination_log = _early(early, environ, "termination_log")
        namespace = parser.parse_args(list(argv))
        config = resolve(namespace, environ)
        termination_log = config.run["termination_log"]
        logs.configure(config.run["log_format"], config.run["log_level"])
        for name in unknown_env(environ):
            log.warning("unknown env var ignored", name=name)
        _take_kserve(config.kserve, config.artifacts)
        plan = build_plan(config)
        if config.run["dry_run"]:
            shown = []
            for artifact in plan:  # a real run reads it only when it has something to download
                if artifact.bearer_token_file is not None and scheme_of(artifact.source).bearer_token:
                    read_bearer_token(artifact.bearer_token_file)
                described = artifact.describe()
                if artifact.is_directory or scheme_of(artifact.source).names == ("file",):
                    # resolved: each file, its size and its checksum's origin (an S3 key that may be a
                    # prefix is not: a dry run asks nothing of the network that a directory does not need)
                    from fetcher.fetch import preview

                    described |= preview(artifact)
                shown.append(described)
            print(json.dumps({"fetcher": __version__, "artifacts": shown}, indent=2))
            return EXIT_OK
        from fetcher.fetch import fetch

        started = time.monotonic()
        log.info(
            "start",
            fetcher=__version__,
            artifacts=len(plan),
            config=str(config.config_path) if config.config_path else None,
        )
        dests = {a.index: a.dest.resolve() for a in plan}  # one dest may be spelled two ways
        keys: dict[Path, Counter[str]] = {}  # grouped once: a comparison per pair took 30 s for 1,600 artifacts
        for a in plan:
            keys.setdefault(dests[a.index], Counter())[a.key] += 1
        for artifact in plan:
            log.info("plan", index=artifact.index, **artifact.describe())
            same = keys[dests[artifact.index]]
            siblings = frozenset(same) if same[artifact.key] > 1 else frozenset(same) - {artifact.key}
            results.append(fetch(artifact, siblings))
        total = sum(r.size for r in results if not r.skipped)
        seconds = time.monotonic() - started
        log.info(
            "done",
            artifacts=len(results),
            fetched=sum(not r.skipped for r in results),
            already_present=sum(r.skipped for r in results),
            bytes=total,
            seconds=round(seconds, 2),
            mb_per_s=round(total / max(seconds, 1e-9) / 1e6, 1),
        )
        return EXIT_OK
    except FetcherError as error:
        code = exit_code(error)
        message = str(error)  # made safe on its way out, to the log and to the termination log
        log.error("failed", error=message, kind=type(error).__name__, exit_code=code)
        _write_termination_log(termination_log, message)
        return code
    except (KeyboardInterrupt, Terminated) as stop:
        name, code = ("SIGTERM", 143) if isinstance(stop, Terminated) else ("SIGINT", 130)
        message = f"stopped by {name} before the model was published"
        if len(plan) > 1 and len(results) < len(plan):  # which one, and that those before it stand
            message = (
                f"stopped by {name} before {plan[len(results)].display_source} was published "
                f"({len(results)} of {len(plan)} artifacts done)"
            )
        log.error("failed", error=message, kind="Interrupted", exit_code=code)
        _write_termination_log(termination_log, message)
        return code
    except Exception as error:  # a bug: keep the traceback, but still one clear last line
        message = f"internal error: {type(error).__name__}: {error}"
        log.exception("internal error", error=message, exit_code=EXIT_INTERNAL)
        _write_termination_log(termination_log, message)
        return EXIT_INTERNAL


def _take_kserve(contract: kserve.Contract, artifacts: list[Values]) -> None:
    """KServe's environment: what boto3 reads set in this process's, and said, by name only
    (with the ``<host>-headers`` variables that some artifact's source took)."""
    contract.export(os.environ)
    hosts = sorted({a["from_kserve"]["headers"] for a in artifacts if "headers" in a.get("from_kserve", {})})
    if names := [*contract.honoured, *hosts]:
        log.info(  # boto3's and huggingface_hub's names alone are no sign of KServe
            "KServe settings read" if contract.kserve_own else "environment settings read", names=names
        )
    if contract.unsupported:
        log.warning("KServe settings not supported, ignored", names=list(contract.unsupported))
    if contract.missing_ca is not None:  # as KServe's initializer, which goes on with the default trust store
        log.warning("CA bundle not found: trusting the default CAs", path=contract.missing_ca)


def _early_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace | None:
    """The flags that say how to report, read even beside ones that cannot be read.

    When argparse gives up on the whole command line (an ambiguous or unfinished
    option), a parser that knows only the reporting flags still finds them.
    """
    with contextlib.suppress(UsageError):
        return parser.parse_known_args(list(argv))[0]
    reporting = QuietParser(add_help=False, allow_abbrev=False)
    for name in ("log_format", "termination_log"):  # nargs="?": one of them left without its value loses only it
        reporting.add_argument(BY_NAME[name].flag, dest=name, nargs="?")
    with contextlib.suppress(UsageError):
        return reporting.parse_known_args(list(argv))[0]
    return None


def _early(namespace: argparse.Namespace | None, environ: Mapping[str, str], name: str) -> Any:
    """One run-wide setting from the flag or env var alone, for reporting an error in the rest."""
    text = getattr(namespace, name, None) or environ.get(BY_NAME[name].env)
    try:
        return BY_NAME[name].parse(text) if text else None
    except ValueError:
        return None


def run() -> NoReturn:
    """The process's entry point: ``main``, then exit without a last full collection.

    At exit the interpreter collects every object the modules made, ~20 ms of a raw
    fetch's tail with httpx and structlog loaded; frozen, they are skipped. Nothing
    is left to flush: published files are synced and logs are written by then.
    """
    code = main()
    gc.freeze()
    raise SystemExit(code)


def _write_termination_log(path: Path | None, message: str) -> None:
    """Best effort: the reason must not be lost, but failing to record it is no new error.

    The message is one line of UTF-8 whatever it names (the kubelet reads at most 4096 bytes).
    """
    if path is None:
        if not (DEFAULT_TERMINATION_LOG.exists() and os.access(DEFAULT_TERMINATION_LOG, os.W_OK)):
            return
        path = DEFAULT_TERMINATION_LOG
    data = logs.safe_message(message).encode("utf-8")[:4000]  # safe_message leaves nothing unencodable
    with contextlib.suppress(OSError, ValueError):  # ValueError: a path no file can have
        path.write_bytes(data.decode("utf-8", "ignore").encode() + b"\n")
