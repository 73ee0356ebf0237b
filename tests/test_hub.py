"""hf:// sources against the fake hub (tests/fakehub.py), which huggingface_hub itself validates
(tests/test_fakehub.py): the tree fetcher publishes is the one snapshot_download gives."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from huggingface_hub import snapshot_download

from fetcher.pace import CPU_BOUND
from tests.conftest import Origin, cpu_hogs, run_fetcher, sha256, tree
from tests.fakehub import FakeHub

SHARD = random.Random(5).randbytes(3 * 2**20 + 17)
REPO = {
    "config.json": b'{"architectures": ["LlamaForCausalLM"]}\n',
    "tokenizer.json": b'{"model": {"vocab": {"a": 0}}}\n',
    "generation_config.json": b"{}\n",
    "model-00001-of-00002.safetensors": SHARD,
    "model-00002-of-00002.safetensors": SHARD[::-1],
    "original/params.json": b'{"dim": 64}\n',
    "original/consolidated.00.pth": b"pth" * 1000,
}


def _env(hub: FakeHub, **extra: str) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.endpoint, "FETCHER_PART_SIZE": "1Mi"} | extra


def _snapshot(hub: FakeHub, repo: str, tmp_path: Path, **options: object) -> dict[str, bytes]:
    local = tmp_path / "hf-snapshot"
    snapshot_download(repo, endpoint=hub.endpoint, local_dir=local, cache_dir=tmp_path / "hf-cache", **options)  # type: ignore[arg-type]
    return {k: v for k, v in tree(local).items() if not k.startswith(".cache/")}


def test_a_repo_is_the_tree_snapshot_download_gives_every_file_verified(hub: FakeHub, tmp_path: Path) -> None:
    commit = hub.add_repo("org/llama", REPO)
    dest = tmp_path / "dest"

    run = run_fetcher("--source", "hf://org/llama", "--dest", str(dest), env=_env(hub, FETCHER_SPLIT_BELOW="100G"))

    assert run.code == 0, run.stderr
    assert tree(dest) == _snapshot(hub, "org/llama", tmp_path)
    assert ".gitattributes" in tree(dest)
    published = run.event("published")
    assert published["identity"] == f"hf-commit:{commit}"
    assert published["verified"] == len(REPO) + 1
    assert run.all("files not verified") == []
    marker = json.loads(next((dest / ".fetcher").glob("*.json")).read_text())
    digests = {o["path"]: o["digest"] for o in marker["objects"]}
    assert digests["config.json"].startswith("sha1-git:")
    assert digests["model-00001-of-00002.safetensors"].startswith("sha256:")
    assert marker["identity"] == f"hf-commit:{commit}"
    cdn = [r for r in hub.requests if r.server == "cdn"]
    assert any("Range" in r.headers or "range" in r.headers for r in cdn)  # shards came in ranged parts
    assert len(run.all("splitting")) == 2


def test_a_cdn_that_ignores_ranges_after_all_gets_each_shard_on_one_stream(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("org/llama", REPO)
    hub.ignore_ranges = True  # says Accept-Ranges, sends 200 and the whole shard to a part's request
    dest = tmp_path / "dest"

    run = run_fetcher("--source", "hf://org/llama", "--dest", str(dest), env=_env(hub, FETCHER_SPLIT_BELOW="100G"))

    assert run.code == 0, run.stderr
    assert {k: v for k, v in tree(dest).items() if k in REPO} == REPO
    assert len(run.all("one stream: the server does not serve ranges of this file")) == 2


def test_files_with_the_same_content_are_fetched_once_and_all_published(hub: FakeHub, tmp_path: Path) -> None:
    files = REPO | {"copy/model-00001-of-00002.safetensors": SHARD, "copy/config.json": REPO["config.json"]}
    hub.add_repo("org/llama", files)
    dest = tmp_path / "dest"

    run = run_fetcher("--source", "hf://org/llama", "--dest", str(dest), env=_env(hub, FETCHER_SPLIT_BELOW="100G"))

    assert run.code == 0, run.stderr
    assert {k: v for k, v in tree(dest).items() if k in files} == files
    assert run.event("published")["fetched"] == len(files) + 1 - 2  # .gitattributes; the two copies not fetched
    shard_gets = [r for r in hub.requests if r.server == "hub" and r.path.endswith("00001-of-00002.safetensors")]
    assert len(shard_gets) == 1, shard_gets


def test_shards_arriving_faster_than_split_below_stream_whole(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("org/llama", REPO)
    env = _env(hub, FETCHER_SPLIT_BELOW="1")  # any first part is faster than 1 byte/s

    run = run_fetcher("--source", "hf://org/llama", "--dest", str(tmp_path / "dest"), env=env)

    assert run.code == 0, run.stderr
    assert run.all("splitting") == []
    shards = [r for r in hub.requests if r.server == "cdn" and "safetensors" in r.path]
    assert len(shards) == 2 and not any("range" in {k.lower() for k in r.headers} for r in shards)


def test_include_exclude_match_snapshot_download_patterns(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("org/llama", REPO)
    dest = tmp_path / "dest"
    run = run_fetcher(
        "--source", "hf://org/llama", "--dest", str(dest),
        "--include", "*.json", "--include", "*.safetensors", "--exclude", "original/*",
        env=_env(hub),
    )  # fmt: skip
    assert run.code == 0, run.stderr
    expected = _snapshot(
        hub, "org/llama", tmp_path, allow_patterns=["*.json", "*.safetensors"], ignore_patterns=["original/*"]
    )
    assert tree(dest) == expected
    assert "original/params.json" not in expected


def test_a_pinned_commit_restarts_without_any_request(hub: FakeHub, tmp_path: Path) -> None:
    commit = hub.add_repo("org/llama", {"config.json": b"{}"})
    dest = tmp_path / "dest"
    assert run_fetcher("--source", f"hf://org/llama@{commit}", "--dest", str(dest), env=_env(hub)).code == 0
    before = len(hub.requests)
    again = run_fetcher("--source", f"hf://org/llama@{commit}", "--dest", str(dest), env=_env(hub))
    assert again.code == 0, again.stderr
    assert again.event("already present")
    assert hub.requests[before:] == []


def test_a_moved_branch_costs_one_request_when_unchanged_and_refetches_when_moved(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("org/llama", {"config.json": b"{}", "w.safetensors": SHARD})
    dest = tmp_path / "dest"
    assert run_fetcher("--source", "hf://org/llama:main", "--dest", str(dest), env=_env(hub)).code == 0
    before = len(hub.requests)
    same = run_fetcher("--source", "hf://org/llama:main", "--dest", str(dest), env=_env(hub))
    assert same.code == 0 and same.event("already present")
    assert [r.path for r in hub.requests[before:]] == ["/api/models/org/llama/revision/main"]

    moved = hub.commit("org/llama", {"config.json": b'{"v": 2}', "w.safetensors": SHARD})
    before = len(hub.requests)
    run = run_fetcher("--source", "hf://org/llama:main", "--dest", str(dest), env=_env(hub))
    assert run.code == 0, run.stderr
    assert moved in run.event("fetching again")["reason"]
    assert tree(dest)["config.json"] == b'{"v": 2}'
    assert not [r for r in hub.requests[before:] if r.server == "cdn"]  # the unchanged shard was not fetched again


@pytest.mark.fault(
    "a hub file whose bytes do not match its LFS sha256: exit 4, nothing published", exit=4, area="directory"
)
def test_a_corrupted_blob_is_exit_4_and_nothing_is_published(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("org/llama", REPO)
    hub.corrupt("org/llama", "model-00002-of-00002.safetensors")
    dest = tmp_path / "dest"
    run = run_fetcher("--source", "hf://org/llama", "--dest", str(dest), env=_env(hub))
    assert run.code == 4, run.stderr
    assert "model-00002-of-00002.safetensors: sha256 mismatch" in run.error
    assert "the hub (LFS sha256)" in run.error
    assert tree(dest) == {}


@pytest.mark.fault(
    "a gated repo without a token: exit 3 saying what to do; the token never reaches the CDN", exit=3, area="directory"
)
def test_a_gated_repo_says_what_to_do_and_the_token_never_reaches_the_cdn(hub: FakeHub, tmp_path: Path) -> None:
    hub.token = "hf_secret_token_123456"
    hub.add_repo("org/gated", REPO, gated=True)
    run = run_fetcher("--source", "hf://org/gated", "--dest", str(tmp_path / "d1"), env=_env(hub))
    assert run.code == 3
    assert "gated (GatedRepo): accept its licence" in run.error
    assert run.all("retrying") == []

    token_file = tmp_path / "token"
    token_file.write_text(hub.token + "\n")
    dest = tmp_path / "d2"
    run = run_fetcher(
        "--source", "hf://org/gated", "--dest", str(dest), "--bearer-token-file", str(token_file), env=_env(hub)
    )
    assert run.code == 0, run.stderr
    assert tree(dest) == _snapshot(hub, "org/gated", tmp_path, token=hub.token)
    cdn = [r for r in hub.requests if r.server == "cdn"]
    assert cdn and not [r for r in cdn if "authorization" in r.headers]
    assert hub.token not in run.stderr


@pytest.mark.fault(
    "--sha256sums on another host than the hub: the hub's token never goes there", exit=0, area="secrets"
)
def test_the_token_and_headers_never_reach_a_sha256sums_url_on_another_host(
    hub: FakeHub, origin: Origin, tmp_path: Path
) -> None:
    hub.token = "hf_sums_token_987654"
    hub.add_repo("org/summed", {"config.json": b"{}"}, private=True)
    sums = origin.add("/SHA256SUMS", f"{sha256(b'{}')}  config.json\n".encode())
    token_file = tmp_path / "token"
    token_file.write_text(hub.token)
    run = run_fetcher(
        "--source", "hf://org/summed", "--dest", str(tmp_path / "d"), "--sha256sums", sums,
        "--bearer-token-file", str(token_file), "--header", "X-Team-Key: t3amK3y", env=_env(hub),
    )  # fmt: skip
    assert run.code == 0, run.stderr
    (asked,) = origin.hits("/SHA256SUMS")
    assert {"authorization", "x-team-key"}.isdisjoint(k.lower() for k in asked.headers)  # neither goes there now
    assert any("authorization" in r.headers for r in hub.requests)  # the hub still gets its token

    # A sums file on the hub itself (in the private repo) still gets the token: it is the source's origin.
    listed = f"{sha256(b'{}')}  config.json\n".encode()
    hub.add_repo("org/self-summed", {"config.json": b"{}", "SHA256SUMS": listed}, private=True)
    own = f"{hub.endpoint}/org/self-summed/resolve/main/SHA256SUMS"
    same = run_fetcher(
        "--source", "hf://org/self-summed", "--dest", str(tmp_path / "own"), "--sha256sums", own,
        "--bearer-token-file", str(token_file), env=_env(hub),
    )  # fmt: skip
    assert same.code == 0, same.stderr  # was exit 3 (401) while the hf:// source matched no HTTP origin
    assert tree(tmp_path / "own") == {"config.json": b"{}"}


def test_hf_token_from_the_environment(hub: FakeHub, tmp_path: Path) -> None:
    hub.token = "hf_env_token_abcdef"
    hub.add_repo("org/private", {"config.json": b"{}"}, private=True)
    run = run_fetcher("--source", "hf://org/private", "--dest", str(tmp_path), env=_env(hub, HF_TOKEN=hub.token))
    assert run.code == 0, run.stderr
    assert tree(tmp_path)["config.json"] == b"{}"


@pytest.mark.fault(
    "a missing repo or revision: exit 3 with the hub's X-Error-Code, not retried", exit=3, area="directory"
)
@pytest.mark.parametrize(
    ("source", "says"),
    [
        ("hf://org/absent", "was not found on"),
        ("hf://org/llama@no-such-branch", "has no revision 'no-such-branch'"),
    ],
)
def test_hub_errors_are_exit_3_one_line_not_retried(hub: FakeHub, tmp_path: Path, source: str, says: str) -> None:
    hub.add_repo("org/llama", {"config.json": b"{}"})
    run = run_fetcher("--source", source, "--dest", str(tmp_path / "d"), env=_env(hub))
    assert run.code == 3
    assert says in run.error
    assert run.all("retrying") == []
    assert not (tmp_path / "d").exists()


def test_a_dataset_repo_and_pagination(hub: FakeHub, tmp_path: Path) -> None:
    hub.page_size = 2
    files = {f"data/{i}.csv": f"{i}\n".encode() for i in range(7)}
    hub.add_repo("org/set", files, repo_type="dataset")
    run = run_fetcher("--source", "hf://datasets/org/set", "--dest", str(tmp_path), env=_env(hub))
    assert run.code == 0, run.stderr
    assert {k: v for k, v in tree(tmp_path).items() if k != ".gitattributes"} == files


def test_dry_run_shows_the_commit_and_each_files_checksum_origin(hub: FakeHub, tmp_path: Path) -> None:
    commit = hub.add_repo("org/llama", {"config.json": b"{}", "w.safetensors": SHARD})
    run = run_fetcher("--source", "hf://org/llama", "--dest", str(tmp_path / "d"), "--dry-run", env=_env(hub))
    assert run.code == 0, run.stderr
    (artifact,) = json.loads(run.stdout)["artifacts"]
    assert artifact["identity"] == f"hf-commit:{commit}"
    origins = {f["path"]: f["checksum"] for f in artifact["files"]}
    assert origins["w.safetensors"].endswith("(from the hub (LFS sha256))")
    assert origins["config.json"].endswith("(from the hub (git blob id))")
    assert not (tmp_path / "d").exists()


def test_a_token_file_as_hf_auth_login_writes_it_and_a_broken_token_is_never_echoed(
    hub: FakeHub, tmp_path: Path
) -> None:
    hub.token = "hf_file_token_abcdef"
    hub.add_repo("org/private", {"config.json": b"{}"}, private=True)
    (tmp_path / "hf-home").mkdir()
    (tmp_path / "hf-home" / "token").write_text(hub.token + "\n")
    run = run_fetcher(
        "--source", "hf://org/private", "--dest", str(tmp_path / "d"), env=_env(hub, HF_HOME=str(tmp_path / "hf-home"))
    )
    assert run.code == 0, run.stderr
    broken = "hf_broken\nX-Injected: 1"
    run = run_fetcher("--source", "hf://org/private", "--dest", str(tmp_path / "e"), env=_env(hub, HF_TOKEN=broken))
    assert run.code == 2
    assert "hf_broken" not in run.stderr


def test_a_cdn_url_that_stops_working_mid_file_is_asked_of_the_hub_again(hub: FakeHub, tmp_path: Path) -> None:
    import secrets
    import threading
    import time

    hub.add_repo("org/llama", {"w.safetensors": SHARD})
    hub.rate_limit(4 * 2**20)  # each 1 MiB part takes ~0.25 s: the others ask after the rotation

    def rotate_after_first_cdn_get() -> None:
        deadline = time.monotonic() + 30
        while not any(r.server == "cdn" for r in hub.requests) and time.monotonic() < deadline:
            time.sleep(0.005)
        hub._secret = secrets.token_bytes(32)  # every URL signed so far is refused from now on

    rotator = threading.Thread(target=rotate_after_first_cdn_get, daemon=True)
    rotator.start()
    run = run_fetcher("--source", "hf://org/llama", "--dest", str(tmp_path), "--concurrency", "2", env=_env(hub))
    rotator.join()
    assert run.code == 0, run.stderr
    assert tree(tmp_path)["w.safetensors"] == SHARD
    assert any("the CDN refused" in e["reason"] for e in run.all("retrying"))


def test_a_saturated_cpu_keeps_a_slowish_shard_on_one_stream(hub: FakeHub, tmp_path: Path) -> None:
    """The same rule for a file of a directory: within a factor of 4 of --split-below while tasks
    waited for a CPU, the shard stays on its one connection."""
    big = random.Random(9).randbytes(3 * 2**20)
    hub.add_repo("org/busy", {"model.safetensors": big, "config.json": b"{}"})
    hub.rate_limit(2_000_000)
    env = _env(hub, FETCHER_PART_SIZE="256Ki", FETCHER_SPLIT_BELOW="5M")

    with cpu_hogs():
        run = run_fetcher("--source", "hf://org/busy", "--dest", str(tmp_path / "dest"), env=env)

    assert run.code == 0, run.stderr
    assert tree(tmp_path / "dest")["model.safetensors"] == big
    assert run.all("splitting") == [], run.stderr
    assert run.event(CPU_BOUND)["cpu_stalled"] >= 0.5
    assert not [r for r in hub.requests if r.server == "cdn" and r.headers.get("range")]


def test_a_stream_that_slows_after_its_first_part_is_split_then(hub: FakeHub, tmp_path: Path) -> None:
    """A CDN's burst allowance: the first part comes fast, then the connection is capped. The split
    is decided again at each commit, so the rest does not crawl over one connection."""
    big = random.Random(8).randbytes(12 * 2**20 + 5)
    hub.add_repo("org/burst", {"model.safetensors": big, "config.json": b"{}"})
    hub.rate_limit(4_000_000, burst=3 * 2**19)  # 1.5 MiB at once, then 4 MB/s per connection
    env = _env(hub, FETCHER_SPLIT_BELOW="20M")  # below a fifth of that rate is slow whatever fetcher does

    run = run_fetcher("--source", "hf://org/burst", "--dest", str(tmp_path / "dest"), env=env)

    assert run.code == 0, run.stderr
    assert tree(tmp_path / "dest")["model.safetensors"] == big
    assert run.event("splitting")["at_byte"] == 8 * 2**20  # not at the first part: it came fast
    ranges = [r.headers.get("range", "") for r in hub.requests if r.server == "cdn" and "safetensors" in r.path]
    starts = sorted(int(r.removeprefix("bytes=").split("-")[0]) for r in ranges if r)
    assert starts and starts[0] == 8 * 2**20, ranges  # the journalled stream is not fetched again
