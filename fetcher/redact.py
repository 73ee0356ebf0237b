"""Keep secrets out of logs, markers and the termination message.

Sources are shown only through ``redact_url``; header values only through
``mask_headers``. The log pipeline also runs ``scrub`` over every event as a
last line of defence against a secret that reached a message by accident.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote_plus, urlsplit, urlunsplit

MASK = "***"

# Query parameters that carry credentials in presigned or tokenised URLs: S3 SigV2/SigV4 and
# its kin (X-Amz-*, X-Goog-*, q-signature), Azure SAS (sig), CloudFront (Signature, Key-Pair-Id),
# Backblaze (Authorization), Akamai (__token__, hdnts), nginx secure_link (md5), CDN signs and
# HMACs, generic tokens and passwords. By exact name or by ending, never by a word anywhere in
# the name: the redacted URL is also the artifact's identity, so objectKey=a and objectKey=b
# must stay two things, and a log reader needs to see which tokenizer= was asked for.
_SECRET_PARAM = re.compile(
    r"(?i)^(sig|sign|jwt|md5|verify|pass|pwd|auth|authorization|hdnts|__token__|q-ak|"
    r"key|apikey|api[_-]key|access[_-]?key|secret[_-]?key|awsaccesskeyid|googleaccessid|key-pair-id|"
    r".*(signature|token|credential|secret|password|passwd|hmac))$"
)
_SECRET_HEADER = re.compile(r"(?i)^(cookie|.*(key|token|secret|password|auth|session|signature|credential|hmac).*)$")

# name=value in free text. The lookbehind anchors a name at the start of its run of name
# characters, so a long run without "=" costs one pass, not one per position. A value stops
# at "?" and "=", so that in "source=https://h/p?sig=abc" the sig is a name=value of its own.
_ASSIGNMENT = re.compile(r"(?<![\w-])([\w-]+)=([^&\s\"'?=]+)")

# Shapes of secrets that must never be printed, whatever carried them.
_SCRUB = (
    (re.compile(r"(?i)(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 " + MASK),
    (re.compile(r"(?<![A-Z0-9])(AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])"), MASK),
    (re.compile(r"(://[^/\s:@]+:)[^@\s/]+@"), r"\1" + MASK + "@"),
)


def redact_url(url: str) -> str:
    """The URL with its password and credential-bearing query values masked."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{MASK}@{host}" if ":" in userinfo else f"{user}@{host}"
    query = "&".join(_mask_pair(pair) for pair in parts.query.split("&")) if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _mask_pair(pair: str) -> str:
    """One name=value of a query, as it was written unless its value is a credential."""
    name, sep, _value = pair.partition("=")
    return f"{name}={MASK}" if sep and _SECRET_PARAM.match(unquote_plus(name)) else pair


def is_secret_header(name: str) -> bool:
    return _SECRET_HEADER.match(name) is not None


def mask_headers(headers: Iterable[tuple[str, str]]) -> list[str]:
    """Headers for display: names kept, secret-looking values masked."""
    return [f"{name}: {MASK if is_secret_header(name) else value}" for name, value in headers]


def scrub(text: str) -> str:
    """Mask anything shaped like a credential in free text."""
    for pattern, replacement in _SCRUB:
        text = pattern.sub(replacement, text)
    return _ASSIGNMENT.sub(lambda m: f"{m[1]}={MASK}" if _SECRET_PARAM.match(m[1]) else m[0], text)
