"""Keep secrets out of logs, markers and the termination message.

Sources are shown only through ``redact_url``; header values only through
``mask_headers``. The log pipeline also runs ``scrub`` over every event as a
last line of defence against a secret that reached a message by accident.

Names alone never suffice: the next vendor's token has a name no list knows.
So every header value is masked unless its header is known to be harmless,
any userinfo in a URL is masked whole, and a query value is masked when its
name is a known credential or when it looks like one (long and random).
"""

from __future__ import annotations

import collections
import itertools
import math
import re
from collections.abc import Iterable
from urllib.parse import unquote_plus, urlsplit, urlunsplit

MASK = "***"

# Query parameters that carry credentials in presigned or tokenised URLs: S3 SigV2/SigV4 and
# its kin (X-Amz-*, X-Goog-*, q-signature), Azure SAS (sig), CloudFront (Signature, Key-Pair-Id),
# Backblaze (Authorization), Akamai (__token__, hdnts), nginx secure_link (md5), CDN signs and
# HMACs, generic tokens and passwords. By exact name or by ending, never by a word anywhere in
# the name: masked by name, a value is no part of the artifact's identity (plan.Artifact.key),
# so objectKey=a and objectKey=b must stay two things; and a log reader needs to see which
# tokenizer= was asked for.
_SECRET_PARAM = re.compile(
    r"(?i)^(sig|sign|jwt|md5|verify|pass|pwd|auth|authorization|hdnts|__token__|q-ak|"
    r"key|apikey|api[_-]key|auth[_-]?key|access[_-]?key|secret[_-]?key|awsaccesskeyid|googleaccessid|key-pair-id|"
    r".*(signature|token|credential|secret|password|passwd|hmac))$"
)
# Headers whose values are shown: standard ones that never carry a credential. Any other
# header given with --header may be someone's API key (X-JFrog-Art-Api, X-Api-Key, ...).
_HARMLESS_HEADERS = frozenset({"accept", "accept-language", "cache-control", "user-agent"})

# name=value in free text. The lookbehind anchors a name at the start of its run of name
# characters, so a long run without "=" costs one pass, not one per position. A value stops
# at "?" and "=", so that in "source=https://h/p?sig=abc" the sig is a name=value of its own.
_ASSIGNMENT = re.compile(r"(?<![\w-])([\w-]+)=([^&\s\"'?=]+)")

# Shapes of secrets that must never be printed, whatever carried them.
_SCRUB = (
    (re.compile(r"(?i)(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 " + MASK),
    (re.compile(r"(?<![A-Z0-9])(AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])"), MASK),
    (re.compile(r"(://)[^/\s@]+@"), r"\1" + MASK + "@"),  # any userinfo, even where no URL could be parsed
)
# A scheme starts only where a run of scheme characters starts, and is short: a long run of
# them without "://" (a hostile member name) then costs one pass, not one per position.
_URL = re.compile(r"(?i)(?<![a-z0-9+.-])[a-z][a-z0-9+.-]{0,31}://[^\s\"'<>]+")


def redact_url(url: str, *, guess: bool = True) -> str:
    """The URL with any userinfo and its credential query values masked.

    ``guess=False`` masks only what is a credential by its name (userinfo, ``sig=``...),
    keeping values that merely look like one: that is what identifies the object.
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:  # user:password, a token as user name, :password: all of it
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    query = "&".join(_mask_pair(pair, guess) for pair in parts.query.split("&")) if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _mask_pair(pair: str, guess: bool) -> str:
    """One name=value of a query, as it was written unless its value is a credential."""
    name, sep, value = pair.partition("=")
    if sep and (_SECRET_PARAM.match(unquote_plus(name)) or (guess and looks_like_credential(unquote_plus(value)))):
        return f"{name}={MASK}"
    return pair


def looks_like_credential(value: str) -> bool:
    """Long and random: 16+ letters and digits, not a date or a number, with a run that mixes
    cases or letters and digits the way random text does and words do not.

    Catches hex digests, base64 and base64url of 20+ characters (>99% of random ones), JWTs and
    vendor tokens (ghp_..., hf_...), UUIDs; spares dates, version numbers, model names and paths
    (Llama-3.1-8B-Instruct, model-00001-of-00004). A false alarm only hides a value from people.
    """
    runs = re.findall(r"[A-Za-z0-9]+", value)
    if sum(map(len, runs)) < 16 or _entropy(value) < 3.0:
        return False
    return any(len(run) >= 6 and _class_changes(run[1:]) >= 2 for run in runs)  # [1:]: a capital is no change


def _class_changes(run: str) -> int:
    kinds = ["l" if c.islower() else "u" if c.isupper() else "d" for c in run]
    return sum(a != b for a, b in itertools.pairwise(kinds))


def _entropy(text: str) -> float:
    """Shannon entropy, in bits per character."""
    counts = collections.Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def is_harmless_header(name: str) -> bool:
    return name.lower() in _HARMLESS_HEADERS


def mask_headers(headers: Iterable[tuple[str, str]]) -> list[str]:
    """Headers for display: names kept, values masked unless the header is known to be harmless."""
    return [f"{name}: {value if is_harmless_header(name) else MASK}" for name, value in headers]


def scrub(text: str) -> str:
    """Mask anything shaped like a credential in free text: URLs as ``redact_url`` does, then known shapes."""
    text = _URL.sub(lambda m: _redact_url_in_text(m[0]), text)
    for pattern, replacement in _SCRUB:
        text = pattern.sub(replacement, text)
    return _ASSIGNMENT.sub(lambda m: f"{m[1]}={MASK}" if _SECRET_PARAM.match(m[1]) else m[0], text)


def _redact_url_in_text(url: str) -> str:
    try:
        return redact_url(url)
    except ValueError:  # not parseable (an unclosed [, a bad port): keep nothing after the scheme
        return f"{url.split('://', 1)[0]}://{MASK}"
