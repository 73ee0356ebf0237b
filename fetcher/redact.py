"""Keep secrets out of logs, markers and the termination message.

Sources are shown only through ``redact_url``; header values only through
``mask_headers``. The log pipeline also runs ``scrub`` over every event as a
last line of defence against a secret that reached a message by accident.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"

# Query parameters that carry credentials in presigned or tokenised URLs: S3 SigV2/SigV4,
# GCS, Azure SAS (sig), Backblaze (Authorization), Akamai (__token__, hdnts), CDN HMACs and
# generic tokens. Matched by what the name contains: masking too much costs nothing.
_SECRET_WORDS = r"signature|credential|token|secret|password|passwd|auth|key|hmac|session"
_SECRET_PARAM = re.compile(rf"(?i)^(sig|hdnts|googleaccessid|.*({_SECRET_WORDS}).*)$")
_SECRET_HEADER = re.compile(r"(?i)^(cookie|.*(key|token|secret|password|auth|session).*)$")

# Shapes of secrets that must never be printed, whatever carried them.
_SCRUB = (
    (re.compile(r"(?i)(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 " + MASK),
    (
        re.compile(rf"(?i)(\b(?:sig|hdnts|[\w-]*(?:{_SECRET_WORDS})[\w-]*)=)[^&\s\"']+"),
        r"\1" + MASK,
    ),
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
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, MASK if _SECRET_PARAM.match(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def is_secret_header(name: str) -> bool:
    return _SECRET_HEADER.match(name) is not None


def mask_headers(headers: Iterable[tuple[str, str]]) -> list[str]:
    """Headers for display: names kept, secret-looking values masked."""
    return [f"{name}: {MASK if is_secret_header(name) else value}" for name, value in headers]


def scrub(text: str) -> str:
    """Mask anything shaped like a credential in free text."""
    for pattern, replacement in _SCRUB:
        text = pattern.sub(replacement, text)
    return text
