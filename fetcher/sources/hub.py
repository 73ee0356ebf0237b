"""hf:// sources: a Hugging Face repo at one commit, every file verified by the hub's own ids.

The revision (``main`` by default, a tag or a branch) is resolved to its
40-hex commit before anything else, and everything after is read at that
commit, so a branch that moves mid-download cannot mix two versions. The
tree API gives each file's size and id: an LFS file's sha256, or a small
file's git blob id, so every file is checked without the user giving a
digest. Files come from ``/{repo}/resolve/{commit}/{path}``, which sends LFS
files to a CDN on another host: ranged and parallel GETs go there, without
Authorization (see ``HttpClient``).

``HF_ENDPOINT`` and ``HF_TOKEN`` (or the token file ``hf auth login`` writes) are read
as huggingface_hub reads them; a ``--bearer-token-file`` (a mounted Secret) wins over them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import httpx

from fetcher.errors import FetchError, TransientFetchError, UsageError
from fetcher.manifest import GIT_SHA1, SHA256, Digest, Entry, Manifest, check_layout, relative_path
from fetcher.redact import redact_url
from fetcher.schemes import parse_hf
from fetcher.sources.base import Body, Connection, Selection
from fetcher.sources.http import HttpClient, Pin

DEFAULT_ENDPOINT = "https://huggingface.co"
COMMIT = re.compile(r"[0-9a-f]{40}")
MAX_PAGES = 10_000  # a tree of 10M files is no model: a hub that keeps paging is broken

# The hub says what went wrong in X-Error-Code; its status alone misleads (a missing repo is a
# 401 when no token is sent). Each is final: no retry brings a repo or a licence into being.
HUB_ERRORS: dict[str, str] = {
    "RepoNotFound": "{repo} was not found on {endpoint} (RepoNotFound): check its name; a private repo needs a "
    "token (HF_TOKEN or --bearer-token-file)",
    "RevisionNotFound": "{repo} has no revision {revision!r} (RevisionNotFound): check the branch, tag or commit",
    "EntryNotFound": "{what} was not found in {repo} (EntryNotFound)",
    "GatedRepo": "{repo} is gated (GatedRepo): accept its licence on {endpoint} with your account, then give that "
    "account's token (HF_TOKEN or --bearer-token-file)",
    "DisabledRepo": "{repo} is disabled on {endpoint} (DisabledRepo)",
}


def hub_endpoint() -> str:
    """The hub's URL, as huggingface_hub reads it."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


class HubSource:
    """A Hugging Face model or dataset repo."""

    def __init__(self, source: str, connection: Connection, selection: Selection) -> None:
        self.repo_type, self.repo, self.revision = parse_hf(source)
        self.display = redact_url(source)
        self.endpoint = hub_endpoint()
        token = None if connection.bearer_token_file else _env_token()
        if token is not None and not re.fullmatch(r"[\x21-\x7e]+", token):  # never echoed: still a secret
            raise UsageError("the Hugging Face token (HF_TOKEN or its token file) must be one line of printable ASCII")
        self._client = HttpClient(
            self.endpoint,
            connection,
            explain=self._explain,
            headers={"Authorization": f"Bearer {token}"} if token else None,
        )
        self._commit: str | None = self.revision if COMMIT.fullmatch(self.revision) else None
        self._pins: dict[str, Pin] = {}
        self._signed: set[str] = set()  # every URL the hub redirected to: one it refuses is asked again
        self._cdn: dict[str, str] = {}  # resolve URL -> where it redirected: a round trip to the hub saved per part

    @property
    def _api(self) -> str:
        return f"{self.endpoint}/api/{self.repo_type}s/{self.repo}"

    def identity(self) -> str:
        """The commit the revision names now: no request when it is one already, else one small one."""
        if self._commit is None:
            url = f"{self._api}/revision/{quote(self.revision, safe='')}"
            answer = self._json(self._client.get(url, self.display))
            commit = answer.get("sha") if isinstance(answer, dict) else None
            if not isinstance(commit, str) or not COMMIT.fullmatch(commit):
                raise FetchError(f"{self.endpoint} gave no commit for {self.repo}@{self.revision}")
            self._commit = commit
        return f"hf-commit:{self._commit}"

    def resolve(self) -> Manifest:
        identity = self.identity()
        commit = identity.removeprefix("hf-commit:")
        entries: list[Entry] = []
        url: str | None = f"{self._api}/tree/{commit}"
        params: dict[str, str] | None = {"recursive": "true", "expand": "false"}
        for _page in range(MAX_PAGES):
            if url is None:
                break
            response = self._client.get(url, self.display, params=params)
            items = self._json(response)
            if not isinstance(items, list):
                raise FetchError(f"{self.endpoint} answered the tree of {self.repo} with something else than a list")
            entries.extend(self._entry(item, commit) for item in items if _is_file(item))
            url, params = response.links.get("next", {}).get("url"), None
        else:
            raise FetchError(f"{self.endpoint} kept paging the tree of {self.repo} past {MAX_PAGES} pages")
        check_layout(entries, "repo file")
        note = None if commit == self.revision else f"{self.repo}@{self.revision} is commit {commit}"
        return Manifest(tuple(entries), directory=True, identity=identity, note=note)

    def _entry(self, item: dict[str, Any], commit: str) -> Entry:
        path = item.get("path")
        size = item.get("size")
        if not isinstance(path, str) or not isinstance(size, int) or size < 0:
            raise FetchError(f"{self.endpoint} listed a file of {self.repo} without a path or size")
        lfs = item.get("lfs")
        if isinstance(lfs, dict) and isinstance(lfs.get("oid"), str):
            digest = Digest(SHA256, lfs["oid"].lower(), "the hub (LFS sha256)")
        elif isinstance(item.get("oid"), str):
            digest = Digest(GIT_SHA1, item["oid"].lower(), "the hub (git blob id)")
        else:
            raise FetchError(f"{self.endpoint} listed {path!r} of {self.repo} without an id to verify it by")
        if not re.fullmatch(r"[0-9a-f]{64}" if digest.algorithm == SHA256 else r"[0-9a-f]{40}", digest.hex):
            raise FetchError(f"{self.endpoint} listed {path!r} of {self.repo} with a malformed id")
        return Entry(relative_path(path, "repo file"), size, digest, locator=path, pin=commit)

    @contextmanager
    def open(self, entry: Entry, start: int = 0, end: int | None = None) -> Iterator[Body]:
        base = self.endpoint if self.repo_type == "model" else f"{self.endpoint}/datasets"
        url = f"{base}/{self.repo}/resolve/{entry.pin}/{quote(entry.locator)}"
        display = f"{self.display.rstrip('/')}/{entry.path}"
        pin = self._pins.setdefault(entry.locator, Pin())
        with self._client.stream(self._cdn.get(url, url), display, pin, start, end) as (body, response):
            if str(response.url) != url:  # the CDN's signed URL: the other parts go there directly
                self._cdn[url] = str(response.url)
                self._signed.add(str(response.url))
            yield body

    def _explain(self, response: httpx.Response, display: str) -> FetchError | None:
        asked = str(response.request.url)
        if asked in self._signed and response.status_code in (401, 403, 404, 410):
            for resolve, cdn in list(self._cdn.items()):  # its signature expired: the hub signs a new one
                if cdn == asked:
                    del self._cdn[resolve]
            return TransientFetchError(f"the CDN refused {display} (HTTP {response.status_code}): asking the hub again")
        code = response.headers.get("X-Error-Code")
        if code not in HUB_ERRORS:
            return None
        what = display if "/resolve/" in str(response.url) else "a file"
        message = HUB_ERRORS[code].format(repo=self.repo, endpoint=self.endpoint, revision=self.revision, what=what)
        return FetchError(message)

    def _json(self, response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            raise FetchError(f"{self.endpoint} answered {self.repo}'s API with something else than JSON") from None

    def close(self) -> None:
        self._client.close()


def _is_file(item: Any) -> bool:
    return isinstance(item, dict) and item.get("type") == "file"


def _env_token() -> str | None:
    """The token as huggingface_hub finds it: HF_TOKEN (or its older name), else the file that
    ``hf auth login`` writes, at HF_TOKEN_PATH or $HF_HOME/token."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if token := os.environ.get(name, "").strip():
            return token
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    path = os.environ.get("HF_TOKEN_PATH") or os.path.join(home, "token")
    try:
        with open(path, encoding="utf-8") as file:
            return file.read().strip() or None
    except (OSError, UnicodeDecodeError):
        return None
