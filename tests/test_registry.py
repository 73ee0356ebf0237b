"""The registry fixture itself (tests/registry.py): Debian's docker-registry in each auth mode, artifacts
pushed and pulled back with the real oras client, and what the oci:// tests rely on it for: a blob
corrupted on disk is served as is, the token service records what it was sent, redirected blob reads
reach 127.0.0.2 without credentials."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import socket
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_tar
from tests.registry import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_MANIFEST,
    MODEL_ARTIFACT,
    MODEL_CONFIG,
    MODEL_FILEPATH,
    MODEL_WEIGHT_RAW,
    OCI_INDEX,
    OCI_MANIFEST,
    SERVICE,
    TAR_GZIP,
    TITLE,
    UNPACK,
    Blob,
    Registry,
)
from tests.registry import DOCKER_MANIFEST_LIST as LIST

WEIGHTS = bytes(range(256)) * 400
ACCEPT = {"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"}


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def client(registry: Registry, **options: object) -> httpx.Client:
    return httpx.Client(verify=registry.verify(), **options)  # type: ignore[arg-type]


def test_anonymous_oras_push_and_pull(registry: Registry, tmp_path: Path) -> None:
    digest = registry.push_oras(
        "org/oras-model",
        "v1",
        {"model.safetensors": WEIGHTS, "config.json": b"{}\n"},
        {"tokenizer": {"tokenizer.json": b'{"vocab": {}}', "nested/merges.txt": b"a b\n"}},
    )
    manifest = json.loads(registry.get_manifest("org/oras-model", "v1"))
    assert digest == digest_of(registry.get_manifest("org/oras-model", digest))
    layers = {layer["annotations"][TITLE]: layer for layer in manifest["layers"]}
    assert set(layers) == {"model.safetensors", "config.json", "tokenizer"}
    directory = layers["tokenizer"]
    assert directory["mediaType"] == TAR_GZIP and directory["annotations"][UNPACK] == "true"
    with tarfile.open(fileobj=io.BytesIO(registry.get_blob("org/oras-model", directory["digest"]))) as archive:
        assert {"tokenizer/tokenizer.json", "tokenizer/nested/merges.txt"} <= set(archive.getnames())

    registry.oras(authenticated=False).pull(registry.ref("org/oras-model", "v1"), outdir=str(tmp_path))
    assert (tmp_path / "model.safetensors").read_bytes() == WEIGHTS
    assert (tmp_path / "tokenizer/tokenizer.json").read_bytes() == b'{"vocab": {}}'
    assert (tmp_path / "tokenizer/nested/merges.txt").read_bytes() == b"a b\n"


def test_modelpack_over_plain_http(registry_http: Registry) -> None:
    assert registry_http.url.startswith("http://") and registry_http.ca_file is None
    tar = make_tar({"docs/README.md": b"# model\n", "docs/LICENSE": b"Apache-2.0\n"}, compression="")
    digest = registry_http.push_modelpack(
        "org/modelpack",
        "v1",
        {"model/weights.bin": WEIGHTS, "docs": Blob(tar, "application/vnd.cncf.model.doc.v1.tar")},
        annotations={"org.opencontainers.image.version": "1"},
    )
    with client(registry_http) as http:
        response = http.get(f"{registry_http.url}/v2/org/modelpack/manifests/v1", headers=ACCEPT)
        assert response.status_code == 200, response.text
        assert response.headers["Docker-Content-Digest"] == digest == digest_of(response.content)
        assert response.headers["Content-Type"] == OCI_MANIFEST
        manifest = response.json()
        assert manifest["artifactType"] == MODEL_ARTIFACT and manifest["config"]["mediaType"] == MODEL_CONFIG
        weights, docs = manifest["layers"]
        assert weights["mediaType"] == MODEL_WEIGHT_RAW
        assert weights["annotations"] == {MODEL_FILEPATH: "model/weights.bin"}
        assert docs["annotations"] == {MODEL_FILEPATH: "docs"}
        blob = http.get(f"{registry_http.url}/v2/org/modelpack/blobs/{weights['digest']}")
        assert blob.content == WEIGHTS and blob.headers["Docker-Content-Digest"] == weights["digest"]
        ranged = http.get(blob.url, headers={"Range": "bytes=10-19"})
        assert ranged.status_code == 206 and ranged.content == WEIGHTS[10:20]
        config = http.get(f"{registry_http.url}/v2/org/modelpack/blobs/{manifest['config']['digest']}").json()
        assert config["modelfs"]["diffIds"] == [weights["digest"], docs["digest"]]


def test_basic_auth_and_docker_config(registry_basic: Registry, tmp_path: Path) -> None:
    registry_basic.push_oras("org/private", "v1", {"w.bin": WEIGHTS})
    url = f"{registry_basic.url}/v2/org/private/manifests/v1"
    with client(registry_basic) as http:
        anonymous = http.get(url, headers=ACCEPT)
        assert anonymous.status_code == 401
        assert anonymous.headers["WWW-Authenticate"].startswith("Basic realm=")
        assert http.get(url, headers=ACCEPT, auth=(registry_basic.username, "wrong")).status_code == 401
        assert http.get(url, headers=ACCEPT, auth=(registry_basic.username, registry_basic.password)).status_code == 200
    assert [(line.method, line.status) for line in registry_basic.access_log()[-3:]] == [
        ("GET", 401),
        ("GET", 401),
        ("GET", 200),
    ]

    config = registry_basic.docker_config(tmp_path / "docker/config.json")
    entry = json.loads(config.read_text())["auths"][registry_basic.host]
    assert base64.b64decode(entry["auth"]).decode() == f"{registry_basic.username}:{registry_basic.password}"
    pulled = registry_basic.oras(authenticated=False).pull(
        registry_basic.ref("org/private", "v1"), config_path=str(config), outdir=str(tmp_path / "out")
    )
    assert [Path(path).name for path in pulled] == ["w.bin"]
    assert Path(pulled[0]).read_bytes() == WEIGHTS


def test_a_blob_corrupted_on_disk_is_served_as_is(registry: Registry) -> None:
    registry.push_modelpack("org/corrupt", "v1", {"w.bin": WEIGHTS})
    layer = json.loads(registry.get_manifest("org/corrupt", "v1"))["layers"][0]
    stored = registry.blob_path(layer["digest"])
    assert stored.read_bytes() == WEIGHTS
    stored.write_bytes(b"X" + WEIGHTS[1:])
    served = registry.get_blob("org/corrupt", layer["digest"])
    assert len(served) == layer["size"] and digest_of(served) != layer["digest"]


def test_token_auth_records_what_clients_sent(registry_token: Registry, tmp_path: Path) -> None:
    token = registry_token.token
    assert token is not None
    registry_token.push_modelpack("org/private", "v1", {"w.bin": WEIGHTS})
    registry_token.push_modelpack("public/model", "v1", {"w.bin": WEIGHTS})
    assert token.requests == []  # the helpers' own pushes leave no trace there

    with client(registry_token) as http:
        challenge = http.get(f"{registry_token.url}/v2/public/model/manifests/v1", headers=ACCEPT)
        assert challenge.status_code == 401
        assert challenge.headers["WWW-Authenticate"] == (
            f'Bearer realm="{token.realm}",service="{SERVICE}",scope="repository:public/model:pull"'
        )

    pulled = registry_token.oras().pull(registry_token.ref("org/private", "v1"), outdir=str(tmp_path / "private"))
    assert Path(pulled[0]).read_bytes() == WEIGHTS
    (sent,) = token.requests
    assert sent.status == 200 and "scope=repository%3Aorg%2Fprivate%3Apull" in sent.path
    expected = base64.b64encode(f"{registry_token.username}:{registry_token.password}".encode()).decode()
    assert sent.headers["Authorization"] == f"Basic {expected}"

    anonymous = registry_token.oras(authenticated=False)
    assert len(anonymous.get_manifest(registry_token.ref("public/model", "v1"))["layers"]) == 1
    assert "Authorization" not in token.requests[-1].headers
    with pytest.raises(ValueError):  # an anonymous token for a private repository carries no access
        anonymous.get_manifest(registry_token.ref("org/private", "v1"))

    with client(registry_token) as http:
        wrong = http.get(token.realm, params={"service": SERVICE}, auth=(registry_token.username, "wrong"))
        assert wrong.status_code == 401 and token.requests[-1].status == 401


def test_the_token_service_takes_an_identity_token_in_an_oauth2_post(registry_token: Registry) -> None:
    token = registry_token.token
    assert token is not None
    registry_token.push_modelpack("org/private", "v1", {"w.bin": WEIGHTS})
    form = {"grant_type": "refresh_token", "service": SERVICE, "scope": "repository:org/private:pull"}
    with client(registry_token) as http:
        answer = http.post(token.realm, data=form | {"refresh_token": registry_token.identity_token})
        assert answer.status_code == 200 and "token" not in answer.json()  # OAuth2's access_token only
        bearer = {"Authorization": f"Bearer {answer.json()['access_token']}"}
        assert http.get(f"{registry_token.url}/v2/org/private/manifests/v1", headers=ACCEPT | bearer).status_code == 200
        unknown = http.post(token.realm, data=form | {"refresh_token": "not-issued"})
        assert (unknown.status_code, unknown.json()) == (400, {"error": "invalid_grant"})
    assert [(seen.method, seen.status, seen.form["refresh_token"]) for seen in token.requests] == [
        ("POST", 200, [registry_token.identity_token]),
        ("POST", 400, ["not-issued"]),
    ]


def test_token_lifetime_is_what_the_registry_enforces(make_registry: object) -> None:
    registry: Registry = make_registry(auth="token", token_lifetime=2)  # type: ignore[operator]
    token = registry.token
    assert token is not None
    registry.push_modelpack("org/model", "v1", {"w.bin": WEIGHTS})
    url = f"{registry.url}/v2/org/model/manifests/v1"
    with client(registry) as http:
        answer = http.get(
            token.realm,
            params={"service": SERVICE, "scope": "repository:org/model:pull"},
            auth=(registry.username, registry.password),
        ).json()
        assert answer["expires_in"] == 2 and answer["token"] == answer["access_token"]
        fresh = http.get(url, headers=ACCEPT | {"Authorization": f"Bearer {answer['token']}"})
        assert fresh.status_code == 200
        access = [{"type": "repository", "name": "org/model", "actions": ["pull"]}]
        expired = token.sign(registry.username, SERVICE, access, expires=int(time.time()) - 1)
        stale = http.get(url, headers=ACCEPT | {"Authorization": f"Bearer {expired}"})
        assert stale.status_code == 401
        other = token.sign(registry.username, SERVICE, [{**access[0], "name": "org/other"}])
        assert http.get(url, headers=ACCEPT | {"Authorization": f"Bearer {other}"}).status_code == 401


def test_redirected_blob_reads_reach_another_host_without_credentials(registry_redirect: Registry) -> None:
    blobs = registry_redirect.blobs
    assert blobs is not None and blobs.url.startswith("https://127.0.0.2:")
    registry_redirect.push_modelpack("org/model", "v1", {"w.bin": WEIGHTS})
    layer = json.loads(registry_redirect.get_manifest("org/model", "v1"))["layers"][0]
    url = f"{registry_redirect.url}/v2/org/model/blobs/{layer['digest']}"
    credentials = (registry_redirect.username, registry_redirect.password)
    with client(registry_redirect, auth=credentials) as http:
        redirect = http.get(url)
        assert redirect.status_code == 307 and redirect.headers["Location"].startswith(blobs.url + "/")
        assert http.get(url, follow_redirects=True).content == WEIGHTS
        ranged = http.get(redirect.headers["Location"], headers={"Range": "bytes=5-9"})
        assert ranged.status_code == 206 and ranged.content == WEIGHTS[5:10]
        assert http.get(url).status_code == 307
    assert [seen.status for seen in blobs.requests] == [200, 206]
    assert "Authorization" not in blobs.requests[0].headers  # httpx drops it across origins
    assert "Authorization" in blobs.requests[1].headers  # sent straight there: recorded, so a test would see it


def test_an_index_of_two_platforms(registry: Registry) -> None:
    amd64 = registry.push_modelpack("org/multi", None, {"w.bin": b"amd64 weights"})
    arm64 = registry.push_modelpack("org/multi", None, {"w.bin": b"arm64 weights"})
    digest = registry.push_index("org/multi", "v1", {"linux/amd64": amd64, "linux/arm64/v8": arm64})
    with client(registry) as http:
        response = http.get(f"{registry.url}/v2/org/multi/manifests/v1", headers=ACCEPT)
        assert response.headers["Content-Type"] == OCI_INDEX
        assert response.headers["Docker-Content-Digest"] == digest
        index = response.json()
    platforms = {entry["digest"]: entry["platform"] for entry in index["manifests"]}
    assert platforms == {
        amd64: {"architecture": "amd64", "os": "linux"},
        arm64: {"architecture": "arm64", "os": "linux", "variant": "v8"},
    }
    for entry in index["manifests"]:
        assert entry["size"] == len(registry.get_manifest("org/multi", entry["digest"]))


def test_a_docker_manifest_list_of_schema_2_images(registry: Registry) -> None:
    amd64 = registry.push_layers("org/docker", None, [make_tar({"a": b"amd64"})], docker=True)
    arm64 = registry.push_layers("org/docker", None, [make_tar({"a": b"arm64"})], docker=True)
    digest = registry.push_index("org/docker", "v1", {"linux/amd64": amd64, "linux/arm64": arm64}, media_type=LIST)
    accept = {"Accept": f"{DOCKER_MANIFEST}, {LIST}"}
    with client(registry) as http:
        listed = http.get(f"{registry.url}/v2/org/docker/manifests/v1", headers=accept)
        assert (listed.headers["Content-Type"], listed.headers["Docker-Content-Digest"]) == (LIST, digest)
        assert [entry["mediaType"] for entry in listed.json()["manifests"]] == [DOCKER_MANIFEST, DOCKER_MANIFEST]
        image = http.get(f"{registry.url}/v2/org/docker/manifests/{arm64}", headers=accept)
        assert image.headers["Content-Type"] == DOCKER_MANIFEST
        assert image.json()["config"]["mediaType"] == DOCKER_CONFIG
        assert [layer["mediaType"] for layer in image.json()["layers"]] == [DOCKER_LAYER]
        # a client that does not accept lists is given linux/amd64's manifest instead (distribution 2.8)
        no_lists = http.get(f"{registry.url}/v2/org/docker/manifests/v1", headers={"Accept": DOCKER_MANIFEST})
        assert no_lists.headers["Docker-Content-Digest"] == amd64


@pytest.mark.xdist_group("containers")  # one podman at a time, on one xdist worker
def test_a_modelcar_image_pushed_by_podman(registry_token: Registry) -> None:
    weights = b"modelcar weights" * 1000
    digest = registry_token.push_image("org/modelcar", "v1", [{"models/config.json": b"{}"}, {"models/w.bin": weights}])
    manifest = json.loads(registry_token.get_manifest("org/modelcar", "v1"))
    assert digest == digest_of(registry_token.get_manifest("org/modelcar", digest))
    assert [layer["mediaType"] for layer in manifest["layers"]] == [TAR_GZIP, TAR_GZIP]
    blob = registry_token.get_blob("org/modelcar", manifest["layers"][1]["digest"])
    with tarfile.open(fileobj=io.BytesIO(blob)) as archive:
        member = archive.extractfile("models/w.bin")
        assert member is not None and member.read() == weights
    assert registry_token.token is not None
    assert "scope=repository%3Aorg%2Fmodelcar%3Apull%2Cpush" in registry_token.token.requests[0].path


def test_a_port_taken_before_the_registry_binds_it_is_given_up(tmp_path: Path) -> None:
    registry = Registry(tmp_path, tls=False)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", registry.port))
        squatter.listen()
        taken = registry.port
        with registry:
            assert registry.port != taken and registry.host == f"127.0.0.1:{registry.port}"
            registry.push_modelpack("org/model", "v1", {"w.bin": WEIGHTS})
        assert "address already in use" in registry.log_file.read_text()
