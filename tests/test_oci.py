"""oci:// sources: what a user writes, the credentials Kubernetes holds, and what each layer becomes."""

from __future__ import annotations

import base64
import io
import json
import platform
import random
import tarfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from fetcher.errors import ArchiveError, UsageError
from fetcher.schemes import check_source, parse_oci
from fetcher.sources.oci import Credentials, layer_file, parse_challenge, registry_credentials
from tests.conftest import Run, make_tar, run_fetcher, run_measured, sha256, tree
from tests.faults_support import Background
from tests.registry import (
    DOCKER_MANIFEST_LIST,
    MODEL_FILEPATH,
    OCI_MANIFEST,
    AccessLine,
    Blob,
    Endless,
    EndlessRegistry,
    Registry,
)

MODEL_DOC = "application/vnd.cncf.model.doc.v1"
DOCKER_MODEL_CONFIG = "application/vnd.docker.ai.model.config.v0.1+json"

HEX = "ab" * 32


@pytest.mark.parametrize(
    ("source", "registry", "repo", "reference"),
    [
        ("oci://ghcr.io/org/model:v1", "ghcr.io", "org/model", "v1"),
        ("oci://127.0.0.1:5000/models/llama", "127.0.0.1:5000", "models/llama", "latest"),
        (f"oci://reg.example/m@sha256:{HEX}", "reg.example", "m", f"sha256:{HEX}"),
        (f"oci://reg.example/m:v2@sha256:{HEX}", "reg.example", "m", f"sha256:{HEX}"),  # the tag then ignored
        ("oci://docker.io/ubuntu:24.04", "docker.io", "library/ubuntu", "24.04"),
    ],
)
def test_references_as_docker_reads_them(source: str, registry: str, repo: str, reference: str) -> None:
    ref = parse_oci(check_source(source))
    assert (ref.registry, ref.repository, ref.reference) == (registry, repo, reference)


@pytest.mark.parametrize(
    "source",
    ["oci://ghcr.io/Org/Model:v1", "oci://ghcr.io/", "oci://ghcr.io/m@sha256:abc", "oci://ghcr.io/m:-bad"],
)
def test_a_malformed_reference_is_exit_2_with_the_forms_it_takes(source: str, tmp_path: Path) -> None:
    run = run_fetcher("--source", source, "--dest", str(tmp_path / "dest"))
    assert run.code == 2
    assert "oci://registry/repo:tag" in run.event("failed")["error"]


def _config(tmp_path: Path, auths: Mapping[str, object], **more: object) -> Path:
    path = tmp_path / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": auths, **more}))
    return path


@pytest.mark.parametrize("key", ["reg.example:5000", "https://reg.example:5000", "https://reg.example:5000/v2/"])
def test_credentials_under_any_key_docker_writes(tmp_path: Path, key: str) -> None:
    auth = base64.b64encode(b"robot:s3cr:et").decode()
    path = _config(tmp_path, {"other.example": {"auth": "eDp5"}, key: {"auth": auth}})
    assert registry_credentials(path, "reg.example:5000") == Credentials("robot", "s3cr:et")


def test_docker_hub_credentials_and_username_password_entries(tmp_path: Path) -> None:
    path = _config(tmp_path, {"https://index.docker.io/v1/": {"username": "me", "password": "pw"}})
    assert registry_credentials(path, "docker.io") == Credentials("me", "pw")
    assert registry_credentials(path, "ghcr.io") is None


def test_an_identity_token_entry_is_read_and_never_shown(tmp_path: Path) -> None:
    auth = base64.b64encode(b"00000000-0000-0000-0000-000000000000:").decode()
    path = _config(tmp_path, {"myreg.azurecr.io": {"auth": auth, "identitytoken": "refresh-secret"}})
    found = registry_credentials(path, "myreg.azurecr.io")
    assert found == Credentials("00000000-0000-0000-0000-000000000000", "", "refresh-secret")
    assert "refresh-secret" not in repr(found)


def test_a_malformed_auth_entry_is_a_usage_error_that_shows_no_secret(tmp_path: Path) -> None:
    path = _config(tmp_path, {"reg.example": {"auth": base64.b64encode(b"no-colon-secret").decode()}})
    with pytest.raises(UsageError) as caught:
        registry_credentials(path, "reg.example")
    assert "no-colon-secret" not in str(caught.value)


def test_a_challenge_is_read_into_its_parameters() -> None:
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.example/token",service="reg",scope="repository:m:pull"'
    )
    assert scheme == "bearer"
    assert params == {"realm": "https://auth.example/token", "service": "reg", "scope": "repository:m:pull"}
    two = parse_challenge('Bearer realm="https://a.example/token",service="reg", Basic realm="registry"')
    assert two == ("bearer", {"realm": "https://a.example/token", "service": "reg"})


MODELPACK = "application/vnd.cncf.model.manifest.v1+json"


@pytest.mark.parametrize(
    ("media_type", "annotations", "artifact_type", "path"),
    [
        ("application/vnd.cncf.model.weight.v1.raw", {"org.cncf.model.filepath": "w/model.safetensors"}, MODELPACK,
         "w/model.safetensors"),
        ("application/vnd.oci.image.layer.v1.tar", {"org.opencontainers.image.title": "config.json"},
         "application/vnd.unknown.artifact.v1", "config.json"),
        ("application/vnd.docker.ai.gguf.v3", {}, "application/vnd.docker.ai.model.config.v0.1+json",
         f"sha256-{HEX}.gguf"),
    ],
)  # fmt: skip
def test_each_kind_of_layer_becomes_the_file_its_artifact_names(
    media_type: str, annotations: dict[str, str], artifact_type: str, path: str
) -> None:
    assert layer_file(media_type, f"sha256:{HEX}", annotations, artifact_type) == (path, False)


@pytest.mark.parametrize(
    ("media_type", "annotations", "artifact_type", "name"),
    [
        ("application/vnd.cncf.model.doc.v1.tar+gzip", {"org.cncf.model.filepath": "docs"}, MODELPACK, "docs"),
        ("application/vnd.cncf.model.code.v1.tar", {}, MODELPACK, f"layer-{HEX[:12]}"),
        ("application/vnd.oci.image.layer.v1.tar+gzip",
         {"org.opencontainers.image.title": "tokenizer", "io.deis.oras.content.unpack": "true"},
         "application/vnd.unknown.artifact.v1", "tokenizer"),
    ],
)  # fmt: skip
def test_packed_directories_are_unpacked_at_the_root(
    media_type: str, annotations: dict[str, str], artifact_type: str, name: str
) -> None:
    assert layer_file(media_type, f"sha256:{HEX}", annotations, artifact_type) == (name, True)


@pytest.mark.parametrize(
    ("media_type", "annotations", "artifact_type", "said"),
    [
        ("application/vnd.oci.image.layer.v1.tar+gzip", {}, "application/vnd.oci.image.config.v1+json", "tar+gzip"),
        ("application/vnd.cncf.model.weight.v1.raw", {}, MODELPACK, "org.cncf.model.filepath"),
        ("application/x-foo", {}, "application/vnd.unknown.artifact.v1", "application/x-foo"),
    ],
)  # fmt: skip
def test_a_layer_that_is_no_models_file_is_refused_naming_it(
    media_type: str, annotations: dict[str, str], artifact_type: str, said: str
) -> None:
    with pytest.raises(ArchiveError) as caught:
        layer_file(media_type, f"sha256:{HEX}", annotations, artifact_type)
    assert said in str(caught.value)


# --- against Debian's docker-registry (tests/registry.py), artifacts pushed by the oras client ---------

WEIGHTS = random.Random(7).randbytes(3 * 2**20 + 5)
MODEL = {"model.safetensors": WEIGHTS, "config.json": b'{"hidden_size": 64}\n', "tokenizer/vocab.txt": b"a\nb\n"}


def _pull(registry: Registry, reference: str, dest: Path, *args: str, **env: str) -> Run:
    ca = {"SSL_CERT_FILE": str(registry.ca_file)} if registry.ca_file else {}
    plain = () if registry.tls else ("--oci-plain-http",)
    return run_fetcher("--source", f"oci://{reference}", "--dest", str(dest), *plain, *args, env=ca | env)


def _fetcher_requests(registry: Registry) -> list[AccessLine]:
    return [line for line in registry.access_log() if line.user_agent.startswith("fetcher/")]


@pytest.mark.fault("a ModelPack artifact pulled by tag: every layer verified, the digest recorded", exit=0, area="oci")
def test_a_modelpack_artifact_lands_as_its_files_pinned_to_its_digest(registry: Registry, tmp_path: Path) -> None:
    digest = registry.push_modelpack("org/llama", "v1", MODEL)
    dest = tmp_path / "dest"

    run = _pull(registry, registry.ref("org/llama", "v1"), dest)

    assert run.code == 0, run.stderr
    assert tree(dest) == MODEL
    assert run.event("published")["identity"].startswith(f"oci:{digest} linux/")
    assert digest in run.event("resolved")["note"]
    marker = json.loads(next((dest / ".fetcher").glob("*.json")).read_text())
    assert {o["path"]: o["digest"] for o in marker["objects"]} == {p: "sha256:" + sha256(d) for p, d in MODEL.items()}

    before = len(_fetcher_requests(registry))
    again = _pull(registry, registry.ref("org/llama", "v1"), dest)
    assert again.code == 0 and again.event("already present")
    assert [(r.method, "/manifests/v1" in r.path) for r in _fetcher_requests(registry)[before:] if r.status != 401] == [
        ("HEAD", True)
    ]  # one HEAD by tag, nothing downloaded

    before = len(_fetcher_requests(registry))
    pinned = _pull(registry, registry.ref("org/llama", digest), tmp_path / "pinned")
    assert pinned.code == 0 and tree(tmp_path / "pinned") == MODEL
    assert _pull(registry, registry.ref("org/llama", digest), tmp_path / "pinned").event("already present")
    after_first = [r for r in _fetcher_requests(registry)[before:] if "manifests" in r.path]
    assert all(digest in r.path for r in after_first)  # by digest from the start: no tag lookup


def test_a_restart_pinned_by_digest_makes_no_request(registry_http: Registry, tmp_path: Path) -> None:
    digest = registry_http.push_modelpack("org/llama", None, MODEL)
    dest = tmp_path / "dest"
    assert _pull(registry_http, registry_http.ref("org/llama", digest), dest).code == 0
    before = len(registry_http.access_log())

    again = _pull(registry_http, registry_http.ref("org/llama", digest), dest)

    assert again.code == 0 and again.event("already present")
    assert len(registry_http.access_log()) == before


def test_oras_files_land_by_their_title_and_a_directory_unpacks_as_oras_does(
    registry: Registry, tmp_path: Path
) -> None:
    files = {"model.safetensors": WEIGHTS, "config.json": b"{}\n"}
    registry.push_oras(
        "org/files", "v1", files, {"tokenizer": {"tokenizer.json": b'{"v": 1}', "sub/merges.txt": b"a b"}}
    )

    run = _pull(registry, registry.ref("org/files", "v1"), tmp_path / "files")

    assert run.code == 0, run.stderr
    unpacked = {"tokenizer/tokenizer.json": b'{"v": 1}', "tokenizer/sub/merges.txt": b"a b"}
    assert tree(tmp_path / "files") == files | unpacked  # tokenizer/tokenizer.json, not tokenizer/tokenizer/...

    # A packed directory is selected by its name, as the directory it is (its files are not known before).
    for n, pattern in enumerate(["tokenizer/", "tokenizer/*", "tokenizer"]):
        chosen = _pull(registry, registry.ref("org/files", "v1"), tmp_path / f"only-{n}", "--include", pattern)
        assert chosen.code == 0, chosen.stderr  # 'tokenizer/' was exit 2: nothing to fetch
        assert tree(tmp_path / f"only-{n}") == unpacked
    plan = _pull(registry, registry.ref("org/files", "v1"), tmp_path / "plan", "--dry-run")
    shown = {f["path"]: f for f in json.loads(plan.stdout)["artifacts"][0]["files"]}
    assert "unpacked" in shown["tokenizer"] and "unpacked" not in shown["config.json"]  # a tar, not a file
    left = _pull(registry, registry.ref("org/files", "v1"), tmp_path / "left", "--exclude", "tokenizer/")
    assert left.code == 0, left.stderr
    assert tree(tmp_path / "left") == files


def test_modelpack_tar_layers_unpack_at_the_root_and_a_hostile_one_is_exit_5(
    registry: Registry, tmp_path: Path
) -> None:
    docs = Blob(make_tar({"docs/README.md": b"# model\n", "docs/LICENSE": b"MIT\n"}), f"{MODEL_DOC}.tar+gzip")
    docs.annotations[MODEL_FILEPATH] = "docs"
    registry.push_modelpack("org/llama", "v1", {"model.safetensors": WEIGHTS, "docs": docs})
    run = _pull(registry, registry.ref("org/llama", "v1"), tmp_path / "dest")
    assert run.code == 0, run.stderr
    assert tree(tmp_path / "dest") == {
        "model.safetensors": WEIGHTS,
        "docs/README.md": b"# model\n",
        "docs/LICENSE": b"MIT\n",
    }
    assert _pull(registry, registry.ref("org/llama", "v1"), tmp_path / "dest").event("already present")

    evil = Blob(make_tar({"../escape.txt": b"x"}), f"{MODEL_DOC}.tar+gzip")
    registry.push_modelpack("org/evil", "v1", {"model.safetensors": WEIGHTS, "docs": evil})
    refused = _pull(registry, registry.ref("org/evil", "v1"), tmp_path / "evil")
    assert refused.code == 5
    assert not (tmp_path / "escape.txt").exists()
    assert not (tmp_path / "evil").exists() or tree(tmp_path / "evil") == {}


@pytest.mark.fault("a layer corrupted in the registry's storage", exit=4, area="oci")
def test_a_corrupted_blob_is_exit_4_and_nothing_is_published(registry: Registry, tmp_path: Path) -> None:
    registry.push_modelpack("org/llama", "v1", MODEL)
    path = registry.blob_path("sha256:" + sha256(WEIGHTS))
    data = bytearray(path.read_bytes())
    data[1000] ^= 1
    path.write_bytes(bytes(data))

    run = _pull(registry, registry.ref("org/llama", "v1"), tmp_path / "dest")

    assert run.code == 4
    assert "sha256 mismatch" in run.event("failed")["error"]
    assert not (tmp_path / "dest" / "model.safetensors").exists()


def test_a_layer_missing_from_the_registry_is_exit_3_and_a_first_run_leaves_nothing(
    registry: Registry, tmp_path: Path
) -> None:
    # The missing layer is the only one: with others beside it, whether their bytes arrive before the
    # 404 is a race, and a spool holding bytes is rightly kept for a restart to resume from.
    registry.push_modelpack("org/gone", "v1", {"model.safetensors": WEIGHTS})
    registry.blob_path("sha256:" + sha256(WEIGHTS)).unlink()

    run = _pull(registry, registry.ref("org/gone", "v1"), tmp_path / "dest")

    assert run.code == 3
    assert "is missing from" in run.event("failed")["error"], run.stderr
    assert not (tmp_path / "dest").exists()  # was dest/.fetcher, its lock and empty .incomplete files


@pytest.mark.fault("a missing tag", exit=3, area="oci")
def test_a_missing_tag_is_exit_3_naming_it(registry: Registry, tmp_path: Path) -> None:
    registry.push_modelpack("org/llama", "v1", MODEL)
    run = _pull(registry, registry.ref("org/llama", "v9"), tmp_path / "dest")
    assert run.code == 3
    assert "org/llama:v9 was not found" in run.event("failed")["error"]
    assert run.all("retrying") == []
    nameless = _pull(registry, registry.ref("org/nosuch", "v1"), tmp_path / "nosuch")
    assert nameless.code == 3  # the HEAD's 404 cannot say which is missing: both are named
    assert "check the repository's name and the tag" in nameless.event("failed")["error"]


def test_https_to_a_plain_http_registry_is_exit_3_pointing_at_the_flag(registry_http: Registry, tmp_path: Path) -> None:
    registry_http.push_modelpack("org/llama", "v1", MODEL)
    source = f"oci://{registry_http.ref('org/llama', 'v1')}"
    run = run_fetcher("--source", source, "--dest", str(tmp_path / "dest"))  # no --oci-plain-http: TLS is tried
    assert run.code == 3
    assert "--oci-plain-http" in run.event("failed")["error"]
    assert run.all("retrying") == []


def test_basic_auth_from_a_docker_config_and_wrong_credentials_are_final(
    registry_basic: Registry, tmp_path: Path
) -> None:
    registry_basic.push_modelpack("org/llama", "v1", MODEL)
    good = registry_basic.docker_config(tmp_path / "good.json", key=f"https://{registry_basic.host}")
    run = _pull(
        registry_basic, registry_basic.ref("org/llama", "v1"), tmp_path / "dest", FETCHER_REGISTRY_AUTH_FILE=str(good)
    )
    assert run.code == 0, run.stderr
    assert tree(tmp_path / "dest") == MODEL
    assert registry_basic.password not in run.stderr

    bad = registry_basic.docker_config(tmp_path / "bad.json", password="wrong-password")
    before = len(_fetcher_requests(registry_basic))
    refused = _pull(
        registry_basic, registry_basic.ref("org/llama", "v1"), tmp_path / "d2", FETCHER_REGISTRY_AUTH_FILE=str(bad)
    )
    assert refused.code == 3
    assert "check --registry-auth-file" in refused.event("failed")["error"]
    assert refused.all("retrying") == []
    assert len(_fetcher_requests(registry_basic)) - before <= 2  # the challenge, then the refusal


@pytest.mark.fault("token auth: credentials go to the token service only, then a bearer token", exit=0, area="oci")
def test_token_auth_with_credentials_and_anonymous_public_pulls(registry_token: Registry, tmp_path: Path) -> None:
    registry_token.push_modelpack("org/private", "v1", MODEL)
    registry_token.push_modelpack("public/model", "v1", MODEL)
    config = registry_token.docker_config(tmp_path / "config.json")

    run = _pull(
        registry_token, registry_token.ref("org/private", "v1"), tmp_path / "a", FETCHER_REGISTRY_AUTH_FILE=str(config)
    )
    assert run.code == 0, run.stderr
    assert tree(tmp_path / "a") == MODEL
    sent = [r.headers.get("Authorization", "") for r in registry_token.token.requests]
    assert sent and all(h.startswith("Basic ") for h in sent)

    public = _pull(registry_token, registry_token.ref("public/model", "v1"), tmp_path / "b")
    assert public.code == 0, public.stderr
    assert registry_token.token.requests[-1].headers.get("Authorization") is None  # anonymous, as ghcr.io wants

    private = _pull(registry_token, registry_token.ref("org/private", "v1"), tmp_path / "c")
    assert private.code == 3
    assert private.all("retrying") == []


@pytest.mark.fault("blobs redirected to another host: it never gets the credentials", exit=0, area="oci")
def test_blobs_redirected_to_another_host_get_no_credentials(registry_redirect: Registry, tmp_path: Path) -> None:
    registry_redirect.push_modelpack("org/llama", "v1", MODEL)
    config = registry_redirect.docker_config(tmp_path / "config.json")

    run = _pull(
        registry_redirect,
        registry_redirect.ref("org/llama", "v1"),
        tmp_path / "dest",
        FETCHER_REGISTRY_AUTH_FILE=str(config),
    )

    assert run.code == 0, run.stderr
    assert tree(tmp_path / "dest") == MODEL
    assert registry_redirect.blobs is not None and registry_redirect.blobs.requests
    for request in registry_redirect.blobs.requests:
        assert "authorization" not in {k.lower() for k in request.headers}, request.headers


def test_the_index_gives_this_nodes_platform_or_the_one_asked_for(registry: Registry, tmp_path: Path) -> None:
    amd = registry.push_modelpack("org/multi", None, {"arch.txt": b"amd64\n"})
    arm = registry.push_modelpack("org/multi", None, {"arch.txt": b"arm64\n"})
    registry.push_index("org/multi", "v1", {"linux/amd64": amd, "linux/arm64/v8": arm})
    node = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), "")

    run = _pull(registry, registry.ref("org/multi", "v1"), tmp_path / "node")
    chosen = _pull(registry, registry.ref("org/multi", "v1"), tmp_path / "arm", "--oci-platform", "linux/arm64")
    missing = _pull(registry, registry.ref("org/multi", "v1"), tmp_path / "s390", "--oci-platform", "linux/s390x")

    assert run.code == 0, run.stderr
    assert tree(tmp_path / "node") == {"arch.txt": f"{node}\n".encode()}
    assert chosen.code == 0 and tree(tmp_path / "arm") == {"arch.txt": b"arm64\n"}
    assert missing.code == 3
    assert "offers linux/amd64, linux/arm64/v8" in missing.event("failed")["error"]


def test_a_docker_manifest_list_gives_this_nodes_linux_platform_or_the_one_asked_for(
    registry: Registry, tmp_path: Path
) -> None:
    """A multi-platform modelcar as ``docker buildx`` pushes it: a manifest list of schema 2 images. A windows
    image of this node's architecture comes first, so only the os tells them apart."""
    platforms = ("windows/amd64", "linux/amd64", "linux/arm64/v8", "linux/arm/v7")
    images = {
        name: registry.push_layers("org/multi", None, [make_tar({"models/arch.txt": name.encode()})], docker=True)
        for name in platforms
    }
    digest = registry.push_index("org/multi", "v1", images, media_type=DOCKER_MANIFEST_LIST)
    node = {"x86_64": "amd64", "aarch64": "arm64/v8"}.get(platform.machine(), "")
    ref = registry.ref("org/multi", "v1")

    run = _pull(registry, ref, tmp_path / "node", "--oci-path", "/models")
    arm = _pull(registry, ref, tmp_path / "arm", "--oci-path", "/models", "--oci-platform", "linux/arm64")
    v7 = _pull(registry, ref, tmp_path / "v7", "--oci-path", "/models", "--oci-platform", "linux/arm/v7")

    assert run.code == 0, run.stderr
    assert tree(tmp_path / "node") == {"arch.txt": f"linux/{node}".encode()}
    assert run.event("published")["identity"].startswith(f"oci:{digest} linux/")
    assert arm.code == 0 and tree(tmp_path / "arm") == {"arch.txt": b"linux/arm64/v8"}
    assert v7.code == 0 and tree(tmp_path / "v7") == {"arch.txt": b"linux/arm/v7"}


def _push_layered_image(registry: Registry, repo: str, layers: list[dict[str, bytes | tuple[str, Any]]]) -> str:
    """An ordinary image, hand-layered (real tar+gzip layers, the image config type): whiteouts exactly as written."""
    return registry.push_layers(repo, "v1", [make_tar(m) for m in layers])


def test_an_ordinary_image_is_exit_5_asking_for_oci_path(registry: Registry, tmp_path: Path) -> None:
    _push_layered_image(registry, "org/app", [{"bin/app": b"\x7fELF"}])

    run = _pull(registry, registry.ref("org/app", "v1"), tmp_path / "dest")

    assert run.code == 5
    assert "--oci-path" in run.event("failed")["error"]


@pytest.mark.fault(
    "a modelcar's layers: whiteouts and opaque directories honoured, only --oci-path kept", exit=0, area="oci"
)
def test_oci_path_applies_the_layers_with_their_whiteouts_and_keeps_only_that_directory(
    registry: Registry, tmp_path: Path
) -> None:
    layers: list[dict[str, bytes | tuple[str, Any]]] = [
        {"etc/passwd": b"root:x:0:0\n", "models/config.json": b"v1", "models/old.bin": b"old",
         "models/tok/a.txt": b"a", "models/tok/b.txt": b"b", "models/gone/x": b"x"},
        {"models/config.json": b"v2", "models/.wh.old.bin": b"", "models/tok/.wh..wh..opq": b"",
         "models/tok/c.txt": b"c", "models/.wh.gone": b""},
        {"models/w.bin": WEIGHTS, "usr/lib/libx.so": b"lib"},
        {"etc/hostname": b"modelcar\n"},  # the top layer adds nothing under /models
    ]  # fmt: skip
    digest = _push_layered_image(registry, "org/modelcar", layers)
    dest = tmp_path / "dest"

    run = _pull(registry, registry.ref("org/modelcar", "v1"), dest, "--oci-path", "/models")

    assert run.code == 0, run.stderr
    assert tree(dest) == {"config.json": b"v2", "tok/c.txt": b"c", "w.bin": WEIGHTS}
    assert run.event("published")["identity"].endswith(" /models")
    assert digest in run.event("published")["identity"]
    assert _pull(registry, registry.ref("org/modelcar", "v1"), dest, "--oci-path", "/models").event("already present")

    elsewhere = _pull(registry, registry.ref("org/modelcar", "v1"), tmp_path / "none", "--oci-path", "/data")
    assert elsewhere.code == 5
    assert "nothing under /data" in elsewhere.event("failed")["error"]


def test_include_with_an_image_is_a_usage_error(registry: Registry, tmp_path: Path) -> None:
    _push_layered_image(registry, "org/modelcar", [{"models/w.bin": b"w"}])
    run = _pull(
        registry, registry.ref("org/modelcar", "v1"), tmp_path / "d", "--oci-path", "/models", "--include", "*.bin"
    )
    assert run.code == 2
    assert "not of an image" in run.event("failed")["error"]


def test_oci_path_on_a_model_artifact_is_a_usage_error(registry: Registry, tmp_path: Path) -> None:
    registry.push_modelpack("org/llama", "v1", MODEL)
    run = _pull(registry, registry.ref("org/llama", "v1"), tmp_path / "dest", "--oci-path", "/models")
    assert run.code == 2
    assert "--oci-path applies to an ordinary image" in run.event("failed")["error"]


@pytest.mark.xdist_group("containers")
def test_a_modelcar_built_and_pushed_by_podman(registry_basic: Registry, tmp_path: Path) -> None:
    files = {"models/config.json": b'{"a": 1}\n', "models/model.safetensors": WEIGHTS}
    registry_basic.push_image("org/modelcar", "v1", [{"models/config.json": b"old"}, files])
    config = registry_basic.docker_config(tmp_path / "config.json")
    ref = registry_basic.ref("org/modelcar", "v1")

    run = _pull(registry_basic, ref, tmp_path / "dest", "--oci-path", "/models", FETCHER_REGISTRY_AUTH_FILE=str(config))

    assert run.code == 0, run.stderr
    assert tree(tmp_path / "dest") == {"config.json": b'{"a": 1}\n', "model.safetensors": WEIGHTS}


@pytest.mark.fault("kill -9 mid-pull: the restart fetches no verified layer again", exit=0, area="oci")
def test_kill_9_mid_pull_then_a_restart_fetches_no_verified_layer_again(
    registry_redirect: Registry, tmp_path: Path
) -> None:
    big = random.Random(9).randbytes(3 * 2**20 + 1)
    files = {"model.safetensors": big, "config.json": b"{}\n", "tokenizer.json": b'{"v": 1}\n'}
    registry_redirect.push_modelpack("org/llama", "v1", files)
    config = registry_redirect.docker_config(tmp_path / "config.json")
    dest = tmp_path / "dest"
    env = {"SSL_CERT_FILE": str(registry_redirect.ca_file), "FETCHER_REGISTRY_AUTH_FILE": str(config)}
    args = ("--source", f"oci://{registry_redirect.ref('org/llama', 'v1')}", "--dest", str(dest), "--part-size", "1Mi")
    store = registry_redirect.blobs
    assert store is not None
    store.rate = 1_000_000  # the big layer takes seconds, the small ones a moment
    first = Background(*args, env=env)
    deadline = time.monotonic() + 60
    while len([p for p in dest.glob(".fetcher/download-*/files/*") if not p.name.endswith(".incomplete")]) < 2:
        assert first.process.poll() is None and time.monotonic() < deadline, "".join(first.lines)
        time.sleep(0.05)
    first.process.kill()
    first.finish()
    store.rate = None
    before = len(store.requests)

    again = run_fetcher(*args, env=env)

    assert again.code == 0, again.stderr
    assert tree(dest) == files
    fetched = [r.path for r in store.requests[before:] if r.method == "GET"]
    for name in ("config.json", "tokenizer.json"):
        assert not any(sha256(files[name]) in path for path in fetched), (name, fetched)
    assert any(sha256(big) in path for path in fetched)
    assert again.event("resuming")["files_verified_before"] == 2


@pytest.mark.fault("a registry token that expires mid-pull is renewed", exit=0, area="oci")
def test_a_token_that_expires_mid_pull_is_renewed(make_registry: Callable[..., Registry], tmp_path: Path) -> None:
    registry = make_registry(auth="token", redirect=True, token_lifetime=1)
    files = {"a.bin": random.Random(3).randbytes(1_500_000), "b.bin": b"second\n"}
    registry.push_modelpack("org/llama", "v1", files)
    config = registry.docker_config(tmp_path / "config.json")
    assert registry.blobs is not None and registry.token is not None
    registry.blobs.rate = 500_000  # a.bin takes 3 s: b.bin is asked for with a token past its 1-2 s
    args = ("--concurrency", "1", "--part-size", "1Mi")

    run = _pull(
        registry, registry.ref("org/llama", "v1"), tmp_path / "dest", *args, FETCHER_REGISTRY_AUTH_FILE=str(config)
    )

    assert run.code == 0, run.stderr
    assert tree(tmp_path / "dest") == files
    assert registry.token.issued >= 2
    assert run.all("retrying") == []  # renewed within the request, not retried


@pytest.mark.fault("a manifest whose bytes are not its digest's", exit=4, area="oci")
def test_a_manifest_that_does_not_match_its_digest_is_exit_4(registry: Registry, tmp_path: Path) -> None:
    digest = registry.push_modelpack("org/llama", "v1", MODEL)
    stored = registry.blob_path(digest)
    stored.write_bytes(stored.read_bytes().replace(b'"schemaVersion":2', b'"schemaVersion": 2'))

    run = _pull(registry, registry.ref("org/llama", digest), tmp_path / "dest")

    assert run.code == 4
    assert f"asked for {digest}" in run.event("failed")["error"]
    assert not (tmp_path / "dest").exists() or tree(tmp_path / "dest") == {}


def test_two_layers_on_one_path_are_exit_5(registry: Registry, tmp_path: Path) -> None:
    twin = Blob(b"other", "application/vnd.cncf.model.weight.v1.raw", {"org.cncf.model.filepath": "config.json"})
    registry.push_modelpack("org/twins", "v1", {"config.json": b"{}", "twin": twin})

    run = _pull(registry, registry.ref("org/twins", "v1"), tmp_path / "dest")

    assert run.code == 5
    assert "config.json" in run.event("failed")["error"]


def test_a_docker_model_artifact_lands_as_its_files(registry: Registry, tmp_path: Path) -> None:
    gguf = random.Random(4).randbytes(100_000)
    layers = [
        registry.push_blob("ai/smollm", Blob(gguf, "application/vnd.docker.ai.gguf.v3")),
        registry.push_blob(
            "ai/smollm",
            Blob(b"MIT\n", "application/vnd.docker.ai.license", {"org.opencontainers.image.title": "LICENSE"}),
        ),
    ]
    config = registry.push_blob("ai/smollm", Blob(b'{"config": {"format": "gguf"}}', DOCKER_MODEL_CONFIG))
    registry.put_manifest(
        "ai/smollm", "v1", {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": layers}
    )

    run = _pull(registry, registry.ref("ai/smollm", "v1"), tmp_path / "dest")

    assert run.code == 0, run.stderr
    assert tree(tmp_path / "dest") == {f"sha256-{sha256(gguf)}.gguf": gguf, "LICENSE": b"MIT\n"}


def test_image_layers_as_a_container_sees_them_or_a_refusal(registry: Registry, tmp_path: Path) -> None:
    """What a review found: each case published other bytes than the image holds, or refused a valid image."""
    cases: dict[str, tuple[list[dict[str, bytes | tuple[str, Any]]], int, dict[str, bytes]]] = {
        "a hardlink keeps its own layer's bytes when a later layer replaces its target": (
            [{"models/a": b"X", "models/b": ("hardlink", "models/a")}, {"models/a": b"Y"}], 0, {"a": b"Y", "b": b"X"}),
        "a hardlink to a lower layer's file": ([{"models/a": b"X"}, {"models/b": ("hardlink", "models/a")}], 5, {}),
        "an upper layer's symlink over a lower directory, leading out": (
            [{"models/d/w": b"w", "models/x": b"x"}, {"models/d": ("symlink", "../../etc")}], 5, {}),
        "an upper layer's directory over a lower symlink": (
            [{"models/d": ("symlink", "../../etc")}, {"models/d/w": b"w"}], 0, {"d/w": b"w"}),
        "an upper layer's file replaces a lower one's": (
            [{"models/w": b"old"}, {"models/w": b"new", "models/x": b"x"}], 0, {"w": b"new", "x": b"x"}),
        "parents a tar does not list are still the upper layer's": (
            [{"models/sub": b"a file below"}, {"models/sub/a": b"a"}], 0, {"sub/a": b"a"}),
        "a device outside --oci-path": ([{"dev/null": ("chr", None), "models/w": b"w"}], 0, {"w": b"w"}),
        "an empty --oci-path": ([{"models/": ("dir", 0o755), "mnt/models/w": b"w"}], 5, {}),
    }  # fmt: skip
    for number, (case, (layers, code, files)) in enumerate(cases.items()):
        repo = f"org/case{number}"
        _push_layered_image(registry, repo, layers)
        dest = tmp_path / f"d{number}"

        run = _pull(registry, registry.ref(repo, "v1"), dest, "--oci-path", "/models")

        assert run.code == code, (case, run.stderr[-600:])
        assert (tree(dest) if dest.exists() else {}) == files, case


def test_a_later_copy_of_a_path_in_one_layer_replaces_the_first(registry: Registry, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as layer:  # an appended tar: the same name twice
        for data in (b"old", b"new"):
            info = tarfile.TarInfo("models/w")
            info.size = len(data)
            layer.addfile(info, io.BytesIO(data))
    registry.push_layers("org/twice", "v1", [buffer.getvalue()])

    run = _pull(registry, registry.ref("org/twice", "v1"), tmp_path / "dest", "--oci-path", "/models")

    assert run.code == 0, run.stderr
    assert tree(tmp_path / "dest") == {"w": b"new"}


def test_tar_layers_of_an_artifact_share_one_budget_and_no_path(registry: Registry, tmp_path: Path) -> None:
    one = Blob(make_tar({"a/x.txt": b"1" * 600}), f"{MODEL_DOC}.tar+gzip", {MODEL_FILEPATH: "a"})
    two = Blob(make_tar({"b/y.txt": b"2" * 600}), f"{MODEL_DOC}.tar+gzip", {MODEL_FILEPATH: "b"})
    registry.push_modelpack("org/two", "v1", {"a": one, "b": two})
    over = _pull(registry, registry.ref("org/two", "v1"), tmp_path / "over", "--max-unpacked-size", "1000")
    assert over.code == 5  # 600 + 600: each layer alone fits, the model does not
    assert "--max-unpacked-size" in over.event("failed")["error"]

    same = Blob(make_tar({"a/x.txt": b"other"}), f"{MODEL_DOC}.tar+gzip", {MODEL_FILEPATH: "a2"})
    registry.push_modelpack("org/clash", "v1", {"a": one, "a2": same})
    clash = _pull(registry, registry.ref("org/clash", "v1"), tmp_path / "clash")
    assert clash.code == 5
    assert "another layer" in clash.event("failed")["error"]

    raw = _pull_after_push(registry, "org/rawclash", {"a/x.txt": b"raw", "a": one}, tmp_path / "raw")
    assert raw.code == 5  # a raw layer's file is also in a packed one: exit 5, not a disk error
    assert "packed layer" in raw.event("failed")["error"]


def test_a_raw_and_a_packed_layer_of_one_name_are_exit_5_and_nothing_is_published(
    registry: Registry, tmp_path: Path
) -> None:
    """Each layer is its own file or tree: two of one name are refused, whatever kind each is."""
    packed = Blob(make_tar({"b/x.txt": b"packed"}), f"{MODEL_DOC}.tar+gzip", {MODEL_FILEPATH: "a"})
    mixed = _pull_after_push(registry, "org/mixed", {"a": b"raw bytes", "a-packed": packed}, tmp_path / "mixed")
    assert mixed.code == 5, mixed.stderr  # was exit 0, with the tar's bytes published as the raw file 'a'
    assert "lands on 'a'" in mixed.event("failed")["error"]
    assert not (tmp_path / "mixed").exists() or tree(tmp_path / "mixed") == {}

    other = Blob(make_tar({"c/y.txt": b"other"}), f"{MODEL_DOC}.tar+gzip", {MODEL_FILEPATH: "a"})
    both = _pull_after_push(registry, "org/bothpacked", {"a-one": packed, "a-two": other}, tmp_path / "both")
    assert both.code == 5  # was one layer unpacked twice, the other never, named as a member clash
    assert "lands on 'a'" in both.event("failed")["error"]


def test_a_raw_layer_under_a_link_from_a_packed_one_is_exit_5(registry: Registry, tmp_path: Path) -> None:
    """A file beside the packed layers is never written through a link one of them made."""
    linked = Blob(
        make_tar({"real/keep.txt": b"keep", "link": ("symlink", "real")}),
        f"{MODEL_DOC}.tar+gzip",
        {MODEL_FILEPATH: "real"},
    )
    run = _pull_after_push(registry, "org/linked", {"link/w.bin": b"weights", "real": linked}, tmp_path / "dest")
    assert run.code == 5, run.stderr  # was exit 0, with the file at real/w.bin
    assert "'link'" in run.event("failed")["error"]
    assert not (tmp_path / "dest").exists() or tree(tmp_path / "dest") == {}


def _pull_after_push(registry: Registry, repo: str, files: dict[str, bytes | Blob], dest: Path) -> Run:
    registry.push_modelpack(repo, "v1", files)
    return _pull(registry, registry.ref(repo, "v1"), dest)


# --- docker config.json entries beyond a user and password ---------------------------------------------


@pytest.mark.fault("an identity token (docker login's OAuth2 refresh token) exchanged for a token", exit=0, area="oci")
def test_an_identity_token_is_exchanged_at_the_token_service_and_never_logged(
    registry_token: Registry, tmp_path: Path
) -> None:
    registry_token.push_modelpack("org/private", "v1", MODEL)
    identity = registry_token.identity_token
    config = registry_token.docker_config(tmp_path / "config.json", identity_token=identity)
    ref = registry_token.ref("org/private", "v1")

    run = _pull(registry_token, ref, tmp_path / "dest", FETCHER_REGISTRY_AUTH_FILE=str(config))

    assert run.code == 0, run.stderr
    assert tree(tmp_path / "dest") == MODEL
    assert registry_token.token is not None
    sent = registry_token.token.requests
    assert [(r.method, r.status) for r in sent] == [("POST", 200)]
    assert sent[0].form["grant_type"] == ["refresh_token"] and sent[0].form["refresh_token"] == [identity]
    assert sent[0].form["scope"] == ["repository:org/private:pull"]
    assert "Authorization" not in sent[0].headers and identity not in sent[0].path
    assert identity not in run.stderr

    wrong = registry_token.docker_config(tmp_path / "wrong.json", identity_token="not-the-identity-token")
    refused = _pull(registry_token, ref, tmp_path / "refused", FETCHER_REGISTRY_AUTH_FILE=str(wrong))
    assert refused.code == 3
    assert "token service refused the identity token (HTTP 400)" in refused.error
    assert "not-the-identity-token" not in refused.stderr
    assert refused.all("retrying") == []


def test_a_credential_helper_is_named_once_and_the_pull_goes_on_anonymously(
    registry_token: Registry, tmp_path: Path
) -> None:
    registry_token.push_modelpack("org/private", "v1", MODEL)
    registry_token.push_modelpack("public/model", "v1", MODEL)
    host = registry_token.host
    helpers = {  # what `docker login` leaves in a config.json on a desktop, and with amazon-ecr-credential-helper
        "docker-credential-desktop": _config(tmp_path / "desktop", {host: {}}, credsStore="desktop"),
        "docker-credential-ecr-login": _config(tmp_path / "ecr", {}, credHelpers={host: "ecr-login"}),
    }
    for helper, config in helpers.items():
        public = _pull(registry_token, registry_token.ref("public/model", "v1"), tmp_path / helper / "public",
                       FETCHER_REGISTRY_AUTH_FILE=str(config))  # fmt: skip
        private = _pull(registry_token, registry_token.ref("org/private", "v1"), tmp_path / helper / "private",
                        FETCHER_REGISTRY_AUTH_FILE=str(config))  # fmt: skip

        assert public.code == 0, public.stderr
        assert private.code == 3
        assert "refused access to org/private" in private.error
        for run in (public, private):
            (warning,) = run.all("credential helper not run")
            assert warning["level"] == "warning" and warning["helper"] == helper
            assert "only the auths entries" in warning["reason"]
            assert "kubernetes.io/dockerconfigjson" in warning["reason"]

    entry = {host: {"auth": registry_token.basic_auth()}}
    both = _config(tmp_path / "both", entry, credsStore="desktop", credHelpers={host: "ecr-login"})
    run = _pull(
        registry_token, registry_token.ref("org/private", "v1"), tmp_path / "dest", FETCHER_REGISTRY_AUTH_FILE=str(both)
    )
    assert run.code == 0, run.stderr  # an auths entry of its own: read, and no helper named
    assert run.all("credential helper not run") == []


# --- a registry that never stops talking ------------------------------------------------------------------

ENDLESS: dict[Endless, tuple[str, str]] = {
    "manifest": ("a manifest", "the registry sent a manifest larger than 4194304 bytes"),
    "error": ("an error body", "org/model@sha256:" + HEX + " was not found"),
    "token": ("a token service's answer", "token service (http://127.0.0.1:"),
}


@pytest.mark.parametrize(
    "endless",
    [
        pytest.param(key, marks=pytest.mark.fault(f"{what} that never ends: read up to a cap", exit=3, area="oci"))
        for key, (what, _) in ENDLESS.items()
    ],
)
def test_an_endless_answer_is_read_up_to_its_cap_and_no_further(endless: Endless, tmp_path: Path) -> None:
    with EndlessRegistry(endless) as hostile:
        source = f"oci://{hostile.host}/org/model@sha256:{HEX}"
        started = time.monotonic()
        code, log, peak_kib = run_measured("--source", source, "--oci-plain-http", "--dest", str(tmp_path / "d"))
        took = time.monotonic() - started
        sent = hostile.sent

    assert code == 3, log
    failed = [event for line in log.splitlines() if (event := json.loads(line)).get("event") == "failed"]
    assert len(failed) == 1 and ENDLESS[endless][1] in failed[0]["error"], log
    assert sent < 32 * 2**20, f"{sent} bytes sent: fetcher read on past its cap"
    assert peak_kib < 100 * 1024, f"peak RSS {peak_kib // 1024} MiB"
    assert took < 30
