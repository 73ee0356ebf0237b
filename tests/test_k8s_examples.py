"""k8s-examples/: valid, locked down, fetcher's own settings, and proven by running them.

Offline: yamllint, and `kubernetes-validate --strict` against a pinned Kubernetes version. Then what that
schema cannot see: the security settings, resources and termination message policy on every container, the
image names, that every env name is one fetcher (or the AWS SDK) reads, and that fetcher itself accepts each
example's configuration (`--dry-run`).

Then as a cluster would run them: `podman kube play`, which runs init containers before app containers and
does not start the app when an init container fails. Each example is played as written, except: the fetcher
image is the local build; the app image (sentiment-agent:1.0, which does not exist) is the same local image
running a few lines of Python that print what it finds in the model volume; https://models.example.com and
the MinIO endpoint are loopback servers, and the placeholder sha256 is the served archive's; the Hugging Face
example's hub is tests/fakehub.py (HF_ENDPOINT is set to it; the placeholder commit and token are its own),
and each placeholder line of a SHA256SUMS gets its file's digest; the OCI example's registry is Debian's
docker-registry on loopback (tests/registry.py) with htpasswd, so the mounted pull secret must reach it, over
HTTPS with the test CA from a ConfigMap (see oci_registry), and a secret volume's `optional: false`
spelt out (podman 4.3 needs it); the pod uses the host's network
(loopback, and the fake hub's CDN on 127.0.0.2); volume names get a test prefix; a hostPath is taken under
the test's directory, its node, so the pods one test plays share it; a downwardAPI volume no container
mounts (Seldon's podinfo) is dropped, as podman 4.3 has none; and restartPolicy is Never,
because podman 4.3 applies the pod's restart policy to init containers too (Always would re-run a finished
init container in a loop, which a kubelet does not do).

The KServe and Seldon Core pods (k8s-examples/*/pods/) are played the same way, with what they name from
their folder (see the section at the end): their model server is a stand-in that lists /mnt/models.

A dry run resolves what a source names (an S3 key that may be a prefix, a hub revision), so the offline
checks serve each example from the same loopback servers.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from fetcher import __version__
from fetcher.config import OPTIONS
from tests.conftest import S3, Origin, make_tar, run_fetcher, sha256
from tests.container_support import ROOT, Podman, session
from tests.fakehub import FakeHub
from tests.registry import Registry

pytestmark = pytest.mark.xdist_group("containers")  # one podman at a time, on one xdist worker

EXAMPLES = ROOT / "k8s-examples"
EXAMPLE_FILES = sorted(p for p in EXAMPLES.glob("*.yaml") if not p.name.startswith("."))
KUBERNETES_VERSION = "1.34.0"  # pinned: the schemas kubernetes-validate checks against
FETCHER_IMAGE = f"ghcr.io/example/fetcher:{__version__}"
APP_IMAGE = "sentiment-agent:1.0"
PLACEHOLDER_SHA256 = "PUT-THE-SHA256-OF-YOUR-ARCHIVE-HERE"
VOCAB_SHA256 = "PUT-THE-SHA256-OF-vocab.txt-HERE"
ORIGIN = "https://models.example.com"
MINIO = "http://minio.minio.svc.cluster.local:9000"
HF_REPO = "example-org/sentiment-v3"
HF_COMMIT = "PUT-THE-40-HEX-COMMIT-HERE"
HF_TOKEN = "PUT-YOUR-HUGGING-FACE-READ-TOKEN-HERE"
REGISTRY = "registry.example.com"
REGISTRY_AUTH = "PUT-BASE64-OF-USERNAME:PASSWORD-HERE"
# The model servers of the KServe and Seldon pods (k8s-examples/*/pods/), replaced by a stand-in when played.
MODEL_SERVERS = {"kserve/huggingfaceserver:v0.15.2", "seldonio/sklearnserver:1.18.2"}
OCI_SOURCE = re.compile(r"oci://registry\.example\.com/([\w./-]+):([\w.-]+)")
SUMS_LINE = re.compile(r"PUT-THE-SHA256-OF-(\S+)-HERE  (\S+)")  # a SHA256SUMS line left for the reader

FETCHER_ENV = {option.env for option in OPTIONS}
# What boto3's credential chain and configuration read, as far as an example may set it.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CA_BUNDLE",
    "AWS_PROFILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_SESSION_NAME",
}
# What fetcher's hf:// source reads, as huggingface_hub reads it.
HF_ENV = {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT"}
LOCKED_DOWN = {
    "runAsNonRoot": True,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
# node-cache.yaml alone: its fetcher writes a hostPath the kubelet made root's, so it runs as uid 0 with no
# capability but CHOWN (for --owner), and its pod runs as the app's uid, which --owner gives the model to.
AS_ROOT = {"node-cache"}
ROOT_FETCHER = {"runAsUser": 0, "runAsNonRoot": False, "capabilities": {"drop": ["ALL"], "add": ["CHOWN"]}}
APP_UID = 1000


# --- reading the examples -----------------------------------------------------------------------------------


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] == "Pod":
        return dict(doc["spec"])
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return dict(doc["spec"]["template"]["spec"])
    return None


def pod_specs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [spec for doc in docs if (spec := pod_spec(doc)) is not None]


def fetcher_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in spec.get("initContainers", []) if "fetcher" in c["image"]]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def container_env(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The env a kubelet would give the container: envFrom (ConfigMaps, Secrets in this file), then env."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env |= by_kind(docs, "ConfigMap")[source["configMapRef"]["name"]]["data"]
        if "secretRef" in source:
            env |= by_kind(docs, "Secret")[source["secretRef"]["name"]]["stringData"]
    for item in container.get("env", []):
        if "valueFrom" in item:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = by_kind(docs, "Secret")[ref["name"]]["stringData"][ref["key"]]
        else:
            env[item["name"]] = item["value"]
    return env


def from_secrets(container: dict[str, Any], docs: list[dict[str, Any]]) -> set[str]:
    """The env names a Secret provides: envFrom secretRef, or a secretKeyRef."""
    names = {
        name
        for source in container.get("envFrom", [])
        if "secretRef" in source
        for name in by_kind(docs, "Secret")[source["secretRef"]["name"]]["stringData"]
    }
    return names | {item["name"] for item in container.get("env", []) if "secretKeyRef" in item.get("valueFrom", {})}


def ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


def test_there_are_the_nine_examples() -> None:
    assert {p.stem for p in EXAMPLE_FILES} >= set(PLAYED)  # and every one of them is played
    listed = (EXAMPLES / "README.md").read_text()
    assert all(f"`{p.name}`" in listed for p in EXAMPLE_FILES), "k8s-examples/README.md lists every example"
    quickstart = documents(EXAMPLES / "quickstart.yaml")
    assert set(by_kind(quickstart, "ConfigMap")["fetcher-config"]["data"]) == {
        "FETCHER_SOURCE",
        "FETCHER_SHA256",
        "FETCHER_DEST",
    }


# --- offline validation -------------------------------------------------------------------------------------


def tool(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def test_yamllint() -> None:
    result = subprocess.run(
        [tool("yamllint"), "--strict", "-c", str(EXAMPLES / ".yamllint.yaml"), str(EXAMPLES)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def kubernetes_validate(paths: list[Path]) -> str:
    """`kubernetes-validate --strict` of these files, which must pass; its report."""
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, *map(str, paths)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_kubernetes_validate_strict() -> None:
    report = kubernetes_validate(EXAMPLE_FILES)
    for path in EXAMPLE_FILES:
        assert f"{path.relative_to(ROOT)} passed" in report


# --- what the schema misses ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=ids(EXAMPLE_FILES))
def test_every_container_is_locked_down(path: Path) -> None:
    specs = pod_specs(documents(path))
    assert specs
    for spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["securityContext"]["runAsUser"] == (APP_UID if path.stem in AS_ROOT else 65532)
        assert spec.get("restartPolicy", "Always") != "Never", "a failed fetch must be retried"
        for container in spec.get("initContainers", []) + spec["containers"]:
            where = f"{path.name}: {container['name']}"
            context = container.get("securityContext", {})
            wanted = LOCKED_DOWN
            if path.stem in AS_ROOT and container in fetcher_containers(spec):
                wanted = LOCKED_DOWN | ROOT_FETCHER
            else:
                assert context.get("runAsUser", 1) != 0, where
            for key, value in wanted.items():
                assert context.get(key) == value, f"{where}: securityContext.{key} should be {value}"
            assert context.get("privileged", False) is False, where
            assert container.get("terminationMessagePolicy") == "FallbackToLogsOnError", where
            resources = container.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), f"{where}: requests"
            assert "memory" in resources.get("limits", {}), f"{where}: memory limit"


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=ids(EXAMPLE_FILES))
def test_images_are_fetchers_release_and_pinned_apps(path: Path) -> None:
    for spec in pod_specs(documents(path)):
        fetchers = fetcher_containers(spec)
        assert len(fetchers) == 1, "one fetcher init container"
        assert fetchers[0]["image"] == FETCHER_IMAGE
        for container in spec.get("initContainers", []) + spec["containers"]:
            image = container["image"]
            assert re.search(r":[\w][\w.-]*$|@sha256:", image) and not image.endswith(":latest"), image
        assert [c["image"] for c in spec["containers"]] == [APP_IMAGE]


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=ids(EXAMPLE_FILES))
def test_env_names_are_fetchers_own(path: Path) -> None:
    docs = documents(path)
    for spec in pod_specs(docs):
        for container in fetcher_containers(spec):
            env = container_env(docs, container)
            unknown = set(env) - FETCHER_ENV - AWS_ENV - HF_ENV
            assert not unknown, f"{path.name}: env names fetcher does not read: {sorted(unknown)}"
            secrets = {s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s}
            for secret in secrets:  # credentials only in Secrets, and nothing but AWS_* or HF_* there
                assert set(by_kind(docs, "Secret")[secret]["stringData"]) <= AWS_ENV | HF_ENV
            for name, value in env.items():
                if re.search(r"SECRET|TOKEN", name) and not name.endswith("_FILE"):
                    assert name in from_secrets(container, docs), f"{path.name}: {name} is not from a Secret"
                assert isinstance(value, str), f"{name}: env values are strings in Kubernetes"


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    """A hub whose private repos need this token: a played example proves its Secret reaches the hub."""
    with FakeHub(token="hf_" + uuid.uuid4().hex) as hub:
        yield hub


def oci_registry(path: Path, request: pytest.FixtureRequest) -> Registry | None:
    """A registry over HTTPS that wants Basic credentials, started only for an example that pulls from one.

    Played, the pod trusts its CA from a ConfigMap (SSL_CERT_FILE), as the example tells a reader with a
    private CA to do; the fetcher image's Python 3.13 verifies strictly, and the CA carries keyUsage for it.
    """
    if not OCI_SOURCE.search(path.read_text()):
        return None
    registry: Registry = request.getfixturevalue("make_registry")(auth="htpasswd")
    return registry


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=ids(EXAMPLE_FILES))
def test_fetcher_accepts_the_configuration(
    path: Path, tmp_path: Path, origin: Origin, s3: S3, fake_hub: FakeHub, request: pytest.FixtureRequest
) -> None:
    check_fetcher_accepts(path, tmp_path, serve(path, origin, s3, fake_hub, registry=oci_registry(path, request)))


def test_the_readme_pods_are_valid_and_accepted(tmp_path: Path, origin: Origin, s3: S3, fake_hub: FakeHub) -> None:
    """The Pods in the README are the first a reader copies: they are held to the examples' checks."""
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    manifests = [block for block in blocks if "kind: Pod" in block]
    assert len(manifests) == 3, "the quickstart Pod, a Hugging Face model, an S3 prefix"
    for number, manifest in enumerate(manifests):
        path = tmp_path / f"readme-pod-{number}.yaml"
        path.write_text(manifest)
        kubernetes_validate([path])
        served = serve(path, origin, s3, fake_hub)
        (tmp_path / path.stem).mkdir()
        check_fetcher_accepts(path, tmp_path / path.stem, served, extra_env=s3.env)  # the S3 Pod has a role
    quickstart = by_kind(documents(EXAMPLES / "quickstart.yaml"), "ConfigMap")["fetcher-config"]
    first = documents(tmp_path / "readme-pod-0.yaml")
    assert by_kind(first, "ConfigMap")["fetcher-config"]["data"] == quickstart["data"]
    token_file = container_env(
        documents(tmp_path / "readme-pod-1.yaml"),
        fetcher_containers(pod_specs(documents(tmp_path / "readme-pod-1.yaml"))[0])[0],
    )["FETCHER_BEARER_TOKEN_FILE"]
    assert token_file.startswith("/var/run/secrets/"), "the README's hub token is a mounted Secret"


def test_an_unedited_placeholder_is_an_obvious_usage_error(tmp_path: Path) -> None:
    """A reader who applies an example without pinning their archive gets exit 2 naming the setting, not exit 4."""
    run = run_fetcher(
        "--dry-run",
        env={
            "FETCHER_SOURCE": ORIGIN + "/m.tar.gz",
            "FETCHER_DEST": str(tmp_path),
            "FETCHER_SHA256": PLACEHOLDER_SHA256,
        },
    )
    assert run.code == 2, run.stderr
    assert "FETCHER_SHA256" in run.stderr and "64 hex digits" in run.stderr


def test_unedited_directory_placeholders_are_obvious_errors(tmp_path: Path, fake_hub: FakeHub) -> None:
    """A SHA256SUMS left as written is exit 2 naming its line, before any request; a commit left as written
    is the hub's RevisionNotFound, naming it, not a download of whatever the branch holds."""
    docs = documents(EXAMPLES / "s3-prefix.yaml")
    (sums,) = by_kind(docs, "ConfigMap")["sentiment-v4-sha256sums"]["data"].values()
    (tmp_path / "SHA256SUMS").write_text(sums)
    env = by_kind(docs, "ConfigMap")["fetcher-s3-prefix-config"]["data"] | {
        "FETCHER_SHA256SUMS": str(tmp_path / "SHA256SUMS"),
        "FETCHER_DEST": str(tmp_path / "models"),
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",  # nothing listens: no request may be needed to say so
        "AWS_ACCESS_KEY_ID": "fetcher-reader",
        "AWS_SECRET_ACCESS_KEY": "change-me-to-the-real-secret",
    }
    run = run_fetcher("--dry-run", env=env)
    assert run.code == 2, run.stderr
    assert "line 2 is not 'SHA256  path'" in run.stderr

    fake_hub.add_repo(HF_REPO, {"config.json": b"{}\n"}, private=True)
    (init,) = fetcher_containers(pod_specs(documents(EXAMPLES / "huggingface.yaml"))[0])
    source = next(item["value"] for item in init["env"] if item["name"] == "FETCHER_SOURCE")
    run = run_fetcher(
        env={
            "FETCHER_SOURCE": source,
            "FETCHER_DEST": str(tmp_path / "hf"),
            "HF_ENDPOINT": fake_hub.endpoint,
            "HF_TOKEN": str(fake_hub.token),
        }
    )
    assert run.code == 3, run.stderr
    assert f"no revision '{HF_COMMIT}' (RevisionNotFound)" in run.stderr
    assert not (tmp_path / "hf").exists()


def test_an_unedited_pull_secret_is_an_obvious_usage_error(tmp_path: Path) -> None:
    """The example's Secret applied as written is exit 2 naming the auth file, before any request."""
    docs = documents(EXAMPLES / "oci-modelpack.yaml")
    (secret,) = by_kind(docs, "Secret").values()
    assert secret["type"] == "kubernetes.io/dockerconfigjson"
    config = secret["stringData"][".dockerconfigjson"].replace(REGISTRY, "127.0.0.1:9")  # nothing listens
    (tmp_path / ".dockerconfigjson").write_text(config)
    (init,) = fetcher_containers(pod_specs(docs)[0])
    env = container_env(docs, init) | {
        "FETCHER_SOURCE": container_env(docs, init)["FETCHER_SOURCE"].replace(REGISTRY, "127.0.0.1:9"),
        "FETCHER_DEST": str(tmp_path / "models"),
        "FETCHER_REGISTRY_AUTH_FILE": str(tmp_path / ".dockerconfigjson"),
    }
    run = run_fetcher(env=env)
    assert run.code == 2, run.stderr
    assert "the 'auth' of 127.0.0.1:9 is not base64 of user:password" in run.stderr
    assert not (tmp_path / "models").exists()


def check_fetcher_accepts(
    path: Path, tmp_path: Path, served: Served, extra_env: dict[str, str] | None = None, s3_checksums: bool = False
) -> None:
    """`fetcher --dry-run` with the example's env, args and mounted files; dest is the shared volume.

    ``s3_checksums``: an S3 prefix's files are verified against the ChecksumSHA256 each GET returns, which a
    dry run, from the listing alone, cannot show: their plan says unverified (the plays prove otherwise).

    The examples hold placeholders where the reader's digests, commit and token go: ``served`` puts what
    the loopback servers hold there, as a dry run resolves directories (and S3 keys that may be one).
    """
    text = path.read_text()
    for old, new in served.replacements.items():
        text = text.replace(old, new)
    path = tmp_path / path.name
    path.write_text(text)
    docs = documents(path)
    for spec in pod_specs(docs):
        volumes = {v["name"]: v for v in spec["volumes"]}
        (container,) = fetcher_containers(spec)
        mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
        env = (extra_env or {}) | served.env | container_env(docs, container)
        if served.ca_file is not None:
            env["SSL_CERT_FILE"] = str(served.ca_file)
        args = list(container.get("args", []))
        for mount_path, mount in mounts.items():
            volume = volumes[mount["name"]]
            if "configMap" in volume:
                files = by_kind(docs, "ConfigMap")[volume["configMap"]["name"]]["data"]
            elif "secret" in volume:
                files = by_kind(docs, "Secret")[volume["secret"]["secretName"]]["stringData"]
            elif "hostPath" in volume:  # the node's cache: an empty directory here
                files = {}
            else:
                continue
            local = tmp_path / mount["name"]  # materialise the volume and point the args and env at it
            local.mkdir()
            for key, content in files.items():
                (local / key).write_text(content)
            args = [a.replace(mount_path, str(local)) for a in args]
            env = {k: v.replace(mount_path, str(local)) for k, v in env.items()}
        run = run_fetcher("--dry-run", *args, env=env)
        assert run.code == 0, run.stderr
        plan = json.loads(run.stdout)["artifacts"]
        assert plan
        for artifact in plan:
            if artifact.get("directory"):
                assert artifact["files"], f"{artifact['source']}: a directory of no files"
                vouched = s3_checksums and artifact["source"].startswith("s3://")
                for file in artifact["files"]:
                    unverified = file["checksum"].startswith("(none")
                    assert not unverified or vouched, f"{file['path']} would not be verified"
            else:
                assert re.fullmatch("[0-9a-f]{64}", artifact["sha256"]), "every file or archive is pinned by sha256"
            model_mount = next(m for p, m in mounts.items() if artifact["dest"].startswith(p))
            assert "configMap" not in volumes[model_mount["name"]]
            app_mounts = [m for c in spec["containers"] for m in c.get("volumeMounts", [])]
            shared = [m for m in app_mounts if m["name"] == model_mount["name"]]
            assert shared and all(m.get("readOnly") for m in shared), "the app reads the same volume, read-only"


# --- podman kube play ---------------------------------------------------------------------------------------

APP_CHECK = (
    "import hashlib, json, os, pathlib, time; root = pathlib.Path('/models'); "
    "files = {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob('*')) "
    "if p.is_file() and p.relative_to(root).parts[0] != '.fetcher'}; model = os.environ.get('MODEL_PATH', ''); "
    "print(json.dumps({'model_path': model, 'model_path_exists': os.path.exists(model), 'files': files}), flush=True); "
    "time.sleep(600)"
)

# A platform's model server (KServe's kserve-container, Seldon's classifier) is replaced by this stand-in: it
# lists /mnt/models as a runtime would, and hashes every file outside fetcher's state directories.
MODEL_SERVER_CHECK = (
    "import hashlib, json, os, pathlib, time; root = pathlib.Path('/mnt/models'); "
    "files = {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob('*')) "
    "if p.is_file() and '.fetcher' not in p.relative_to(root).parts}; "
    "state = sorted(str(p.relative_to(root)) for p in root.rglob('.fetcher')); "
    "print(json.dumps({'listing': sorted(os.listdir(root)), 'files': files, 'state': state}), flush=True); "
    "time.sleep(600)"
)


@dataclass
class Served:
    """What the loopback servers hold, and the text replacements that point an example at them."""

    replacements: dict[str, str]
    files: dict[str, bytes]  # what the app should see under /models
    env: dict[str, str] = field(default_factory=dict)  # for fetcher: where the fake hub is
    ca_file: Path | None = None  # the registry's private CA, for SSL_CERT_FILE
    digest: str = ""  # the manifest digest the registry's tag names


def model_archive() -> tuple[bytes, dict[str, bytes]]:
    files = {
        "sentiment-model/config.json": b'{"architectures": ["SentimentClassifier"]}\n',
        "sentiment-model/weights.safetensors": bytes(range(256)) * 512,
    }
    archive = make_tar(dict(files))
    return archive, files


def model_files() -> dict[str, bytes]:
    """A model as a directory: what a hub repo or an S3 prefix holds."""
    return {
        "config.json": b'{"architectures": ["SentimentClassifier"]}\n',
        "model.safetensors": bytes(range(256)) * 4096,  # an LFS file: the hub sends it to its CDN
        "tokenizer.json": b'{"model": {"type": "WordPiece"}}\n',
    }


def serve_hub(hub: FakeHub, wrong_sha256: bool) -> Served:
    """The example's repo, private (so the token must reach the hub), with files its patterns leave out."""
    wanted = model_files() | {"tokenizer.model": bytes(range(64)) * 16}
    left_out = {
        "README.md": b"# sentiment-v3\n",
        "pytorch_model.bin": b"the same weights, pickled\n",
        "original/params.json": b'{"dim": 768}\n',  # matches *.json: left out by the exclude
    }
    commit = hub.add_repo(HF_REPO, wanted | left_out, private=True)
    if wrong_sha256:
        hub.corrupt(HF_REPO, "model.safetensors")  # served with a byte flipped, every digest unchanged
    return Served({HF_COMMIT: commit, HF_TOKEN: str(hub.token)}, wanted, {"HF_ENDPOINT": hub.endpoint})


def serve_prefix(text: str, s3: S3, wrong_sha256: bool) -> Served:
    """The files under the example's prefix, a file its SHA256SUMS does not list, and a sibling prefix."""
    match = re.search(r"s3://([\w.-]+)/([\w./-]+/)", text)
    assert match, "an S3 prefix"
    bucket, prefix = match.groups()
    files = model_files()
    for name, data in files.items():
        s3.put(bucket, prefix + name, data)
    s3.put(bucket, prefix + "training-log.txt", b"not part of the model\n")
    s3.put(bucket, prefix.rstrip("/") + "-rc1/config.json", b'{"rc": 1}\n')  # shares only a string prefix
    replacements = {f"PUT-THE-SHA256-OF-{name}-HERE": sha256(data) for name, data in files.items()}
    if wrong_sha256:
        replacements["PUT-THE-SHA256-OF-model.safetensors-HERE"] = sha256(b"not the weights")
    listed = {name for name, _ in SUMS_LINE.findall(text)}
    assert listed == set(files), listed
    return Served(replacements, files)


def serve_registry(text: str, registry: Registry, corrupt: bool) -> Served:
    """The example's artifact as ModelPack raw layers; ``corrupt`` flips a byte of the weights in storage."""
    match = OCI_SOURCE.search(text)
    assert match, "an oci:// source"
    repo, tag = match.groups()
    files = model_files()
    digest = registry.push_modelpack(repo, tag, files)
    if corrupt:  # served as stored, under its digest: only a client that hashes what streams sees it
        blob = registry.blob_path("sha256:" + sha256(files["model.safetensors"]))
        data = bytearray(blob.read_bytes())
        data[1000] ^= 1
        blob.write_bytes(bytes(data))
    replacements = {REGISTRY: registry.host, REGISTRY_AUTH: registry.basic_auth()}
    return Served(replacements, files, {}, ca_file=registry.ca_file, digest=digest)


def serve(
    path: Path,
    origin: Origin,
    s3: S3,
    hub: FakeHub,
    wrong_sha256: bool = False,
    registry: Registry | None = None,
) -> Served:
    text = path.read_text()
    if OCI_SOURCE.search(text):
        assert registry is not None, "an oci:// example needs a registry"
        return serve_registry(text, registry, wrong_sha256)
    if HF_COMMIT in text:
        return serve_hub(hub, wrong_sha256)
    if SUMS_LINE.search(text):
        served = serve_prefix(text, s3, wrong_sha256)
        served.replacements |= {
            MINIO: s3.endpoint,
            "fetcher-reader": s3.env["AWS_ACCESS_KEY_ID"],
            "change-me-to-the-real-secret": s3.env["AWS_SECRET_ACCESS_KEY"],
        }
        return served
    archive, files = model_archive()
    digest = sha256(b"not the archive") if wrong_sha256 else sha256(archive)
    origin.add("/sentiment-v3.tar.gz", archive)
    vocab = b"good\nbad\nneutral\n"
    origin.add("/tokenizers/sentiment-v3/vocab.txt", vocab, require={"X-Team": "ml-platform"})
    replacements = {ORIGIN: origin.url("").rstrip("/"), PLACEHOLDER_SHA256: digest, VOCAB_SHA256: sha256(vocab)}
    if path.stem == "s3-credentials":
        # The archive holds model/... and the example strips that first component.
        s3_archive = make_tar({"model/" + k.split("/", 1)[1]: v for k, v in files.items()})
        s3.put("models", "sentiment/v3/model.tar.gz", s3_archive)
        replacements |= {
            MINIO: s3.endpoint,
            "fetcher-reader": s3.env["AWS_ACCESS_KEY_ID"],
            "change-me-to-the-real-secret": s3.env["AWS_SECRET_ACCESS_KEY"],
            PLACEHOLDER_SHA256: sha256(b"not the archive") if wrong_sha256 else sha256(s3_archive),
        }
        files = {k.split("/", 1)[1]: v for k, v in files.items()}
    if path.stem == "several-artifacts":
        files = files | {"vocab.txt": vocab}
    return Served(replacements, files)


@dataclass
class Played:
    podman: Podman
    manifest: Path
    pod: str
    init: str
    app: str
    volumes: list[str]
    secrets: list[str]
    code: int
    output: str

    def state(self, container: str) -> dict[str, Any]:
        return dict(json.loads(self.podman.run("inspect", container).stdout)[0]["State"])

    def logs(self, container: str) -> str:
        result = self.podman.run("logs", container, check=False)
        return result.stdout + result.stderr

    def events(self, container: str) -> list[dict[str, Any]]:
        found = []
        for line in self.logs(container).splitlines():
            with contextlib.suppress(ValueError):
                found.append(json.loads(line))
        return found

    def app_report(self, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events(self.app):
                if "files" in event:
                    return event
            time.sleep(0.2)
        raise AssertionError(f"the app container printed no report:\n{self.logs(self.app)}")

    def assert_stopped_by_a_mismatch(self) -> None:
        """The init container failed on a sha256 mismatch (exit 4), and the app container never started."""
        assert self.code != 0
        assert "exited with code 4" in self.output, self.output + self.logs(self.init)
        init = self.state(self.init)
        assert init["ExitCode"] == 4 and init["Status"] == "exited"
        failed = [e for e in self.events(self.init) if e.get("event") == "failed"]
        assert failed and failed[-1]["exit_code"] == 4 and "sha256 mismatch" in failed[-1]["error"]
        app = self.state(self.app)
        assert app["Status"] in ("created", "configured"), app
        assert app["StartedAt"].startswith("0001-01-01"), "the app container never started"

    def down(self) -> None:
        self.podman.run("pod", "stop", "--ignore", "--time", "0", self.pod, check=False)
        self.podman.run("pod", "rm", "--force", "--ignore", self.pod, check=False)
        for secret in self.secrets:
            self.podman.run("secret", "rm", secret, check=False)


@dataclass
class Prepared:
    docs: list[dict[str, Any]]
    pod: str
    init: str
    app: str
    volumes: list[str]


def prepare(path: Path, image: str, served: Served, prefix: str, node: Path) -> Prepared:
    """The example as a local cluster can run it, and the names podman will give what it creates.

    Every object's name gets the prefix (and so every reference to it), as podman's pods, secrets and
    volumes are global to the machine: two test runs at once must not meet. A hostPath is taken under
    ``node``, the test's stand-in for the node's root (made by podman, as the kubelet does, root's).
    """
    text = path.read_text()
    for old, new in served.replacements.items():
        text = text.replace(old, new)
    docs = [doc for doc in yaml.safe_load_all(text) if doc]
    volumes = []
    for doc in docs:
        doc["metadata"]["name"] = prefix + doc["metadata"]["name"]
        if doc["kind"] == "Secret" and "stringData" in doc:
            # What the API server does; podman 4.3 reads only `data` (and see play()).
            strings = doc.pop("stringData")
            doc["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in strings.items()}
        if doc["kind"] in ("PersistentVolumeClaim", "ConfigMap"):
            volumes.append(doc["metadata"]["name"])  # podman 4.3 makes ConfigMap volumes named volumes too
    pod_name = init_name = app_name = ""
    added: list[dict[str, Any]] = []  # objects only the played variant has
    for doc in docs:
        if doc["kind"] not in ("Pod", "Deployment"):
            continue
        template = doc if doc["kind"] == "Pod" else doc["spec"]["template"]
        if doc["kind"] == "Deployment":
            doc["spec"]["replicas"] = 1
        metadata, spec = template.setdefault("metadata", {}), template["spec"]
        spec["hostNetwork"] = True
        spec["restartPolicy"] = "Never"
        containers = spec.get("initContainers", []) + spec["containers"]
        mounted = {m["name"] for c in containers for m in c.get("volumeMounts", [])}
        assert not any("downwardAPI" in v and v["name"] in mounted for v in spec["volumes"])
        spec["volumes"] = [v for v in spec["volumes"] if "downwardAPI" not in v]  # podman 4.3 has none
        for volume in spec["volumes"]:
            if "configMap" in volume:
                volume["configMap"]["name"] = prefix + volume["configMap"]["name"]
            if "persistentVolumeClaim" in volume:
                volume["persistentVolumeClaim"]["claimName"] = prefix + volume["persistentVolumeClaim"]["claimName"]
            if "secret" in volume:
                volume["secret"]["secretName"] = prefix + volume["secret"]["secretName"]
                volume["secret"].setdefault("optional", False)  # Kubernetes' default; podman 4.3 panics without it
                volumes.append(volume["secret"]["secretName"])  # podman 4.3 keeps a secret volume as a named one
            if "emptyDir" in volume:
                volumes.append(prefix + volume["name"])  # podman 4.3 makes an emptyDir a named volume
            if "hostPath" in volume:
                volume["hostPath"]["path"] = str(node / volume["hostPath"]["path"].lstrip("/"))
            for mount in (m for c in containers for m in c.get("volumeMounts", [])):
                if mount["name"] == volume["name"]:
                    mount["name"] = prefix + volume["name"]
            volume["name"] = prefix + volume["name"]
        for source in (s for c in containers for s in c.get("envFrom", [])):
            for ref in ("configMapRef", "secretRef"):
                if ref in source:
                    source[ref]["name"] = prefix + source[ref]["name"]
        for value_from in (e["valueFrom"] for c in containers for e in c.get("env", []) if "valueFrom" in e):
            for ref in ("configMapKeyRef", "secretKeyRef"):
                if ref in value_from:
                    value_from[ref]["name"] = prefix + value_from[ref]["name"]
        (init,) = spec["initContainers"]
        assert init["image"] == FETCHER_IMAGE
        init["image"] = image
        init.setdefault("env", []).append({"name": "FETCHER_RETRY_BACKOFF", "value": "0.05"})
        init["env"] += [{"name": name, "value": value} for name, value in served.env.items()]
        if served.ca_file is not None:  # the registry's private CA, as the example's comments tell a reader
            ca = prefix + "registry-ca"
            ca_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": ca}}
            added.append(ca_map | {"data": {"ca.crt": served.ca_file.read_text()}})
            volumes.append(ca)
            spec["volumes"].append({"name": ca, "configMap": {"name": ca}})
            init["volumeMounts"].append({"name": ca, "mountPath": "/etc/registry-ca", "readOnly": True})
            init["env"].append({"name": "SSL_CERT_FILE", "value": "/etc/registry-ca/ca.crt"})
        # Keep the finished init container (podman removes it by default), so its log and exit code can be read.
        # podman 4.3 refuses an annotation value over 63 characters (KServe's notes to itself, such as the
        # storage URI it injected, can be longer; no container reads them), and a hostname over 63, where a
        # kubelet cuts the pod's name to 63.
        for where in {id(metadata): metadata, id(doc["metadata"]): doc["metadata"]}.values():
            notes = {k: v for k, v in where.get("annotations", {}).items() if len(v) <= 63}
            where["annotations"] = notes | {"io.podman.annotations.init.container.type": "always"}
        if len(doc["metadata"]["name"]) > 63:
            spec["hostname"] = doc["metadata"]["name"][:63].rstrip("-.")
        (app,) = spec["containers"]
        model_server = app["image"] in MODEL_SERVERS  # a platform's runtime: the stand-in lists /mnt/models
        assert app["image"] == APP_IMAGE or model_server, app["image"]
        app["image"] = image
        app.pop("args", None)
        app["command"] = ["python", "-c", MODEL_SERVER_CHECK if model_server else APP_CHECK]
        pod_name = doc["metadata"]["name"] if doc["kind"] == "Pod" else f"{doc['metadata']['name']}-pod-0"
        init_name, app_name = f"{pod_name}-{init['name']}", f"{pod_name}-{app['name']}"
    return Prepared(added + docs, pod_name, init_name, app_name, volumes)


def volume_exists(podman: Podman, name: str) -> bool:
    return podman.run("volume", "exists", name, check=False).returncode == 0


@pytest.fixture
def kube() -> Iterator[list[Played]]:
    played: list[Played] = []
    yield played
    for play in played:
        play.down()
    for volume in {v for play in played for v in play.volumes}:
        played[0].podman.run("volume", "rm", "--force", volume, check=False)


def play(path: Path, served: Served, tmp_path: Path, kube: list[Played], prefix: str | None = None) -> Played:
    """Every play in one test runs on the same node: a hostPath is shared, as on a cluster's node."""
    podman, image = session()
    prefix = prefix or f"fetcher-test-{uuid.uuid4().hex[:6]}-"
    prepared = prepare(path, image, served, prefix, tmp_path / "node")
    podman.run("pod", "rm", "--force", "--ignore", prepared.pod, check=False)
    docs, secrets = [], []
    mounted = {v["secret"]["secretName"] for spec in pod_specs(prepared.docs) for v in spec["volumes"] if "secret" in v}
    for doc in prepared.docs:
        name = doc["metadata"]["name"]
        if doc["kind"] == "Secret":
            # What `kubectl apply` would store. podman 4.3 stores a Secret from the manifest in a form its own
            # envFrom cannot read back (it expects a JSON map of base64 values), so it is created here. A secret
            # volume reads a whole Secret object instead, and writes each `data` value as it stands, without
            # decoding it (and ignores `stringData`): so its values are stored decoded.
            podman.run("secret", "rm", name, check=False)
            stored = doc["data"]
            if name in mounted:
                stored = doc | {"data": {k: base64.b64decode(v).decode() for k, v in doc["data"].items()}}
            podman.run("secret", "create", name, "-", stdin=json.dumps(stored).encode())
            secrets.append(name)
        elif doc["kind"] == "PersistentVolumeClaim" and volume_exists(podman, name):
            pass  # already bound, as on a cluster; podman would refuse to create it again
        else:
            docs.append(doc)
    manifest = tmp_path / f"{path.stem}-{uuid.uuid4().hex[:6]}.yaml"
    manifest.write_text(yaml.safe_dump_all(docs, sort_keys=False, width=2**20))
    result = podman.run("kube", "play", str(manifest), check=False, timeout=300)
    played = Played(
        podman,
        manifest,
        prepared.pod,
        prepared.init,
        prepared.app,
        prepared.volumes,
        secrets,
        result.returncode,
        result.stdout + result.stderr,
    )
    kube.append(played)
    return played


PLAYED = [
    "quickstart",
    "s3-credentials",
    "several-artifacts",
    "pvc",
    "deployment",
    "huggingface",
    "s3-prefix",
    "oci-modelpack",
    "node-cache",
]


@pytest.mark.parametrize("name", PLAYED)
def test_kube_play_the_app_sees_the_verified_model(
    name: str,
    origin: Origin,
    s3: S3,
    fake_hub: FakeHub,
    tmp_path: Path,
    kube: list[Played],
    request: pytest.FixtureRequest,
) -> None:
    path = EXAMPLES / f"{name}.yaml"
    registry = oci_registry(path, request)
    served = serve(path, origin, s3, fake_hub, registry=registry)

    played = play(path, served, tmp_path, kube)

    assert played.code == 0, played.output + played.logs(played.init)
    report = played.app_report()
    assert report["files"] == {name: sha256(data) for name, data in served.files.items()}
    assert report["model_path_exists"] is True, report
    init = played.state(played.init)
    assert init["ExitCode"] == 0 and init["Status"] == "exited"
    published = [e for e in played.events(played.init) if e.get("event") == "published"]
    assert published
    for event in published:
        if event["format"] == "directory":  # every file verified: by the hub's digests, or the SHA256SUMS
            assert event["verified"] == event["files"] == len(served.files), event
        else:
            assert event["verified"] is True, event
    if name == "huggingface":  # the Secret's token went to the hub, and never to its CDN
        hub_seen = [r.headers.get("authorization") for r in fake_hub.requests if r.server == "hub"]
        cdn_seen = [r.headers.get("authorization") for r in fake_hub.requests if r.server == "cdn"]
        assert hub_seen and set(hub_seen) == {f"Bearer {fake_hub.token}"}
        assert cdn_seen and set(cdn_seen) == {None}
    if registry is not None:  # the mounted pull secret opened the registry; the tag's digest is in the log
        resolved = [e for e in played.events(played.init) if e.get("event") == "resolved"]
        assert resolved and served.digest in resolved[-1]["note"], resolved
        pulled = [line for line in registry.access_log() if "/blobs/" in line.path and line.method == "GET"]
        assert pulled and {line.status for line in pulled} == {200}, pulled
        secret = "/var/run/secrets/registry/.dockerconfigjson"
        assert played.podman.run("exec", played.app, "test", "-e", secret, check=False).returncode == 1, (
            "the agent does not get the registry credentials"
        )
        logs = played.logs(played.init)
        assert registry.password not in logs and registry.basic_auth() not in logs


@pytest.mark.parametrize(
    "name",
    ["quickstart", "several-artifacts", "s3-credentials", "huggingface", "s3-prefix", "oci-modelpack", "node-cache"],
)
def test_kube_play_a_wrong_sha256_keeps_the_app_from_starting(
    name: str,
    origin: Origin,
    s3: S3,
    fake_hub: FakeHub,
    tmp_path: Path,
    kube: list[Played],
    request: pytest.FixtureRequest,
) -> None:
    """A wrong pin, or bytes that do not match what names them (the hub's digests, a registry's blob)."""
    path = EXAMPLES / f"{name}.yaml"
    registry = oci_registry(path, request)
    served = serve(path, origin, s3, fake_hub, wrong_sha256=True, registry=registry)

    played = play(path, served, tmp_path, kube)

    played.assert_stopped_by_a_mismatch()
    if name in AS_ROOT:  # nothing the pod refused went into the node's cache
        cache_blobs(tmp_path)


def test_kube_play_pvc_a_new_pod_does_not_download_again(
    origin: Origin, s3: S3, fake_hub: FakeHub, tmp_path: Path, kube: list[Played]
) -> None:
    path = EXAMPLES / "pvc.yaml"
    served = serve(path, origin, s3, fake_hub)
    prefix = f"fetcher-test-{uuid.uuid4().hex[:6]}-"

    first = play(path, served, tmp_path, kube, prefix)
    assert first.code == 0, first.output
    assert first.app_report()["files"] == {name: sha256(data) for name, data in served.files.items()}
    first.down()  # the pod is gone, the claim stays
    second = play(path, served, tmp_path, kube, prefix)

    assert second.code == 0, second.output
    assert second.app_report()["files"] == {name: sha256(data) for name, data in served.files.items()}
    done = [e for e in second.events(second.init) if e.get("event") == "done"]
    assert done and done[-1]["already_present"] == 1 and done[-1]["fetched"] == 0
    assert len(origin.hits("/sentiment-v3.tar.gz")) == 1


NODE_CACHE = "var/lib/fetcher-cache"  # node-cache.yaml's hostPath, under the test's node (see play)
STAT_MODELS = (
    "import json, os, pathlib; root = pathlib.Path('/models'); "
    "print(json.dumps({str(p.relative_to(root)): [p.stat().st_uid, p.stat().st_nlink] for p in root.rglob('*') "
    "if p.is_file() and p.relative_to(root).parts[0] != '.fetcher'}))"
)


def cache_blobs(tmp_path: Path) -> dict[Path, os.stat_result]:
    """The node cache's files (blobs/<algorithm>/<hex>), each checked against the digest that names it."""
    found = {}
    for blob in sorted((tmp_path / "node" / NODE_CACHE / "blobs").glob("*/*")):
        data = blob.read_bytes()
        algorithm = blob.parent.name
        assert algorithm in ("sha256", "sha1-git"), blob
        if algorithm == "sha256":
            assert sha256(data) == blob.name, blob
        else:  # the hub's id of a small file: its git blob id
            assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == blob.name, blob
        found[blob] = blob.stat()
    return found


def file_downloads(hub: FakeHub) -> list[str]:
    """The GETs of a file's bytes: from the hub (/resolve/) or its CDN, never a listing or a revision."""
    return [r.path for r in hub.requests if r.method == "GET" and (r.server == "cdn" or "/resolve" in r.path)]


def test_kube_play_node_cache_the_next_pod_publishes_from_the_cache(
    origin: Origin, s3: S3, fake_hub: FakeHub, tmp_path: Path, kube: list[Played]
) -> None:
    """Two pods of the Deployment on one node, one after the other, each with its own emptyDir: the second
    downloads nothing, and its app (uid 1000) gets its own copy, owned by it, while the cache is left as
    the first fetcher wrote it: root's, 0444, each file under its digest."""
    path = EXAMPLES / "node-cache.yaml"
    served = serve(path, origin, s3, fake_hub)
    expected = {name: sha256(data) for name, data in served.files.items()}

    first = play(path, served, tmp_path, kube)
    assert first.code == 0, first.output + first.logs(first.init)
    assert first.app_report()["files"] == expected
    assert not [e for e in first.events(first.init) if e.get("event") == "cache hit"], "the cache was empty"
    first.down()
    downloaded = file_downloads(fake_hub)
    assert downloaded
    blobs = cache_blobs(tmp_path)
    assert {sha256(blob.read_bytes()) for blob in blobs} == set(expected.values()), sorted(map(str, blobs))
    assert {(stat.S_IMODE(b.st_mode), b.st_uid) for b in blobs.values()} == {(0o444, 0)}, "root's, read-only"

    second = play(path, served, tmp_path, kube)

    assert second.code == 0, second.output + second.logs(second.init)
    assert second.app_report()["files"] == expected
    hits = [e for e in second.events(second.init) if e.get("event") == "cache hit"]
    assert hits and hits[-1]["files"] == len(expected), second.logs(second.init)
    assert file_downloads(fake_hub) == downloaded, "the second pod downloaded a file again"
    owned = json.loads(second.podman.run("exec", second.app, "python", "-c", STAT_MODELS).stdout)
    assert set(owned) == set(expected)
    assert all(uid == APP_UID and links == 1 for uid, links in owned.values()), owned  # copies, the app's own
    assert second.podman.run("exec", second.app, "test", "-e", "/cache", check=False).returncode == 1
    after = cache_blobs(tmp_path)  # the cache as the first fetcher left it
    assert {p: (b.st_ino, b.st_mode, b.st_uid) for p, b in after.items()} == {
        p: (b.st_ino, b.st_mode, b.st_uid) for p, b in blobs.items()
    }


# --- KServe and Seldon Core ---------------------------------------------------------------------------------
#
# k8s-examples/kserve/ and k8s-examples/seldon-core/ hold what a platform team applies (a ClusterStorageContainer,
# InferenceServices, a SeldonDeployment) and, under pods/, the pods KServe and Seldon make of them. The custom
# resources are validated against the platforms' own CRD schemas, vendored under */schemas/ (see
# kserve/schemas/vendor.py: the `kserve` SDK from PyPI was the other way, but it pulls in numpy, pandas, grpcio
# and fastapi, and its generated models check only that required fields are set, never an unknown one). The
# pods are checked against a port of the code that makes them, then played as the examples above are, with the
# model server replaced by MODEL_SERVER_CHECK.

KSERVE = EXAMPLES / "kserve"
SELDON = EXAMPLES / "seldon-core"
PLATFORM_FILES = sorted(p for folder in (KSERVE, SELDON) for p in folder.rglob("*.yaml"))
SCHEMA_FILES = sorted(EXAMPLES.glob("*/schemas/*.json"))
MINIO_HOST = "minio.minio.svc.cluster.local:9000"
LORA_REPO = "example-org/sentiment-v4-lora"
LORA_COMMIT = "PUT-THE-40-HEX-COMMIT-OF-THE-ADAPTER-HERE"
CA_PLACEHOLDER = "PUT-YOUR-CA-CERTIFICATES-PEM-HERE"
# The pods under */pods/, by the file they are made from.
PLATFORM_PODS = {
    "kserve/s3-prefix": KSERVE / "s3-prefix.yaml",
    "kserve/huggingface": KSERVE / "huggingface.yaml",
    "kserve/https-archive": KSERVE / "https-archive.yaml",
    "kserve/storage-uris": KSERVE / "storage-uris.yaml",
    "seldon-core/seldondeployment": SELDON / "seldondeployment.yaml",
}
# What KServe's inferenceservice-config holds in the cluster these pods were made in (storageInitializer and
# credentials.s3, as shipped, plus a CA bundle), and Seldon's seldon-config (its Helm chart's defaults).
KSERVE_STORAGE_INITIALIZER = {
    "image": "kserve/storage-initializer:v0.15.2",
    "cpuRequest": "100m",
    "cpuLimit": "1",
    "memoryRequest": "100Mi",
    "memoryLimit": "1Gi",
    "caBundleConfigMapName": "cabundle",
    "caBundleVolumeMountPath": "/etc/ssl/custom-certs",
}
KSERVE_HF_DEFAULTS = {  # utils.AddDefaultHuggingFaceEnvVars, for KServe's own downloader
    "HF_HUB_ENABLE_HF_TRANSFER": "1",
    "HF_XET_HIGH_PERFORMANCE": "1",
    "HF_XET_NUM_CONCURRENT_RANGE_GETS": "8",
}
KSERVE_S3_CONFIG = {"s3AccessKeyIDName": "AWS_ACCESS_KEY_ID", "s3SecretAccessKeyName": "AWS_SECRET_ACCESS_KEY"}
SELDON_STORAGE_INITIALIZER = {"cpuRequest": "100m", "cpuLimit": "1", "memoryRequest": "100Mi", "memoryLimit": "1Gi"}


def pod_of(name: str) -> Path:
    folder, stem = name.split("/")
    return EXAMPLES / folder / "pods" / f"{stem}.yaml"


def platform_docs(folder: Path) -> list[dict[str, Any]]:
    """Every object a platform's example files define (not its pods)."""
    return [doc for path in sorted(folder.glob("*.yaml")) for doc in documents(path)]


def test_the_platform_examples_are_all_checked() -> None:
    assert {pod_of(name) for name in PLATFORM_PODS} == set((KSERVE / "pods").glob("*.yaml")) - {
        KSERVE / "pods" / "global-ca-bundle.yaml"
    } | set((SELDON / "pods").glob("*.yaml"))
    listed = (KSERVE / "README.md").read_text()
    assert all(f"`{p.relative_to(KSERVE)}`" in listed for p in PLATFORM_FILES if p.is_relative_to(KSERVE))
    assert "`seldondeployment.yaml`" in (SELDON / "README.md").read_text()


def builtin(doc: dict[str, Any]) -> bool:
    return bool(doc["apiVersion"] == "v1" or doc["apiVersion"].startswith(("apps/", "batch/")))


def test_kubernetes_validate_strict_the_platform_files() -> None:
    """Every built-in object (Secret, ServiceAccount, ConfigMap, Pod); the custom resources are warned about
    here and checked against their own schemas below."""
    report = kubernetes_validate(PLATFORM_FILES)
    for path in PLATFORM_FILES:
        for doc in documents(path):
            if builtin(doc):
                assert f"passed for resource {doc['kind'].lower()}/{doc['metadata']['name']}" in report


def strict_schema(node: Any) -> Any:
    """A CRD's structural schema as strict field validation applies it: an object refuses what it does not
    declare, unless it keeps unknown fields or takes additionalProperties."""
    if isinstance(node, list):
        return [strict_schema(value) for value in node]
    if not isinstance(node, dict):
        return node
    out = dict(node)
    for key in ("properties", "$defs"):
        if key in node:
            out[key] = {name: strict_schema(value) for name, value in node[key].items()}
    for key in ("items", "additionalProperties", "not", "anyOf", "allOf", "oneOf"):
        if isinstance(node.get(key), dict | list):
            out[key] = strict_schema(node[key])
    keeps = "additionalProperties" in node or node.get("x-kubernetes-preserve-unknown-fields")
    if node.get("type") == "object" and not keeps:
        out["additionalProperties"] = False
    return out


def crd_validator(api_version: str, kind: str) -> Any:
    import jsonschema  # type: ignore[import-untyped]  # kubernetes-validate's: it validates with it

    for path in SCHEMA_FILES:
        vendored = json.loads(path.read_text())
        if (vendored["apiVersion"], vendored["kind"]) == (api_version, kind):
            schema = strict_schema(vendored["openAPIV3Schema"])
            schema["properties"]["metadata"] = {"type": "object"}  # an ObjectMeta: checked as such, below
            return jsonschema.Draft202012Validator(schema)
    raise AssertionError(f"no vendored schema for {kind} {api_version}")


CUSTOM_RESOURCES = [(path, doc) for path in PLATFORM_FILES for doc in documents(path) if not builtin(doc)]


@pytest.mark.parametrize(
    ("path", "doc"), CUSTOM_RESOURCES, ids=[f"{p.relative_to(EXAMPLES)}:{d['kind']}" for p, d in CUSTOM_RESOURCES]
)
def test_custom_resources_are_valid_by_their_crds(path: Path, doc: dict[str, Any]) -> None:
    import kubernetes_validate  # type: ignore[import-untyped]

    validator = crd_validator(doc["apiVersion"], doc["kind"])
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    assert not errors, errors
    as_configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}
    kubernetes_validate.validate(as_configmap, KUBERNETES_VERSION, strict=True)
    misspelt = json.loads(json.dumps(doc))  # the schema is strict: an unknown field is refused, at any depth
    misspelt["spec"]["storageUrl"] = "s3://models/x/"
    assert not validator.is_valid(misspelt)


def test_the_vendored_schemas_name_their_source() -> None:
    assert {path.name for path in SCHEMA_FILES} == {
        "serving.kserve.io_clusterstoragecontainers.v1alpha1.json",
        "serving.kserve.io_inferenceservices.v1beta1.json",
        "machinelearning.seldon.io_seldondeployments.v1.json",
    }
    for path in SCHEMA_FILES:
        source = json.loads(path.read_text())["source"]
        assert re.fullmatch("[0-9a-f]{40}", source["commit"]) and re.fullmatch("[0-9a-f]{64}", source["sha256"])
        assert source["repository"] in ("kserve/kserve", "SeldonIO/seldon-core") and source["path"].endswith(".yaml")


def test_the_cluster_storage_container_keeps_kserves_contract() -> None:
    (csc,) = documents(KSERVE / "cluster-storage-container.yaml")
    spec = csc["spec"]
    container = spec["container"]
    assert container["name"] == "storage-initializer", "KServe finds its init container by this name"
    assert "args" not in container, "they would replace KServe's [uri, path] pairs"
    assert container["image"] == FETCHER_IMAGE and container.get("command", ["fetcher"]) == ["fetcher"]
    assert [f["prefix"] for f in spec["supportedUriFormats"]] == ["s3://", "hf://", "https://", "oci://"]
    assert spec["workloadType"] == "initContainer" and spec["supportsMultiModelDownload"] is True
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])  # else the config's cpuLimit (1) applies
    for key, value in LOCKED_DOWN.items():
        assert container["securityContext"][key] == value, key
    assert container["securityContext"]["runAsUser"] == 65532


# A port of what makes the pods, enough for these examples: KServe's CommonStorageInitialization
# (pkg/webhook/admission/pod/storage_initializer_injector.go) with its credential builder (pkg/credentials/,
# s3/), and Seldon's InjectModelInitializer (operator/controllers/model_initializer_injector.go).

KSERVE_S3_ENV = [  # BuildS3EnvVars: (annotation, env name, secret data key) in the order it emits them
    ("serving.kserve.io/s3-verifyssl", "S3_VERIFY_SSL"),
    ("serving.kserve.io/s3-useanoncredential", "awsAnonymousCredential"),
    ("serving.kserve.io/s3-region", "AWS_DEFAULT_REGION"),
    ("serving.kserve.io/s3-usevirtualbucket", "S3_USER_VIRTUAL_BUCKET"),
    ("serving.kserve.io/s3-useaccelerate", "S3_USE_ACCELERATE"),
    ("serving.kserve.io/s3-cabundle", "AWS_CA_BUNDLE"),
    ("serving.kserve.io/s3-cabundle-configmap", "AWS_CA_BUNDLE_CONFIGMAP"),
]


def secret_ref(secret: str, key: str) -> dict[str, Any]:
    return {"valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def kserve_secret_env(secret: dict[str, Any]) -> list[dict[str, Any]]:
    """mountSecretCredential: the env of one Secret of the service account (S3 keys, or a Hugging Face token)."""
    data, notes = secret["stringData"], secret["metadata"].get("annotations", {})
    name = secret["metadata"]["name"]
    if KSERVE_S3_CONFIG["s3SecretAccessKeyName"] in data:
        env = [
            {"name": "AWS_ACCESS_KEY_ID"} | secret_ref(name, KSERVE_S3_CONFIG["s3AccessKeyIDName"]),
            {"name": "AWS_SECRET_ACCESS_KEY"} | secret_ref(name, KSERVE_S3_CONFIG["s3SecretAccessKeyName"]),
        ]
        endpoint = notes.get("serving.kserve.io/s3-endpoint", data.get("S3_ENDPOINT", "")).strip()
        if endpoint:
            if endpoint.lower().startswith(("https://", "http://")):
                https = "1" if endpoint.lower().startswith("https://") else "0"
                url, endpoint = endpoint, endpoint.split("://", 1)[1]
            else:
                https = notes.get("serving.kserve.io/s3-usehttps", data.get("S3_USE_HTTPS", ""))
                url = ("http://" if https == "0" else "https://") + endpoint
            env += [{"name": "S3_USE_HTTPS", "value": https}] if https else []
            env += [{"name": "S3_ENDPOINT", "value": endpoint}, {"name": "AWS_ENDPOINT_URL", "value": url}]
        for annotation, variable in KSERVE_S3_ENV:
            value = notes.get(annotation, data.get(variable, ""))
            env += [{"name": variable, "value": value}] if value else []
        return env
    if "HF_TOKEN" in data:
        return [{"name": "HF_TOKEN"} | secret_ref(name, "HF_TOKEN")]
    return []


def merge_env(env: list[dict[str, Any]], more: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """utils.MergeEnvs, and a strategic merge patch of env: by name, the later wins, new names at the end."""
    merged = {item["name"]: item for item in env}
    for item in more:
        merged[item["name"]] = item
    return list(merged.values())


def strategic_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """A strategic merge patch of a Container, as far as a ClusterStorageContainer uses one: maps merge,
    env and volumeMounts merge by their keys, other lists are replaced."""
    merged = dict(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = strategic_merge(base[key], value)
        elif key == "env":
            merged[key] = merge_env(base.get(key, []), value)
        elif key == "volumeMounts":
            mounts = {m["mountPath"]: m for m in base.get(key, [])} | {m["mountPath"]: m for m in value}
            merged[key] = list(mounts.values())
        else:
            merged[key] = value
    return merged


def common_parent(paths: list[str]) -> str:
    """utils.FindCommonParentPath."""
    if len(paths) == 1:
        return paths[0]
    parts = [p.strip("/").split("/") for p in paths]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return "/" + "/".join(common)


def kserve_pod(isvc: dict[str, Any], annotations: dict[str, str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The storage-initializer container and the volumes KServe adds for an InferenceService, with the
    ClusterStorageContainer and the Secrets and ServiceAccounts of k8s-examples/kserve/."""
    docs = platform_docs(KSERVE)
    (csc,) = by_kind(docs, "ClusterStorageContainer").values()
    predictor = isvc["spec"]["predictor"]
    if "storageUris" in predictor:
        pairs = [(u["uri"], u["mountPath"]) for u in predictor["storageUris"]]
        mount_path = common_parent([path for _, path in pairs])
        volume = mount_path.strip("/").replace("/", "-")
    else:
        pairs = [(predictor["model"]["storageUri"], "/mnt/models")]
        mount_path, volume = "/mnt/models", "kserve-provision-location"
    assert any(pairs[0][0].startswith(f["prefix"]) for f in csc["spec"]["supportedUriFormats"])
    config = KSERVE_STORAGE_INITIALIZER
    container: dict[str, Any] = {
        "name": "storage-initializer",
        "image": config["image"],
        "args": [text for pair in pairs for text in pair],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "resources": {
            "limits": {"cpu": config["cpuLimit"], "memory": config["memoryLimit"]},
            "requests": {"cpu": config["cpuRequest"], "memory": config["memoryRequest"]},
        },
        "volumeMounts": [{"name": volume, "mountPath": mount_path}],
    }
    volumes = [{"name": volume, "emptyDir": {}}]
    account = by_kind(docs, "ServiceAccount").get(predictor.get("serviceAccountName", "default"), {})
    env: list[dict[str, Any]] = []
    for ref in account.get("secrets", []):
        env = merge_env(env, kserve_secret_env(by_kind(docs, "Secret")[ref["name"]]))
    container = strategic_merge(container | ({"env": env} if env else {}), csc["spec"]["container"])
    if config["caBundleConfigMapName"]:  # a namespace other than KServe's gets the copy, global-ca-bundle
        ca_path = config["caBundleVolumeMountPath"] or "/etc/ssl/custom-certs"
        container["env"] = [
            *container.get("env", []),
            {"name": "CA_BUNDLE_CONFIGMAP_NAME", "value": "global-ca-bundle"},
            {"name": "CA_BUNDLE_VOLUME_MOUNT_POINT", "value": ca_path},
        ]
        volumes.append({"name": "cabundle-cert", "configMap": {"name": "global-ca-bundle"}})
        container["volumeMounts"].append({"name": "cabundle-cert", "mountPath": ca_path, "readOnly": True})
    for name, value in KSERVE_HF_DEFAULTS.items():
        if name not in {item["name"] for item in container["env"]}:
            container["env"].append({"name": name, "value": value})
    digest = annotations.get("internal.serving.kserve.io/verification-digest")
    if digest:  # KServe pull request 6051 (open): the model's verification.digest
        container["env"].append({"name": "VERIFICATION_DIGEST", "value": digest})
    return container, volumes


@pytest.mark.parametrize("name", [n for n in PLATFORM_PODS if n.startswith("kserve/")])
def test_the_kserve_pods_are_what_kserve_makes(name: str) -> None:
    (isvc,) = by_kind(documents(PLATFORM_PODS[name]), "InferenceService").values()
    (pod,) = documents(pod_of(name))
    spec = pod["spec"]
    annotations = pod["metadata"].get("annotations", {})
    expected, volumes = kserve_pod(isvc, annotations)
    (init,) = spec["initContainers"]
    assert init == expected
    assert [v for v in spec["volumes"] if v["name"] in {v["name"] for v in volumes}] == volumes
    predictor = isvc["spec"]["predictor"]
    assert spec.get("serviceAccountName") == predictor.get("serviceAccountName")
    assert spec["securityContext"] == predictor["securityContext"]
    (server,) = spec["containers"]
    assert server["name"] == "kserve-container" and server["image"] in MODEL_SERVERS
    model_mount = {"name": volumes[0]["name"], "mountPath": init["volumeMounts"][0]["mountPath"], "readOnly": True}
    assert model_mount in server["volumeMounts"], "the model server reads the same volume, read-only"
    if "storageUri" in predictor["model"]:  # the controller's note to the webhook: which URI to inject for
        source = annotations["internal.serving.kserve.io/storage-initializer-sourceuri"]
        assert source == predictor["model"]["storageUri"]


def test_the_seldon_pod_is_what_seldon_makes() -> None:
    docs = platform_docs(SELDON)
    (sdep,) = by_kind(docs, "SeldonDeployment").values()
    (predictor,) = sdep["spec"]["predictors"]
    graph, (component,) = predictor["graph"], predictor["componentSpecs"]
    (pod,) = documents(pod_of("seldon-core/seldondeployment"))
    spec = pod["spec"]
    config = SELDON_STORAGE_INITIALIZER
    volume = f"{graph['name']}-provision-location"
    assert spec["initContainers"] == [
        {
            "name": f"{graph['name']}-model-initializer",
            "image": graph["storageInitializerImage"],
            "imagePullPolicy": "IfNotPresent",
            "args": [graph["modelUri"], "/mnt/models"],
            "envFrom": [{"secretRef": {"name": graph["envSecretRefName"]}}],
            "resources": {
                "requests": {"cpu": config["cpuRequest"], "memory": config["memoryRequest"]},
                "limits": {"cpu": config["cpuLimit"], "memory": config["memoryLimit"]},
            },
            "terminationMessagePath": "/dev/termination-log",
            "terminationMessagePolicy": "File",
            "volumeMounts": [{"name": volume, "mountPath": "/mnt/models"}],
        }
    ]
    assert {"name": volume, "emptyDir": {}} in spec["volumes"]
    assert spec["securityContext"] == component["spec"]["securityContext"]
    (server,) = spec["containers"]
    (declared,) = component["spec"]["containers"]
    assert server["name"] == declared["name"] == graph["name"] and server["image"] in MODEL_SERVERS
    for key in ("securityContext", "resources"):  # a declared container's fields are kept
        assert server[key] == declared[key], key
    assert {"name": volume, "mountPath": "/mnt/models", "readOnly": True} in server["volumeMounts"]
    parameters = json.loads(container_env([], server)["PREDICTIVE_UNIT_PARAMETERS"])
    assert parameters == [{"name": "model_uri", "value": "/mnt/models", "type": "STRING"}]
    assert set(by_kind(docs, "Secret")[graph["envSecretRefName"]]["stringData"]) <= AWS_ENV, "fetcher's own env"


def platform_manifest(name: str, tmp_path: Path, ca_pem: str, without: tuple[str, ...] = ()) -> Path:
    """The pod with what it needs from its folder: the Secrets it names and KServe's CA bundle ConfigMap.
    ``without``: env names taken out of its init container."""
    pod_docs = documents(pod_of(name))
    (spec,) = pod_specs(pod_docs)
    for init in spec["initContainers"]:
        init["env"] = [item for item in init.get("env", []) if item["name"] not in without]
    containers = spec["initContainers"] + spec["containers"]
    named = {s["secretRef"]["name"] for c in containers for s in c.get("envFrom", []) if "secretRef" in s}
    named |= {
        e["valueFrom"]["secretKeyRef"]["name"]
        for c in containers
        for e in c.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    folder = EXAMPLES / name.split("/")[0]
    secrets = [doc for doc in platform_docs(folder) if doc["kind"] == "Secret" and doc["metadata"]["name"] in named]
    assert {doc["metadata"]["name"] for doc in secrets} == named
    maps = []
    if any(v.get("configMap", {}).get("name") == "global-ca-bundle" for v in spec["volumes"]):
        (bundle,) = documents(KSERVE / "pods" / "global-ca-bundle.yaml")
        assert bundle["data"]["cabundle.crt"].strip() == CA_PLACEHOLDER
        bundle["data"]["cabundle.crt"] = ca_pem
        maps.append(bundle)
    path = tmp_path / f"{name.replace('/', '-')}.yaml"
    path.write_text(yaml.safe_dump_all([*secrets, *maps, *pod_docs], sort_keys=False, width=2**20))
    return path


def put_model(s3: S3, bucket: str, prefix: str, files: dict[str, bytes], corrupt: str | None = None) -> None:
    """A model under an S3 prefix, each object with the SHA-256 S3 keeps (``aws s3 cp --checksum-algorithm
    SHA256``); ``corrupt``'s checksum is another file's, as bytes damaged at rest would be. A sibling prefix
    that shares the string is there too, and is not the model."""
    with contextlib.suppress(s3.client.exceptions.BucketAlreadyOwnedByYou):
        s3.client.create_bucket(Bucket=bucket)
    for name, data in files.items():
        checksum = base64.b64encode(hashlib.sha256(b"other bytes" if name == corrupt else data).digest()).decode()
        s3.client.put_object(
            Bucket=bucket, Key=prefix + name, Body=data, ChecksumAlgorithm="SHA256", ChecksumSHA256=checksum
        )
    s3.put(bucket, prefix.rstrip("/") + "-rc1/config.json", b'{"rc": 1}\n')


def lora_files() -> dict[str, bytes]:
    return {
        "adapter_config.json": b'{"peft_type": "LORA", "r": 8}\n',
        "adapter_model.safetensors": bytes(range(256)) * 2048,
    }


def serve_platform(name: str, s3: S3, hub: FakeHub, https: Origin, wrong: bool = False) -> Served:
    """What the pod's sources hold, on loopback. ``wrong``: bytes that do not match what names them (an
    S3 checksum, the hub's digest) or, for the archive, a VERIFICATION_DIGEST that is not its own."""
    bucket = f"models-{uuid.uuid4().hex[:8]}"  # the session's moto holds the other tests' buckets too
    host = s3.endpoint.removeprefix("http://")
    replacements = {
        "s3://models/": f"s3://{bucket}/",
        MINIO_HOST: host,
        "fetcher-reader": s3.env["AWS_ACCESS_KEY_ID"],
        "change-me-to-the-real-secret": s3.env["AWS_SECRET_ACCESS_KEY"],
    }
    files: dict[str, bytes] = {}
    env: dict[str, str] = {}
    text = pod_of(name).read_text()
    if "s3://models/sentiment/v4/" in text:
        base = "base/" if name == "kserve/storage-uris" else ""
        put_model(s3, bucket, "sentiment/v4/", model_files(), corrupt="model.safetensors" if wrong else None)
        files |= {base + k: v for k, v in model_files().items()}
    attributes = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}  # every repo has one
    for repo, placeholder, repo_files, under in (
        (HF_REPO, HF_COMMIT, model_files() | attributes, ""),
        (LORA_REPO, LORA_COMMIT, lora_files() | attributes, "adapter/"),
    ):
        if placeholder in text:
            replacements |= {placeholder: hub.add_repo(repo, repo_files, private=True), HF_TOKEN: str(hub.token)}
            if wrong and not files:
                hub.corrupt(repo, "model.safetensors")
            files |= {under + k: v for k, v in repo_files.items()}
            env["HF_ENDPOINT"] = hub.endpoint
    if ORIGIN in text:
        archive = make_tar(dict(model_files()))
        https.add("/sentiment-v3.tgz", archive)
        replacements |= {
            ORIGIN: https.url("").rstrip("/"),
            PLACEHOLDER_SHA256: sha256(b"not the archive" if wrong else archive),
        }
        files |= model_files()
    assert files, name
    return Served(replacements, files, env)


PLATFORM_PLAYED = list(PLATFORM_PODS)


@pytest.mark.parametrize("name", PLATFORM_PLAYED)
def test_fetcher_accepts_the_platform_pods(
    name: str, tmp_path: Path, s3: S3, fake_hub: FakeHub, tls_origin: Origin, tls: Any
) -> None:
    """`fetcher --dry-run` with the init container's args and env as the platform gives them."""
    served = serve_platform(name, s3, fake_hub, tls_origin)
    manifest = platform_manifest(name, tmp_path, tls.ca_file.read_text())
    (tmp_path / "dry").mkdir()
    check_fetcher_accepts(manifest, tmp_path / "dry", served, s3_checksums=True)


@pytest.mark.parametrize("name", PLATFORM_PLAYED)
def test_kube_play_the_model_server_sees_exactly_the_model(
    name: str, s3: S3, fake_hub: FakeHub, tls_origin: Origin, tls: Any, tmp_path: Path, kube: list[Played]
) -> None:
    served = serve_platform(name, s3, fake_hub, tls_origin)

    played = play(platform_manifest(name, tmp_path, tls.ca_file.read_text()), served, tmp_path, kube)

    assert played.code == 0, played.output + played.logs(played.init)
    report = played.app_report()
    assert report["files"] == {path: sha256(data) for path, data in served.files.items()}
    top = {path.split("/")[0] for path in served.files}
    assert set(report["listing"]) - {".fetcher"} == top, report["listing"]
    init = played.state(played.init)
    assert init["ExitCode"] == 0 and init["Status"] == "exited"
    published = [e for e in played.events(played.init) if e.get("event") == "published"]
    (pod,) = pod_specs(documents(pod_of(name)))
    assert len(published) == len(pod["initContainers"][0]["args"]) // 2, "one artifact per SRC DEST pair"
    for event in published:
        if event["format"] == "directory":  # every file verified: by S3's checksums, or the hub's digests
            assert event["verified"] == event["files"] > 0, event
        else:
            assert event["verified"] is True, event
    if "HF_ENDPOINT" in served.env:  # the Secret's token went to the hub, and never to its CDN
        assert {r.headers.get("authorization") for r in fake_hub.requests if r.server == "hub"} == {
            f"Bearer {fake_hub.token}"
        }
        assert {r.headers.get("authorization") for r in fake_hub.requests if r.server == "cdn"} <= {None}
    logs = played.logs(played.init)
    assert s3.env["AWS_SECRET_ACCESS_KEY"] not in logs and str(fake_hub.token) not in logs
    events = {e.get("event"): e for e in played.events(played.init)}
    assert "KServe settings not supported, ignored" not in events and "CA bundle not found" not in logs
    if name.startswith("kserve/"):  # every variable of KServe's in the pod took effect (but its own HF_* tuning)
        given = {item["name"] for item in pod["initContainers"][0]["env"]} - set(KSERVE_HF_DEFAULTS)
        assert given <= set(events["KServe settings read"]["names"]), events["KServe settings read"]


@pytest.mark.parametrize("name", PLATFORM_PLAYED)
def test_kube_play_a_wrong_digest_keeps_the_model_server_from_starting(
    name: str, s3: S3, fake_hub: FakeHub, tls_origin: Origin, tls: Any, tmp_path: Path, kube: list[Played]
) -> None:
    served = serve_platform(name, s3, fake_hub, tls_origin, wrong=True)

    played = play(platform_manifest(name, tmp_path, tls.ca_file.read_text()), served, tmp_path, kube)

    played.assert_stopped_by_a_mismatch()


def test_kube_play_kserve_s3_endpoint_alone(
    s3: S3, fake_hub: FakeHub, tls_origin: Origin, tls: Any, tmp_path: Path, kube: list[Played]
) -> None:
    """Without AWS_ENDPOINT_URL (which boto3 reads itself) the endpoint is KServe's S3_ENDPOINT, a host with
    no scheme, and S3_USE_HTTPS ("0") its scheme, as KServe's own initializer reads them."""
    name = "kserve/s3-prefix"
    served = serve_platform(name, s3, fake_hub, tls_origin)
    manifest = platform_manifest(name, tmp_path, tls.ca_file.read_text(), without=("AWS_ENDPOINT_URL",))

    played = play(manifest, served, tmp_path, kube)

    assert played.code == 0, played.output + played.logs(played.init)
    assert played.app_report()["files"] == {path: sha256(data) for path, data in served.files.items()}
    (read,) = [e for e in played.events(played.init) if e.get("event") == "KServe settings read"]
    assert {"S3_ENDPOINT", "S3_USE_HTTPS"} <= set(read["names"]) and "AWS_ENDPOINT_URL" not in read["names"]
