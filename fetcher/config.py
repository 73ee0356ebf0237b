"""Where settings come from: flags, ``FETCHER_*`` env vars and a config file.

Every option is declared once in ``OPTIONS``; the flag, the env var, the
config-file key and the parser all derive from that one entry, so the three
ways of configuring fetcher cannot drift apart. Precedence, highest first:
flag, env var, KServe's environment (``fetcher.kserve``), the artifact's own
entry in the config file, the file's top-level keys, the default. Every value
is parsed from text by the same parser, whichever layer it came from, and a bad
one names that layer.

Artifacts come from ``--source``/``--dest``, from a config file, or from
``SRC DEST`` pairs given as arguments, as KServe's and Seldon's webhooks invoke a
storage initializer: one of the three.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote

from fetcher import STATE_DIR, __version__, kserve
from fetcher.errors import UsageError
from fetcher.schemes import CONTROL, check_path, check_source

EXTRACT_CHOICES = ("auto", "none", "tar", "tar.gz", "tar.bz2", "tar.xz", "tar.zst", "zip")

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
    return check_source(text)


def parse_sha256(text: str) -> str:
    digest = text.strip().lower().removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError(f"expected 64 hex digits, got {len(digest)} characters")
    return digest


def parse_filename(text: str) -> str:
    if not text or "/" in text or "\\" in text or text in (".", "..", STATE_DIR) or CONTROL.search(text):
        raise ValueError(f"{_shown(text)} is not a plain file name")
    check_path(text)
    return text


def parse_count(text: str) -> int:
    if not re.fullmatch(r"\s*[0-9]{1,18}\s*", text):
        raise ValueError(f"expected a whole number of 0 or more, got {_shown(text)}")
    return int(text)


def parse_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {_shown(text)}") from None
    if not (0 < value <= 86_400):  # also refuses inf and nan
        raise ValueError("must be more than 0 and at most a day")
    return value


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9]{1,18})\s*([kmgt]i?)?b?\s*", text.lower())
    if not match:
        raise ValueError("expected a size such as 500Gi, 20G or 1048576")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2) or ""]


def parse_part_size(text: str) -> int:
    """Bounded: each part is held in memory once, and a restart fetches up to one per connection again."""
    value = parse_size(text)
    if not 64 * 2**10 <= value <= 64 * 2**20:
        raise ValueError("must be between 64Ki and 64Mi")
    return value


def parse_platform(text: str) -> str:
    """os/arch[/variant], as docker's --platform takes it."""
    value = text.strip().lower()
    if not re.fullmatch(r"[a-z0-9_]+/[a-z0-9_]+(?:/[a-z0-9_]+)?", value):
        raise ValueError("expected os/arch or os/arch/variant, e.g. linux/amd64 or linux/arm64/v8")
    return value


def parse_oci_path(text: str) -> str:
    """An absolute directory in the image, normalised; not the image's root, which holds its whole OS."""
    parts = [p for p in text.strip().split("/") if p and p != "."]
    if not text.strip().startswith("/") or ".." in parts or not parts:
        raise ValueError("expected an absolute directory inside the image, such as /models")
    return "/" + "/".join(parts)


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
    match = re.fullmatch(r"([0-9]{1,10})(?::([0-9]{1,10}))?", text.strip())
    if not match or any(int(n) >= 2**32 - 1 for n in match.groups() if n):  # (uid_t)-1 means "unchanged"
        raise ValueError("expected numeric UID or UID:GID, such as 1000:1000")
    return int(match.group(1)), int(match.group(2)) if match.group(2) else None


def parse_header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name.strip()):
        raise ValueError("expected 'Name: value'")
    if not re.fullmatch(r"[\x20-\x7e\t]*", value.strip()):  # the value is never echoed: it may be a secret
        raise ValueError(f"the value of {name.strip()} must be printable ASCII on one line")
    return name.strip(), value.strip()


def parse_sums_location(text: str) -> str:
    """A local path, or a URL of a scheme that names one object."""
    if "://" in text:
        check_source(text)
        if text.split("://", 1)[0].lower() not in ("http", "https", "s3", "file") or text.endswith("/"):
            raise ValueError("expected a file, an http(s):// URL or s3://bucket/key of a sha256sum manifest")
        return text
    if not text:
        raise ValueError("empty path")
    check_path(text)
    return text


def parse_glob(text: str) -> str:
    if not text.strip() or CONTROL.search(text):
        raise ValueError("expected a glob such as *.safetensors")
    return text.strip()


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
    check_path(text)
    return Path(text)


def _shown(value: object) -> str:
    """A value quoted in a message, when it is short and plain; otherwise only its length.

    A value in the wrong place may still be a secret (a URL with a password given as
    --timeout): what could carry one (``:``, ``@``, ``=``, ``%``) is not repeated.
    """
    text = str(value)
    if re.fullmatch(r"[A-Za-z0-9 ._+/~-]{0,40}", text):
        return repr(text)
    return f"(a value of {len(text)} characters, not shown)"


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
    repeatable: bool = False  # a list: the flag is given again, the env var holds one per line

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
    Option(
        "source",
        parse_source,
        "the model: https://host/file, s3://bucket/key, s3://bucket/prefix/, hf://org/model[@revision] "
        "(hf://datasets/org/name too), oci://registry/repo:tag or @sha256:..., file:///path or file:///dir/",
        metavar="URL",
    ),
    Option("dest", _path, "directory the model lands in (created if missing)", metavar="DIR"),
    Option("sha256", parse_sha256, "expected SHA-256 of the fetched bytes (one file or archive)", metavar="HEX"),
    Option(
        "sha256sums",
        parse_sums_location,
        "a directory's manifest in sha256sum's format, paths relative to the directory: exactly the files it "
        "lists are fetched, each verified",
        metavar="FILE|URL|s3://...",
    ),
    Option(
        "include",
        parse_glob,
        "fetch only a directory's files matching this glob (fnmatch on the path, as huggingface_hub's "
        "allow_patterns), repeatable (env: one per line)",
        metavar="GLOB",
        repeatable=True,
    ),
    Option(
        "exclude",
        parse_glob,
        "leave out a directory's files matching this glob (wins over --include), repeatable (env: one per line)",
        metavar="GLOB",
        repeatable=True,
    ),
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
    Option(
        "file_mode",
        parse_mode,
        "mode of every published file (else an archive member's own, 0644 for a file downloaded as it is, "
        "0444 for one linked from --cache-dir)",
        metavar="OCTAL",
    ),
    Option("dir_mode", parse_mode, "mode of every published directory", metavar="OCTAL"),
    Option(
        "headers",
        parse_header,
        "extra HTTP header, repeatable (env: one per line)",
        metavar="'NAME: VALUE'",
        repeatable=True,
    ),
    Option("bearer_token_file", _path, "file holding a bearer token, e.g. a mounted Secret", metavar="PATH"),
    Option(
        "retries", parse_count, "retries of transient failures in a row (progress resets the count)", 5, metavar="N"
    ),
    Option(
        "retry_backoff",
        parse_seconds,
        "first retry delay; doubles with each failure in a row, with jitter, up to 60 s",
        1.0,
        metavar="SECONDS",
    ),
    Option(
        "concurrency",
        parse_concurrency,
        "connections for parallel ranged GETs of a large object, 1-64 (1: never split)",
        16,
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
        "seconds a transfer may stay below the low-speed limit; twice the default timeout, so that a pause is "
        "the timeout's to judge and a congested link is not cut for one slow moment",
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
        "s3_no_verify_ssl",
        parse_bool,
        "do not verify the S3 endpoint's TLS certificate (a self-signed MinIO; KServe's S3_VERIFY_SSL=0)",
        False,
        is_flag=True,
    ),
    Option(
        "registry_auth_file",
        _path,
        "docker config.json with registry credentials (a mounted kubernetes.io/dockerconfigjson Secret)",
        metavar="PATH",
    ),
    Option(
        "oci_platform",
        parse_platform,
        "the platform to take from a multi-platform OCI index; unset: linux and this node's architecture",
        metavar="OS/ARCH[/VARIANT]",
    ),
    Option(
        "oci_path",
        parse_oci_path,
        "the model's directory inside an ordinary image (a modelcar's /models): only it lands in dest, at the root",
        metavar="/DIR",
    ),
    Option(
        "oci_plain_http",
        parse_bool,
        "talk to the registry over plain HTTP (never done without this, not even for loopback)",
        False,
        is_flag=True,
    ),
    Option(
        "state_dir",
        _path,
        "keep fetcher's state (lock, marker, downloads to resume, staging) here instead of DEST/.fetcher, "
        "for servers that take every directory of dest as a model (Triton); on dest's filesystem",
        metavar="DIR",
    ),
    Option(
        "cache_dir",
        _path,
        "a cache every fetcher on the node shares (a hostPath): each file stored once by its digest, "
        "downloaded once however many pods ask at once, then hard-linked (or copied) into dest",
        metavar="DIR",
    ),
    Option(
        "cache_max_size",
        parse_size,
        "with --cache-dir: evict the least recently used files no fetcher holds past this size (unset: never)",
        metavar="SIZE",
    ),
    Option(
        "cache_verify",
        _choice("size", "full"),
        "how a cache hit is checked: size and mtime as recorded, or a full sha256 of the file",
        "size",
        metavar="size|full",
    ),
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
    artifacts: list[Values]  # each also holds "from_kserve": option name -> the KServe variable that set it
    config_path: Path | None
    kserve: kserve.Contract


class QuietParser(argparse.ArgumentParser):
    """argparse that prints no usage and raises instead of exiting, so the CLI's edge owns exit codes."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


class _Parser(QuietParser):
    """The full parser, whose messages never repeat a value.

    argparse quotes what it could not place, values included, and a value may be a
    secret (``--headers 'X-Api-Key: ...'``, one letter short of ``--header``): its
    messages name options only.
    """

    def error(self, message: str) -> NoReturn:
        # A switch given a value (``--dry-run=...``): argparse quotes the value back, in either quotes
        raise UsageError(
            re.sub(r"(ignored explicit argument) .*", r"\1 (not shown): a switch takes none", message, flags=re.S)
        )

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        # Intermixed: options may come between SRC DEST pairs and after them, as Pods' args are written;
        # not after a "--", which the intermixed parse would drop, taking what follows for options.
        given = sys.argv[1:] if args is None else list(args)
        parse = self.parse_known_args if "--" in given else self.parse_known_intermixed_args
        namespace, extras = parse(given, namespace)
        if extras:  # what argparse took for SRC DEST may be an unknown option's value
            raise UsageError(self._unrecognized([*extras, *(getattr(namespace, "pairs", None) or [])]))
        return namespace

    def _unrecognized(self, extras: list[str]) -> str:
        known = [s for action in self._actions for s in action.option_strings if s.startswith("--")]
        names = []
        for token in extras:
            if name := self._option_name(token):
                import difflib  # only a misspelled name pays for it

                close = difflib.get_close_matches(name, known, n=1)
                names.append(f"{name} (did you mean {close[0]}?)" if close else name)
        values = len(extras) - len(names)
        shown = f"{values} value{'s' if values > 1 else ''} not shown" if values else ""
        return "unrecognized arguments: " + ", ".join([*names, shown] if shown else names)

    @staticmethod
    def _option_name(token: str) -> str | None:
        """The option a token spells, without the value it may carry; None if it is no option name."""
        name = token.split("=", 1)[0]
        return name if re.fullmatch(r"--?[A-Za-z][A-Za-z0-9_-]{0,40}", name) else None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fetcher",
        allow_abbrev=False,  # --bearer-token SECRET must not be taken for --bearer-token-file, and shown as a path
        description="Fetch a model from HTTP(S), S3 or a file, verify its SHA-256, unpack it safely and publish it.",
        epilog="Every option is also an env var: --foo-bar is FETCHER_FOO_BAR (--header: FETCHER_HEADERS, one per"
        " line). Flags win over env, env over KServe's env, which wins over --config.",
    )
    parser.add_argument(
        "pairs",
        nargs="*",
        metavar="SRC DEST",
        help="a source and its dest, as --source SRC --dest DEST; repeatable, one artifact per pair (how KServe and"
        " Seldon Core invoke a storage initializer); SRC may be an absolute path",
    )
    for option in OPTIONS:
        if option.is_flag:
            parser.add_argument(option.flag, dest=option.name, action="store_const", const="true", help=option.help)
        elif option.repeatable:
            parser.add_argument(
                flag_of(option), dest=option.name, action="append", metavar=option.metavar, help=option.help
            )
        else:
            parser.add_argument(option.flag, dest=option.name, metavar=option.metavar, help=option.help_text)
    parser.add_argument("--version", action="version", version=f"fetcher {__version__}")
    return parser


def _parse(option: Option, raw: Any, where: str) -> Any:
    try:
        if option.repeatable:
            return tuple(option.parse(_scalar(item)) for item in _list_items(raw, option.name == "headers"))
        return option.parse(_scalar(raw))
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{where}: {exc}") from None


def _scalar(raw: Any) -> str:
    if isinstance(raw, (dict, list)):
        raise ValueError("expected a single value, not a list or mapping")
    if isinstance(raw, bool):  # JSON's true and false, as YAML would hand them over
        return "true" if raw else "false"
    return str(raw)


def _list_items(raw: Any, mapping: bool) -> list[Any]:
    if mapping and isinstance(raw, Mapping):
        return [f"{name}: {value}" for name, value in raw.items()]
    if isinstance(raw, str):
        return [line for line in raw.splitlines() if line.strip()]
    if isinstance(raw, list):
        return raw
    raise ValueError("expected a list of 'Name: value' or a mapping" if mapping else "expected a list")


MAX_CONFIG_BYTES = 64 * 2**20  # ~700k artifacts; past it the file is not a config, and memory is bounded
MAX_DEPTH = 16  # a config nests 4 deep; a bound keeps a hostile file from the parsers' recursion
_YAML = "tag:yaml.org,2002:"
# Explicit tags that only say how to read a scalar: the text goes to our parsers all the same,
# so "retries: !!int abc" is the same mistake as "retries: abc" and is reported the same way.
_TEXT_TAGS = frozenset({"!", *(_YAML + t for t in ("str", "int", "float", "bool", "timestamp", "binary"))})
_NULL = re.compile(r"~|null|Null|NULL|")  # the one implicit YAML type kept: an unset value


class _Refused(Exception):
    """Part of a config file that fetcher does not read, at a line."""

    @classmethod
    def at(cls, line: int, reason: str) -> _Refused:
        return cls(f"line {line}: {reason}")


def load_config_file(path: Path) -> tuple[Values, list[Values]]:
    """Read a ConfigMap-style file into top-level defaults and artifact entries."""
    where = f"--config {path}"
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise UsageError(f"{where}: larger than {MAX_CONFIG_BYTES // 2**20} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UsageError(f"{where}: not UTF-8 text (line {line})") from None
    try:
        document = _read_document(text) if text.strip() else {}
    except _Refused as exc:
        raise UsageError(f"{where}: {exc}") from None
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


def _read_document(text: str) -> Any:
    """JSON through json (fast, numbers kept as written); anything else, or JSON that json refuses, as YAML."""
    if re.match(r"\s*[\[{]", text):  # without copying a file of up to 64 MiB to look at one character
        try:
            return json.loads(text, parse_int=str, parse_float=str, parse_constant=str)
        except (ValueError, RecursionError):
            pass  # YAML's flow style, or a mistake the YAML reader will place by line and column
    return _read_yaml(text)


def _shown_tag(tag: object) -> str:
    return str(tag).replace(_YAML, "!!")[:40]


def _read_yaml(text: str) -> Any:
    """One YAML document as dicts, lists and text, built from the parser's events.

    libyaml's parser where present (the pure-Python one is ~50x slower), and no
    composer or constructor: those recurse with the nesting and expand aliases
    without bound, and construct typed values our parsers would then see as text
    that was never written. Anchors and aliases are refused: a config file does not
    need them, and a few hundred bytes of them expand to gigabytes.
    """
    import yaml  # only a run with a YAML --config pays for it

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    stack: list[tuple[dict[Any, Any] | list[Any], list[Any]]] = []  # (container, [pending key]) per level
    root: list[Any] = []
    documents = 0

    def place(value: Any, line: int) -> None:
        if not stack:
            root.append(value)
            return
        container, pending = stack[-1]
        if isinstance(container, list):
            container.append(value)
        elif pending:
            container[pending.pop()] = value
        else:  # a key: a container in its place was refused at its start event
            pending.append(value)

    try:
        for event in yaml.parse(text, Loader=loader):
            line = event.start_mark.line + 1 if event.start_mark else 0
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise _Refused.at(line, "anchors and aliases (& and *) are not allowed in a config file")
            tag = getattr(event, "tag", None)
            if isinstance(event, yaml.ScalarEvent):
                if tag == _YAML + "null" or (tag is None and event.implicit[0] and _NULL.fullmatch(event.value)):
                    place(None, line)
                elif tag is None or tag in _TEXT_TAGS:
                    place(event.value, line)
                else:
                    raise _Refused.at(line, f"the tag {_shown_tag(tag)} is not supported")
            elif isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                mapping = isinstance(event, yaml.MappingStartEvent)
                if tag not in (None, "!", _YAML + ("map" if mapping else "seq")):
                    raise _Refused.at(line, f"the tag {_shown_tag(tag)} is not supported")
                if len(stack) >= MAX_DEPTH:
                    raise _Refused.at(line, f"nested more than {MAX_DEPTH} levels deep")
                container: dict[Any, Any] | list[Any] = {} if mapping else []
                if stack and isinstance(stack[-1][0], dict) and not stack[-1][1]:
                    raise _Refused.at(line, "a key must be a plain value, not a list or mapping")
                stack.append((container, []))
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                place(stack.pop()[0], line)
            elif isinstance(event, yaml.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    raise _Refused.at(line, "more than one YAML document (---)")
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise _Refused(f"not valid YAML or JSON{at}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise _Refused(f"not valid YAML or JSON: {exc}") from None
    return root[0] if root else None


def _parse_mapping(mapping: Mapping[str, Any], where: str, *, allow_run: bool) -> Values:
    values: Values = {}
    for key, raw in mapping.items():
        option = BY_NAME.get(str(key).replace("-", "_"))
        if option is None or option.name == "config" or (not option.per_artifact and not allow_run):
            raise UsageError(f"{where}: unknown key {_shown(key)}")
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


def unknown_env(environ: Mapping[str, str]) -> list[str]:
    """``FETCHER_*`` names that no option reads, each with the likeliest meant one.

    A misspelt FETCHER_SHA or FETCHER_HEADER would otherwise be ignored without a
    word, and the model fetched unverified or without its credentials.
    """
    known = [option.env for option in OPTIONS]
    unknown = []
    for name in sorted(environ):
        if name.startswith("FETCHER_") and name not in known:
            import difflib  # only a misspelled name pays for it

            close = difflib.get_close_matches(name, known, n=1)
            unknown.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return unknown


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
    contract = kserve.read(environ)
    from_kserve = {name: _parse(BY_NAME[name], raw, contract.origins[name]) for name, raw in contract.values.items()}
    config_path: Path | None = overrides.get("config")
    top: Values = {}
    entries: list[Values] = [{}]
    if pairs := getattr(namespace, "pairs", None):
        entries = _pairs(pairs, overrides)
        many = f"{len(entries)} SRC DEST pairs"
    elif config_path is not None:
        top, entries = load_config_file(config_path)
        many = f"a --config listing {len(entries)} artifacts"
    if len(entries) > 1:
        for name in _IDENTIFYING:
            if name in overrides:
                option = BY_NAME[name]
                raise UsageError(f"{option.flag} / {option.env} cannot be combined with {many}")
            if name in from_kserve:  # KServe's initializer refuses it too (PR #6051)
                raise UsageError(f"{contract.origins[name]} pins one artifact: it cannot be combined with {many}")
    defaults = {option.name: option.default for option in OPTIONS}
    run = {name: value for name, value in (defaults | top | overrides).items() if not BY_NAME[name].per_artifact}
    artifacts = [_artifact_values(defaults | top | entry, from_kserve, overrides, contract) for entry in entries]
    return RunConfig(run=run, artifacts=artifacts, config_path=config_path, kserve=contract)


def _pairs(given: list[str], overrides: Values) -> list[Values]:
    """``SRC DEST [SRC DEST ...]``, each pair one artifact as ``--source SRC --dest DEST``.

    KServe's initializer takes its arguments so (python/storage-initializer/scripts/initializer-entrypoint:
    ``sys.argv[1::2]``, ``sys.argv[2::2]``; an odd count is a usage error there too). A bare absolute
    path is a file:// source: Seldon Core v1 passes a pvc:// model as the path it mounts it at,
    ``/mnt/pvc/<path>`` (operator/controllers/model_initializer_injector.go). Values are never
    repeated in a message: a URL may hold a password.
    """
    shown = f"{len(given)} value{'s' if len(given) > 1 else ''}, not shown"
    if len(given) % 2:
        raise UsageError(f"expected SRC DEST pairs, got an odd number of arguments ({shown})")
    for name in ("config", "source", "dest"):
        if name in overrides:
            option = BY_NAME[name]
            raise UsageError(f"{option.flag} / {option.env} cannot be combined with SRC DEST arguments ({shown})")
    entries = []
    for i in range(0, len(given), 2):
        source = given[i]
        if source.startswith("/"):
            source = "file://" + quote(source, safe="/", errors="surrogateescape")
        entries.append(
            {
                "source": _parse(BY_NAME["source"], source, f"SRC (argument {i + 1})"),
                "dest": _parse(BY_NAME["dest"], given[i + 1], f"DEST (argument {i + 2})"),
            }
        )
    return entries


def _artifact_values(base: Values, from_kserve: Values, overrides: Values, contract: kserve.Contract) -> Values:
    """One artifact's values: KServe's layer between the config file's and FETCHER_*'s, with the
    headers KServe sends to this source's host; ``from_kserve`` names what that layer decided."""
    layer, origins = dict(from_kserve), dict(contract.origins)
    source = overrides.get("source", base.get("source"))
    if (found := contract.headers_for(source)) is not None:
        variable, headers = found
        layer["headers"], origins["headers"] = _parse(BY_NAME["headers"], headers, variable), variable
    values = {name: value for name, value in (base | layer | overrides).items() if BY_NAME[name].per_artifact}
    values["from_kserve"] = {name: origins[name] for name in layer if name not in overrides}
    return values
