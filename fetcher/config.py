"""Where settings come from: flags, ``FETCHER_*`` env vars and a config file.

Every option is declared once in ``OPTIONS``; the flag, the env var, the
config-file key and the parser all derive from that one entry, so the three
ways of configuring fetcher cannot drift apart. Precedence, highest first:
flag, env var, the artifact's own entry in the config file, the file's
top-level keys, the default. Every value is parsed from text by the same
parser, whichever layer it came from, and a bad one names that layer.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

from fetcher import __version__
from fetcher.errors import UsageError

EXTRACT_CHOICES = ("auto", "none", "tar", "tar.gz", "tar.bz2", "tar.xz", "tar.zst", "zip")
SCHEMES = ("http", "https", "s3", "file")

_SIZE_UNITS = {
    "": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


# --- parsers: text in, typed value out, ValueError with a short reason -------


def parse_source(text: str) -> str:
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme not in SCHEMES:
        raise ValueError(
            f"unsupported URL scheme {scheme or '(none)'!r}; use http://, https://, s3://bucket/key or file:///path"
        )
    if scheme == "s3" and not re.match(r"(?i)^s3://[^/]+/.+", text):
        raise ValueError("an S3 source looks like s3://bucket/key")
    if scheme == "file" and not text[len("file://") :].startswith("/"):
        raise ValueError("a file source needs an absolute path: file:///abs/path")
    if scheme in ("http", "https"):
        try:
            parts = urlsplit(text)
            _ = parts.port  # raises on a malformed port
        except ValueError as exc:
            raise ValueError(f"not a valid URL ({exc})") from None
        if not parts.hostname:
            raise ValueError("the URL has no host")
    return text


def parse_sha256(text: str) -> str:
    digest = text.strip().lower().removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError(f"expected 64 hex digits, got {len(digest)} characters")
    return digest


def parse_filename(text: str) -> str:
    if not text or "/" in text or "\\" in text or text in (".", "..", ".fetcher") or "\0" in text:
        raise ValueError(f"{text!r} is not a plain file name")
    return text


def parse_count(text: str) -> int:
    if not text.strip().isdigit():
        raise ValueError(f"expected a whole number of 0 or more, got {text!r}")
    return int(text)


def parse_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {text!r}") from None
    if not (0 < value <= 86_400):  # also refuses inf and nan
        raise ValueError("must be more than 0 and at most a day")
    return value


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]i?)?b?\s*", text.lower())
    if not match:
        raise ValueError("expected a size such as 500Gi, 20G or 1048576")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2) or ""]


def parse_part_size(text: str) -> int:
    """Bounded: each part is held in memory once, and a restart fetches up to one per connection again."""
    value = parse_size(text)
    if not 64 * 2**10 <= value <= 64 * 2**20:
        raise ValueError("must be between 64Ki and 64Mi")
    return value


def parse_concurrency(text: str) -> int:
    value = parse_count(text)
    if not 1 <= value <= 64:
        raise ValueError("must be between 1 and 64")
    return value


def parse_mode(text: str) -> int:
    if not re.fullmatch(r"0?o?[0-7]{1,4}", text.strip().lower()):
        raise ValueError("expected an octal mode such as 0644")
    value = int(text.strip().lower().lstrip("0o") or "0", 8)
    if value > 0o777:
        raise ValueError("setuid, setgid and sticky bits are not allowed")
    return value


def parse_owner(text: str) -> tuple[int, int | None]:
    match = re.fullmatch(r"(\d+)(?::(\d+))?", text.strip())
    if not match:
        raise ValueError("expected numeric UID or UID:GID, such as 1000:1000")
    return int(match.group(1)), int(match.group(2)) if match.group(2) else None


def parse_header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name.strip()):
        raise ValueError("expected 'Name: value'")
    if not re.fullmatch(r"[\x20-\x7e\t]*", value.strip()):  # the value is never echoed: it may be a secret
        raise ValueError(f"the value of {name.strip()} must be printable ASCII on one line")
    return name.strip(), value.strip()


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if (value := text.strip().lower()) not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return parse


def _path(text: str) -> Path:
    if not text:
        raise ValueError("empty path")
    return Path(text)


@dataclass(frozen=True)
class Option:
    """One setting, reachable as a flag, an env var and a config key."""

    name: str
    parse: Callable[[str], Any]
    help: str
    default: Any = None
    per_artifact: bool = True
    is_flag: bool = False  # a switch: --dry-run, not --dry-run VALUE
    metavar: str | None = None
    shown_default: str | None = None  # the default as a person writes it, where str() would not

    @property
    def help_text(self) -> str:
        shown = self.shown_default
        if shown is None and self.default is not None and self.default is not False:
            shown = f"{self.default:g}" if isinstance(self.default, float) else str(self.default)
        return f"{self.help} (default: {shown})" if shown else self.help

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "FETCHER_" + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option("source", parse_source, "http(s)://, s3://bucket/key or file:///path of the model", metavar="URL"),
    Option("dest", _path, "directory the model lands in (created if missing)", metavar="DIR"),
    Option("sha256", parse_sha256, "expected SHA-256 of the fetched bytes", metavar="HEX"),
    Option(
        "extract",
        _choice(*EXTRACT_CHOICES),
        "archive format; auto decides from the first bytes",
        "auto",
        metavar="|".join(EXTRACT_CHOICES),
    ),
    Option(
        "filename",
        parse_filename,
        "name of a plain (non-archive) file in dest; default: last URL segment",
        metavar="NAME",
    ),
    Option(
        "strip_components", parse_count, "drop this many leading path components from archive members", 0, metavar="N"
    ),
    Option("owner", parse_owner, "chown everything published", metavar="UID[:GID]"),
    Option("file_mode", parse_mode, "mode of every published file", metavar="OCTAL"),
    Option("dir_mode", parse_mode, "mode of every published directory", metavar="OCTAL"),
    Option("headers", parse_header, "extra HTTP header, repeatable (env: one per line)", metavar="'NAME: VALUE'"),
    Option("bearer_token_file", _path, "file holding a bearer token, e.g. a mounted Secret", metavar="PATH"),
    Option("retries", parse_count, "retries of transient failures (per artifact, reset by progress)", 5, metavar="N"),
    Option(
        "retry_backoff",
        parse_seconds,
        "first retry delay; doubles each retry, with jitter, up to 60 s",
        1.0,
        metavar="SECONDS",
    ),
    Option(
        "concurrency",
        parse_concurrency,
        "connections for parallel ranged GETs of a large object, 1-64 (1: never split)",
        8,
        metavar="N",
    ),
    Option(
        "part_size",
        parse_part_size,
        "size of each ranged part, 64Ki-64Mi; also the most a restart fetches twice per connection",
        8 * 2**20,
        metavar="SIZE",
        shown_default="8Mi",
    ),
    Option(
        "split_below",
        parse_size,
        "split into parallel ranges when the first part arrives slower than this many bytes/s (0: never; 100G: always)",
        150 * 10**6,
        metavar="RATE",
        shown_default="150M",
    ),
    Option("timeout", parse_seconds, "connect and read timeout", 30.0, metavar="SECONDS"),
    Option(
        "low_speed_limit",
        parse_size,
        "a transfer slower than this many bytes/s over the low-speed time is cut and retried, resuming "
        "(0: never): a server trickling bytes, each inside the timeout, would hold the pod in Init for days "
        "instead of failing with a reason; below 1 KiB/s no model arrives in useful time",
        1024,
        metavar="RATE",
        shown_default="1Ki",
    ),
    Option(
        "low_speed_time",
        parse_seconds,
        "seconds a transfer may stay below the low-speed limit; twice the timeout, so that a pause is the "
        "timeout's to judge and a congested link is not cut for one slow moment",
        60.0,
        metavar="SECONDS",
    ),
    Option(
        "max_unpacked_size",
        parse_size,
        "refuse archives that unpack to more than this",
        1024**4,
        metavar="SIZE",
        shown_default="1Ti",
    ),
    Option("max_members", parse_count, "refuse archives with more members than this", 1_000_000, metavar="N"),
    Option("progress_interval", parse_seconds, "seconds between progress log lines", 5.0, metavar="SECONDS"),
    Option("s3_anonymous", parse_bool, "unsigned S3 requests, for public buckets", False, is_flag=True),
    Option(
        "s3_addressing_style",
        _choice("auto", "path", "virtual"),
        "S3 addressing style",
        "auto",
        metavar="auto|path|virtual",
    ),
    Option(
        "config",
        _path,
        "YAML or JSON file (e.g. a mounted ConfigMap) listing artifacts",
        per_artifact=False,
        metavar="PATH",
    ),
    Option(
        "termination_log",
        _path,
        "where the one-line failure reason goes (default /dev/termination-log if writable)",
        per_artifact=False,
        metavar="PATH",
    ),
    Option(
        "log_format",
        _choice("json", "console"),
        "default: console on a TTY, JSON lines otherwise",
        per_artifact=False,
        metavar="json|console",
    ),
    Option(
        "log_level",
        _choice("debug", "info", "warning", "error"),
        "log level",
        "info",
        per_artifact=False,
        metavar="debug|info|warning|error",
    ),
    Option(
        "dry_run", parse_bool, "validate and print the plan; fetch nothing", False, per_artifact=False, is_flag=True
    ),
)
BY_NAME = {option.name: option for option in OPTIONS}
# The repeatable header flag is spelled --header, its env var FETCHER_HEADERS.
_FLAG_OVERRIDES = {"headers": "--header"}


def flag_of(option: Option) -> str:
    return _FLAG_OVERRIDES.get(option.name, option.flag)


Values = dict[str, Any]


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs: run-wide settings and one value set per artifact."""

    run: Values
    artifacts: list[Values]
    config_path: Path | None


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so the CLI's edge owns exit codes."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fetcher",
        description="Fetch a model from HTTP(S), S3 or a file, verify its SHA-256, unpack it safely and publish it.",
        epilog="Every option is also an env var: --foo-bar is FETCHER_FOO_BAR (--header: FETCHER_HEADERS, one per"
        " line). Flags win over env, env over --config.",
    )
    for option in OPTIONS:
        if option.is_flag:
            parser.add_argument(option.flag, dest=option.name, action="store_const", const="true", help=option.help)
        elif option.name == "headers":
            parser.add_argument(
                flag_of(option), dest=option.name, action="append", metavar=option.metavar, help=option.help
            )
        else:
            parser.add_argument(option.flag, dest=option.name, metavar=option.metavar, help=option.help_text)
    parser.add_argument("--version", action="version", version=f"fetcher {__version__}")
    return parser


def _parse(option: Option, raw: Any, where: str) -> Any:
    try:
        if option.name == "headers":
            return tuple(parse_header(_scalar(item)) for item in _header_items(raw))
        return option.parse(_scalar(raw))
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{where}: {exc}") from None


def _scalar(raw: Any) -> str:
    if isinstance(raw, (dict, list)):
        raise ValueError("expected a single value, not a list or mapping")
    return str(raw)


def _header_items(raw: Any) -> list[Any]:
    if isinstance(raw, Mapping):
        return [f"{name}: {value}" for name, value in raw.items()]
    if isinstance(raw, str):
        return [line for line in raw.splitlines() if line.strip()]
    if isinstance(raw, list):
        return raw
    raise ValueError("expected a list of 'Name: value' or a mapping")


def _text_loader() -> type[Any]:
    """YAML without implicit typing: every scalar stays text for our parsers.

    This keeps ``file_mode: 0644`` octal and ``sha256: 1e5...`` a string, where
    stock YAML would turn them into numbers.
    """
    import yaml

    class TextLoader(yaml.SafeLoader):
        pass

    TextLoader.yaml_implicit_resolvers = {
        key: [(tag, regexp) for tag, regexp in resolvers if tag == "tag:yaml.org,2002:null"]
        for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    return TextLoader


def load_config_file(path: Path) -> tuple[Values, list[Values]]:
    """Read a ConfigMap-style file into top-level defaults and artifact entries."""
    where = f"--config {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{where}: not UTF-8 text") from None
    import yaml  # only a run with --config pays for it

    try:
        document = yaml.load(text, Loader=_text_loader()) if text.strip() else {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"{where}: not valid YAML or JSON{line}") from None
    if not isinstance(document, dict):
        raise UsageError(f"{where}: expected a mapping with an 'artifacts' list")
    top = dict(document)
    entries = top.pop("artifacts", None)
    if entries is None:
        entries = [{}]
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise UsageError(f"{where}: 'artifacts' must be a non-empty list of mappings")
    parsed_top = _parse_mapping(top, where, allow_run=True)
    parsed = [_parse_mapping(entry, f"{where}: artifacts[{i}]", allow_run=False) for i, entry in enumerate(entries)]
    return parsed_top, parsed


def _parse_mapping(mapping: Mapping[str, Any], where: str, *, allow_run: bool) -> Values:
    values: Values = {}
    for key, raw in mapping.items():
        option = BY_NAME.get(str(key).replace("-", "_"))
        if option is None or option.name == "config" or (not option.per_artifact and not allow_run):
            raise UsageError(f"{where}: unknown key {key!r}")
        if raw is None:
            continue
        label = f"{where}.{key}" if where.endswith("]") else f"{where}: {key}"
        values[option.name] = _parse(option, raw, label)
    return values


def _from_env(environ: Mapping[str, str]) -> Values:
    values: Values = {}
    for option in OPTIONS:
        raw = environ.get(option.env)
        if raw is not None and raw != "":
            values[option.name] = _parse(option, raw, option.env)
    return values


def _from_flags(namespace: argparse.Namespace) -> Values:
    values: Values = {}
    for option in OPTIONS:
        raw = getattr(namespace, option.name)
        if raw is not None:
            values[option.name] = _parse(option, raw, flag_of(option))
    return values


# Settings that name one artifact: from flags or env they cannot apply to many.
_IDENTIFYING = ("source", "sha256", "filename")


def resolve(namespace: argparse.Namespace, environ: Mapping[str, str]) -> RunConfig:
    """Merge the layers into one value set per artifact."""
    overrides = _from_env(environ) | _from_flags(namespace)
    config_path: Path | None = overrides.get("config")
    top: Values = {}
    entries: list[Values] = [{}]
    if config_path is not None:
        top, entries = load_config_file(config_path)
        clashing = [name for name in _IDENTIFYING if name in overrides]
        if len(entries) > 1 and clashing:
            option = BY_NAME[clashing[0]]
            raise UsageError(
                f"{option.flag} / {option.env} cannot be combined with a --config listing {len(entries)} artifacts"
            )
    defaults = {option.name: option.default for option in OPTIONS}
    run = {name: value for name, value in (defaults | top | overrides).items() if not BY_NAME[name].per_artifact}
    artifacts = [
        {name: value for name, value in (defaults | top | entry | overrides).items() if BY_NAME[name].per_artifact}
        for entry in entries
    ]
    return RunConfig(run=run, artifacts=artifacts, config_path=config_path)
