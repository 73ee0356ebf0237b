"""The fake hub is only worth its tests if the real client cannot tell it from huggingface.co:
the real huggingface_hub downloads, lists, resolves and fails against it exactly as it does there."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils.tqdm import disable_progress_bars

from tests.conftest import ROOT
from tests.fakehub import FakeHub

disable_progress_bars()
TOKEN = "hf_fakehubsecrettoken"


def files(seed: int = 1) -> dict[str, bytes]:
    """A model: text files, weights LFS by suffix, a big file LFS by size, nested directories."""
    noise = random.Random(seed)
    return {
        "config.json": json.dumps({"hidden_size": 64, "seed": seed}).encode() * 20,
        "tokenizer/vocab.txt": b"good\nbad\n" * (seed + 10),
        "model.safetensors": noise.randbytes(50_000),
        "shards/part-1.bin": noise.randbytes(20_000),
        "data.raw": noise.randbytes(9_000),  # over the test's lfs_threshold: LFS without an LFS suffix
        "empty.txt": b"",
    }


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root by relative path, through the cache's symlinks, without local_dir's metadata."""
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in root.rglob("*")
        if path.is_file() and path.relative_to(root).parts[:2] != (".cache", "huggingface")
    }


def blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download(hub: FakeHub, cache: Path, repo_id: str, **options: Any) -> dict[str, bytes]:
    options.setdefault("token", False)
    return tree(Path(snapshot_download(repo_id, endpoint=hub.endpoint, cache_dir=cache, **options)))


def expected(hub: FakeHub, repo_id: str, content: dict[str, bytes], repo_type: str = "model") -> dict[str, bytes]:
    prefix = "datasets/" if repo_type == "dataset" else ""
    gitattributes = httpx.get(f"{hub.endpoint}/{prefix}{repo_id}/resolve/main/.gitattributes", follow_redirects=True)
    return content | {".gitattributes": gitattributes.content}


@pytest.fixture
def small_lfs(hub: FakeHub) -> FakeHub:
    hub.lfs_threshold = 8_000
    return hub


def test_snapshot_download_gets_every_file_lfs_ones_from_another_host(small_lfs: FakeHub, tmp_path: Path) -> None:
    hub = small_lfs
    content = files()
    commit = hub.add_repo("org/model", content)
    got = download(hub, tmp_path, "org/model")
    assert got == expected(hub, "org/model", content)
    attributes = got[".gitattributes"].decode()
    assert "*.safetensors filter=lfs diff=lfs merge=lfs -text" in attributes
    assert "data.raw filter=lfs" in attributes  # LFS for its size: named in .gitattributes, as the hub does
    cdn = [r for r in hub.requests if r.server == "cdn"]
    assert sorted(r.path.split("?")[0].rsplit("/", 1)[1] for r in cdn) == sorted(
        sha256(content[name]) for name in ("model.safetensors", "shards/part-1.bin", "data.raw")
    )
    assert hub.cdn_endpoint.split("//")[1].split(":")[0] != "127.0.0.1"
    # Small public files: a relative 307 to a commit-pinned resolve-cache URL, which the client follows.
    assert any(r.path.startswith(f"/api/resolve-cache/models/org/model/{commit}/config.json") for r in hub.requests)


def test_the_token_goes_to_the_hub_and_never_to_the_cdn(small_lfs: FakeHub, tmp_path: Path) -> None:
    hub = small_lfs
    hub.token = TOKEN
    content = files()
    hub.add_repo("org/private", content, private=True)
    assert download(hub, tmp_path, "org/private", token=TOKEN) == expected_private(hub, "org/private", content)
    hub_auth = {r.headers.get("authorization") for r in hub.requests if r.server == "hub"}
    assert hub_auth == {f"Bearer {TOKEN}"}
    cdn = [r for r in hub.requests if r.server == "cdn"]
    assert len(cdn) == 3
    assert all("authorization" not in r.headers for r in cdn)


def expected_private(hub: FakeHub, repo_id: str, content: dict[str, bytes]) -> dict[str, bytes]:
    auth = {"Authorization": f"Bearer {hub.token}"}
    attributes = httpx.get(f"{hub.endpoint}/{repo_id}/resolve/main/.gitattributes", headers=auth)
    assert attributes.status_code == 200  # private: served by /resolve itself, no resolve-cache hop
    return content | {".gitattributes": attributes.content}


def test_a_pinned_commit_still_downloads_after_the_branch_moved(small_lfs: FakeHub, tmp_path: Path) -> None:
    hub = small_lfs
    first, second = files(1), files(2)
    del second["shards/part-1.bin"]
    old = hub.add_repo("org/moving", first)
    new = hub.commit("org/moving", second)
    assert new != old
    assert download(hub, tmp_path / "new", "org/moving") == expected(hub, "org/moving", second)
    got = download(hub, tmp_path / "old", "org/moving", revision=old)
    assert got.keys() == first.keys() | {".gitattributes"}
    assert all(got[name] == data for name, data in first.items())
    info = HfApi(endpoint=hub.endpoint, token=False).repo_info("org/moving")
    assert info.sha == new
    assert HfApi(endpoint=hub.endpoint, token=False).repo_info("org/moving", revision=old).sha == old


def test_allow_and_ignore_patterns(small_lfs: FakeHub, tmp_path: Path) -> None:
    hub = small_lfs
    content = files()
    hub.add_repo("org/patterns", content)
    assert download(hub, tmp_path / "a", "org/patterns", allow_patterns=["*.json", "tokenizer/*"]) == {
        "config.json": content["config.json"],
        "tokenizer/vocab.txt": content["tokenizer/vocab.txt"],
    }
    got = download(hub, tmp_path / "b", "org/patterns", ignore_patterns=["*.safetensors", "shards/*"])
    assert set(got) == {".gitattributes", "config.json", "tokenizer/vocab.txt", "data.raw", "empty.txt"}


def test_listing_is_paginated_with_link_headers_and_git_ids(small_lfs: FakeHub, tmp_path: Path) -> None:
    hub = small_lfs
    hub.page_size = 2
    content = files()
    commit = hub.add_repo("org/paged", content)
    listed = list(HfApi(endpoint=hub.endpoint, token=False).list_repo_tree("org/paged", recursive=True))
    pages = [r for r in hub.requests if "/tree/" in r.path]
    assert len(pages) == 5  # 7 files and 2 directories, 2 a page
    assert all("cursor=" in r.path for r in pages[1:])
    files_listed = {entry.path: entry for entry in listed if hasattr(entry, "blob_id")}
    folders = {entry.path for entry in listed if not hasattr(entry, "blob_id")}
    assert folders == {"tokenizer", "shards"}
    assert files_listed.keys() == content.keys() | {".gitattributes"}
    for name, data in content.items():
        entry: Any = files_listed[name]
        assert entry.size == len(data)
        if name in ("model.safetensors", "shards/part-1.bin", "data.raw"):
            assert entry.lfs.sha256 == sha256(data)
            assert entry.lfs.size == len(data)
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256(data)}\nsize {len(data)}\n"
            assert entry.blob_id == blob_id(pointer.encode())  # what git stores is the pointer
            assert entry.lfs.pointer_size == len(pointer)
        else:
            assert entry.lfs is None
            assert entry.blob_id == blob_id(data)
    # One level, and under a path (the client sends it %2F-encoded).
    top = HfApi(endpoint=hub.endpoint, token=False).list_repo_tree("org/paged")
    assert {entry.path for entry in top} == {".gitattributes", "config.json", "data.raw", "empty.txt",
                                             "model.safetensors", "shards", "tokenizer"}  # fmt: skip
    under = HfApi(endpoint=hub.endpoint, token=False).list_repo_tree("org/paged", path_in_repo="shards")
    assert [entry.path for entry in under] == ["shards/part-1.bin"]
    # snapshot_download follows the pages too.
    assert download(hub, tmp_path, "org/paged", revision=commit) == expected(hub, "org/paged", content)


def test_a_dataset_repo(small_lfs: FakeHub, tmp_path: Path) -> None:
    hub = small_lfs
    content = {"train/part-0.parquet": random.Random(3).randbytes(4_000), "README.md": b"# data\n"}
    hub.add_repo("org/data", content, repo_type="dataset")
    got = download(hub, tmp_path, "org/data", repo_type="dataset")
    assert got == expected(hub, "org/data", content, repo_type="dataset")
    prefixes = ("/api/datasets/org/data/", "/datasets/org/data/", "/api/resolve-cache/datasets/org/data/")
    assert all(r.path.startswith(prefixes) for r in hub.requests if r.server == "hub")
    with pytest.raises(RepositoryNotFoundError):  # a dataset is not a model
        download(hub, tmp_path / "model", "org/data")


def test_a_gated_repo_needs_a_token_with_access(small_lfs: FakeHub, tmp_path: Path) -> None:
    hub = small_lfs
    hub.token = TOKEN
    content = files()
    hub.add_repo("org/gated", content, gated=True)
    info = HfApi(endpoint=hub.endpoint, token=False).repo_info("org/gated")  # info is public, as on the hub
    assert info.gated == "auto"
    with pytest.raises(GatedRepoError) as anonymous:
        download(hub, tmp_path / "a", "org/gated")
    assert anonymous.value.response.status_code == 401
    assert "restricted" in str(anonymous.value)
    with pytest.raises(GatedRepoError) as refused:
        download(hub, tmp_path / "b", "org/gated", token="hf_someoneelse")
    assert refused.value.response.status_code == 403
    assert download(hub, tmp_path / "c", "org/gated", token=TOKEN) == expected_private(hub, "org/gated", content)


def test_a_missing_or_hidden_repo_is_not_found(hub: FakeHub, tmp_path: Path) -> None:
    hub.token = TOKEN
    hub.add_repo("org/secret", {"a.txt": b"a"}, private=True)
    for repo_id, token, status in [
        ("org/nothing", False, 401),
        ("org/nothing", TOKEN, 404),
        ("org/secret", False, 401),
        ("org/secret", "hf_someoneelse", 404),
    ]:
        with pytest.raises(RepositoryNotFoundError) as caught:
            download(hub, tmp_path, repo_id, token=token)
        assert type(caught.value) is RepositoryNotFoundError
        assert caught.value.response.status_code == status


def test_a_missing_revision_and_a_missing_file(hub: FakeHub, tmp_path: Path) -> None:
    commit = hub.add_repo("org/model", {"a.txt": b"a"})
    with pytest.raises(RevisionNotFoundError):
        download(hub, tmp_path, "org/model", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        download(hub, tmp_path, "org/model", revision="0" * 40)
    with pytest.raises(RemoteEntryNotFoundError) as caught:
        hf_hub_download("org/model", "b.txt", endpoint=hub.endpoint, cache_dir=tmp_path, token=False)
    assert caught.value.response.headers["X-Repo-Commit"] == commit
    path = hf_hub_download("org/model", "a.txt", endpoint=hub.endpoint, cache_dir=tmp_path, token=False)
    assert Path(path).read_bytes() == b"a"


def test_file_metadata_as_the_client_reads_it(small_lfs: FakeHub) -> None:
    hub = small_lfs
    content = files()
    commit = hub.add_repo("org/model", content)
    weights = get_hf_file_metadata(hf_hub_url("org/model", "model.safetensors", endpoint=hub.endpoint), token=False)
    assert (weights.commit_hash, weights.etag, weights.size) == (
        commit,
        sha256(content["model.safetensors"]),
        len(content["model.safetensors"]),
    )
    assert weights.location.startswith(hub.cdn_endpoint + "/")
    config = get_hf_file_metadata(hf_hub_url("org/model", "config.json", endpoint=hub.endpoint), token=False)
    assert (config.commit_hash, config.etag, config.size) == (
        commit,
        blob_id(content["config.json"]),
        len(content["config.json"]),
    )
    assert config.location.startswith(f"{hub.endpoint}/api/resolve-cache/models/org/model/{commit}/")


def test_the_cdn_serves_ranges_with_its_own_etag_and_checks_its_signature(small_lfs: FakeHub) -> None:
    hub = small_lfs
    data = files()["model.safetensors"]
    hub.add_repo("org/model", {"model.safetensors": data})
    head = httpx.head(f"{hub.endpoint}/org/model/resolve/main/model.safetensors")
    assert head.status_code == 302
    assert head.headers["X-Linked-Etag"] == f'"{sha256(data)}"'
    assert not any(name.lower().startswith("x-xet") for name in head.headers)
    url = head.headers["Location"]
    whole = httpx.get(url)
    assert whole.content == data
    assert whole.headers["ETag"].strip('"') != sha256(data)  # as on the real CDN: not the sha256
    part = httpx.get(url, headers={"Range": "bytes=100-199"})
    assert (part.status_code, part.content) == (206, data[100:200])
    assert part.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    assert httpx.get(url, headers={"Range": "bytes=-10"}).content == data[-10:]
    assert httpx.get(url, headers={"Range": f"bytes={len(data)}-"}).status_code == 416
    assert httpx.get(url, headers={"If-Match": '"other"'}).status_code == 412
    assert httpx.get(url.replace("Expires=", "Expires=1")).status_code == 403  # tampered
    hub.url_ttl = -1
    expired = httpx.head(f"{hub.endpoint}/org/model/resolve/main/model.safetensors").headers["Location"]
    assert httpx.get(expired).status_code == 403


def test_resolve_redirects_small_public_files_and_compresses_text(hub: FakeHub) -> None:
    text = b"hello world\n" * 1000
    commit = hub.add_repo("org/model", {"notes.txt": text})
    first = httpx.get(f"{hub.endpoint}/org/model/resolve/main/notes.txt")
    assert first.status_code == 307
    assert first.headers["Location"].startswith(f"/api/resolve-cache/models/org/model/{commit}/notes.txt?")
    final = httpx.get(f"{hub.endpoint}/org/model/resolve/main/notes.txt", follow_redirects=True)
    assert (final.content, final.headers["Content-Encoding"], final.headers["ETag"]) == (
        text,
        "gzip",
        f'"{blob_id(text)}"',
    )
    assert "Content-Length" not in final.headers
    raw = httpx.get(str(final.url), headers={"Accept-Encoding": "identity", "Range": "bytes=0-4"})
    assert (raw.status_code, raw.content) == (206, b"hello")
    with httpx.stream("GET", str(final.url), headers={"Accept-Encoding": "gzip"}) as response:
        assert gzip.decompress(b"".join(response.iter_raw())) == text


def test_corrupt_serves_other_bytes_of_the_same_length(small_lfs: FakeHub, tmp_path: Path) -> None:
    hub = small_lfs
    content = files()
    hub.add_repo("org/model", content)
    hub.corrupt("org/model", "model.safetensors")
    hub.corrupt("org/model", "config.json")
    got = download(hub, tmp_path, "org/model")
    for name in ("model.safetensors", "config.json"):
        assert len(got[name]) == len(content[name])
        assert got[name] != content[name]
    assert got["tokenizer/vocab.txt"] == content["tokenizer/vocab.txt"]
    metadata = get_hf_file_metadata(hf_hub_url("org/model", "model.safetensors", endpoint=hub.endpoint), token=False)
    assert metadata.etag == sha256(content["model.safetensors"]) != sha256(got["model.safetensors"])


def test_rate_limit_paces_file_bodies(small_lfs: FakeHub) -> None:
    hub = small_lfs
    data = files()["model.safetensors"]
    hub.add_repo("org/model", {"model.safetensors": data})
    hub.rate_limit(200_000)
    began = time.monotonic()
    assert httpx.get(f"{hub.endpoint}/org/model/resolve/main/model.safetensors", follow_redirects=True).content == data
    assert time.monotonic() - began >= len(data) / 200_000 * 0.9  # a floor the pacing guarantees, no ceiling


def test_standalone_server_with_the_hf_cli_configured_by_environment(tmp_path: Path) -> None:
    """As a benchmark runs it: a directory served by `python tests/fakehub.py`, fetched by `hf download`
    with HF_ENDPOINT set before huggingface_hub is imported."""
    source = tmp_path / "source"
    (source / "sub").mkdir(parents=True)
    (source / "config.json").write_text('{"a": 1}\n')
    (source / "sub" / "weights.safetensors").write_bytes(random.Random(5).randbytes(30_000))
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "fakehub.py"), "--repo", "org/cli", "--dir", str(source)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        started = json.loads(server.stdout.readline())
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and not k.lower().endswith("_proxy")}
        env |= {"HF_ENDPOINT": started["endpoint"], "HF_HOME": str(tmp_path / "home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
        hf = Path(sys.executable).parent / "hf"
        run = subprocess.run(
            [str(hf), "download", "org/cli", "--local-dir", str(tmp_path / "out"), "--revision", started["commit"]],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
    finally:
        server.terminate()
        server.wait(timeout=10)
    got = tree(tmp_path / "out")
    assert got.keys() == {".gitattributes", "config.json", "sub/weights.safetensors"}
    assert got["sub/weights.safetensors"] == (source / "sub" / "weights.safetensors").read_bytes()
    assert server.returncode == 0
