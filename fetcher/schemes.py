"""The source schemes fetcher knows, in one table.

Config checks a source with its scheme's ``check``, the plan asks whether it
names a directory, ``sources.open_source`` loads its class (only then: an HTTP
fetch never imports boto3), and the CLI's help and errors list the examples.
A new scheme is one row here and one module in ``fetcher/sources``.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")
_S3_BUCKET = re.compile(r"[A-Za-z0-9._-]{1,255}")  # botocore's own bound, legacy names included
_HF = re.compile(
    r"hf://(?:(?P<kind>models|datasets)/)?(?P<repo>[A-Za-z0-9][\w.-]{0,95}(?:/[A-Za-z0-9][\w.-]{0,95})?)"
    r"(?:[@:](?P<revision>[\w./-]{1,255}))?/?"
)

# oci://REGISTRY/REPO[:TAG][@sha256:HEX]: the registry is a host with an optional port; the repo,
# lower-case path components as the distribution spec allows them.
_OCI = re.compile(
    r"oci://(?P<registry>[A-Za-z0-9.-]+(?::[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](?::[0-9]{1,5})?)/"
    r"(?P<repo>[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?"
)


@dataclass(frozen=True)
class OciReference:
    """What an oci:// source names: a repository of a registry, at a tag or a digest (the tag then only shown)."""

    registry: str  # as given: host[:port]
    repository: str
    tag: str | None
    digest: str | None

    @property
    def reference(self) -> str:
        """What to ask the registry for: the digest when there is one, else the tag (``latest`` if none)."""
        return self.digest or self.tag or "latest"


@dataclass(frozen=True)
class Scheme:
    """One kind of source."""

    names: tuple[str, ...]
    example: str
    check: Callable[[str, SplitResult], None]  # raises ValueError with a short reason
    loader: str  # "module:Class", imported when a source of this scheme is opened
    is_directory: Callable[[str], bool | None]  # True/False from the text alone; None: the source decides
    bearer_token: bool = False  # reads --bearer-token-file

    def load(self) -> Any:
        module, _, name = self.loader.partition(":")
        return getattr(importlib.import_module(module), name)


def check_path(text: str) -> None:
    """A name the OS can take: no NUL, and surrogates only as os.fsdecode makes them from raw bytes."""
    if "\0" in text:
        raise ValueError("the path holds a NUL character")
    try:
        os.fsencode(text)
    except UnicodeError:
        raise ValueError("the path holds characters that are no file name's (a lone surrogate)") from None


def _check_utf8(text: str) -> None:
    if _LONE_SURROGATE.search(text):  # httpx and botocore send UTF-8, which these are not
        raise ValueError("the URL holds characters that are not valid UTF-8")


def _check_file(text: str, parts: SplitResult) -> None:
    if parts.netloc or not parts.path.startswith("/"):
        raise ValueError("a file source needs an absolute path: file:///abs/path")
    check_path(unquote(parts.path))


def _check_s3(text: str, parts: SplitResult) -> None:
    _check_utf8(text)
    bucket, slash, key = text[len("s3://") :].partition("/")
    if not slash or not bucket or not key:
        raise ValueError("an S3 source looks like s3://bucket/key or s3://bucket/prefix/")
    if not _S3_BUCKET.fullmatch(bucket):
        raise ValueError("the bucket name may hold only ASCII letters, digits, '.', '-' and '_'")
    if len(key.encode()) > 1024:
        raise ValueError("the S3 key is longer than 1024 bytes")


def _check_hf(text: str, parts: SplitResult) -> None:
    if not _HF.fullmatch(text):
        raise ValueError(
            "a Hugging Face source looks like hf://org/model, hf://org/model@REVISION or hf://datasets/org/name"
        )


def parse_hf(text: str) -> tuple[str, str, str]:
    """(repo type, repo id, revision) of a checked hf:// source."""
    match = _HF.fullmatch(text)
    assert match is not None, "checked by config"
    return ("dataset" if match["kind"] == "datasets" else "model"), match["repo"], match["revision"] or "main"


def _check_oci(text: str, parts: SplitResult) -> None:
    if not _OCI.fullmatch(text):
        raise ValueError(
            "an OCI source looks like oci://registry/repo:tag, oci://registry/repo@sha256:HEX or both "
            "(repository names in lower case)"
        )


def parse_oci(text: str) -> OciReference:
    """The parts of a checked oci:// source. Docker Hub's short names get their ``library/``, as docker gives them."""
    match = _OCI.fullmatch(text)
    assert match is not None, "checked by config"
    registry, repo = match["registry"], match["repo"]
    if registry in ("docker.io", "index.docker.io", "registry-1.docker.io") and "/" not in repo:
        repo = f"library/{repo}"
    return OciReference(registry, repo, match["tag"], match["digest"])


def _check_http(text: str, parts: SplitResult) -> None:
    """The URL as httpx will read it: a run must not be the first to find out that it cannot.

    The host is checked by httpx itself (IDNA, address forms), once per host: a config
    of 87k artifacts has a handful. A plain ASCII name is one httpx always takes (it only
    lower-cases and quotes it), and is not handed to it: importing httpx costs ~35 ms,
    which a restart with the model in place (no download, so no httpx) would otherwise pay.
    """
    _check_utf8(text)
    if not parts.hostname:
        raise ValueError("the URL has no host")
    if len(text) > 65_536:  # httpx's own bound
        raise ValueError("not a valid URL (longer than 64 KiB)")
    host = parts.netloc.rpartition("@")[2]
    name = parts.hostname or ""
    if _PLAIN_HOST.fullmatch(host) and "xn--" not in name and not _IPV4_STYLE.fullmatch(name):
        return
    if not _httpx_accepts_host(parts.scheme, host):
        what = "an internationalized host name that IDNA refuses" if not parts.netloc.isascii() else "a bad host"
        raise ValueError(f"not a valid URL ({what})")


_PLAIN_HOST = re.compile(r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.?(?::[0-9]+)?")
_IPV4_STYLE = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+")  # httpx validates these as addresses


@functools.lru_cache(maxsize=256)
def _httpx_accepts_host(scheme: str, host_and_port: str) -> bool:
    import httpx

    try:
        _ = httpx.URL(f"{scheme}://{host_and_port}/").host  # decoded (IDNA) when first read, as a request does
    except Exception:  # InvalidURL, idna's IDNAError, UnicodeError: whichever, the host is wrong
        return False
    return True


def _trailing_slash_or_unknown(text: str) -> bool | None:
    return True if text.endswith("/") else None


SCHEMES: tuple[Scheme, ...] = (
    Scheme(
        ("http", "https"),
        "https://host/model.tar.gz",
        _check_http,
        "fetcher.sources.http:HttpSource",
        lambda _text: False,
        bearer_token=True,
    ),
    Scheme(
        ("s3",),
        "s3://bucket/key or s3://bucket/prefix/",
        _check_s3,
        "fetcher.sources.s3:S3Source",
        _trailing_slash_or_unknown,
    ),
    Scheme(
        ("hf",),
        "hf://org/model[@revision]",
        _check_hf,
        "fetcher.sources.hub:HubSource",
        lambda _text: True,
        bearer_token=True,
    ),
    Scheme(
        ("oci",),
        "oci://registry/repo:tag",
        _check_oci,
        "fetcher.sources.oci:OciSource",
        lambda _text: True,
    ),
    Scheme(
        ("file",),
        "file:///path or file:///dir/",
        _check_file,
        "fetcher.sources.file:FileSource",
        _trailing_slash_or_unknown,
    ),
)
BY_SCHEME = {name: scheme for scheme in SCHEMES for name in scheme.names}


def scheme_of(source: str) -> Scheme:
    """The scheme of a source that config has checked."""
    return BY_SCHEME[source.split("://", 1)[0].lower()]


def check_source(text: str) -> str:
    """Checked here as every later step will read it, so that none of them can fail on it.

    urllib and httpx quote the part they choke on, a password included: their
    messages are never passed on, only what was wrong.
    """
    name = text.split("://", 1)[0].lower() if "://" in text else ""
    scheme = BY_SCHEME.get(name)
    if scheme is None:
        shown = repr(name) if re.fullmatch("[a-z][a-z0-9+.-]{0,15}", name) else "(none)"
        raise ValueError(f"unsupported URL scheme {shown}; use {', '.join(s.example for s in SCHEMES)}")
    if CONTROL.search(text):
        raise ValueError("the URL holds a control character or a line break")
    try:
        parts = urlsplit(text)
        if scheme.names not in (("hf",), ("oci",)):  # hf://gpt2:main is a revision, oci://r/repo:tag a tag
            _ = parts.port  # raises on a malformed port
    except ValueError as exc:
        raise ValueError(_url_problem(str(exc))) from None
    scheme.check(text, parts)
    return text


def _url_problem(urllib_message: str) -> str:
    """What urllib found wrong, without the part of the URL it quotes."""
    if "IPv6" in urllib_message:
        return "not a valid URL (an unbalanced [ or ] in the host)"
    if "NFKC" in urllib_message:
        return "not a valid URL (the host holds characters that change under NFKC normalization)"
    if "Port" in urllib_message:
        return "not a valid URL (the port is not a number from 0 to 65535)"
    return "not a valid URL"
