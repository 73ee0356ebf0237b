"""k8s-examples/: valid, locked down, fetcher's own settings, and proven by running them.

Offline: yamllint, and `kubernetes-validate --strict` against a pinned Kubernetes version. Then what that
schema cannot see: the security settings, resources and termination message policy on every container, the
image names, that every env name is one fetcher (or the AWS SDK) reads, and that fetcher itself accepts each
example's configuration (`--dry-run`).

Then as a cluster would run them: `podman kube play`, which runs init containers before app containers and
does not start the app when an init container fails. Each example is played as written, except: the fetcher
image is the local build; the app image (sentiment-agent:1.0, which does not exist) is the same local image
running a few lines of Python that print what it finds in the model volume; https://models.example.com and
the MinIO endpoint are loopback servers, and the placeholder sha256 is the served archive's; the pod uses
the host's network (loopback); volume names get a test prefix; and restartPolicy is Never, because podman
4.3 applies the pod's restart policy to init containers too (Always would re-run a finished init container
in a loop, which a kubelet does not do).
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from fetcher import __version__
from fetcher.config import OPTIONS
from tests.conftest import S3, Origin, make_tar, run_fetcher, sha256
from tests.container_support import ROOT, Podman, session

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
LOCKED_DOWN = {
    "runAsNonRoot": True,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


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
        env[item["name"]] = item["value"]
    return env


def ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


def test_there_are_the_five_examples() -> None:
    assert {p.stem for p in EXAMPLE_FILES} >= {"quickstart", "s3-credentials", "several-artifacts", "pvc", "deployment"}
    quickstart = documents(EXAMPLES / "quickstart.yaml")
    assert set(by_kind(quickstart, "ConfigMap")["fetcher-config"]["data"]) == {
        "FETCHER_SOURCE",
        "FETCHER_SHA256",
        "FETCHER_DEST",
    }


# --- offline validation -------------------------------------------------------------------------------------


def tool(name: str) -> str:
    return str(Path(subprocess.sys.executable).parent / name)


def test_yamllint() -> None:
    result = subprocess.run(
        [tool("yamllint"), "--strict", "-c", str(EXAMPLES / ".yamllint.yaml"), str(EXAMPLES)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_validate_strict() -> None:
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, *map(str, EXAMPLE_FILES)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for path in EXAMPLE_FILES:
        assert f"{path.relative_to(ROOT)} passed" in result.stdout


# --- what the schema misses ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=ids(EXAMPLE_FILES))
def test_every_container_is_locked_down(path: Path) -> None:
    specs = pod_specs(documents(path))
    assert specs
    for spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["securityContext"]["runAsUser"] == 65532
        assert spec.get("restartPolicy", "Always") != "Never", "a failed fetch must be retried"
        for container in spec.get("initContainers", []) + spec["containers"]:
            where = f"{path.name}: {container['name']}"
            context = container.get("securityContext", {})
            for key, value in LOCKED_DOWN.items():
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
            unknown = set(env) - FETCHER_ENV - AWS_ENV
            assert not unknown, f"{path.name}: env names fetcher does not read: {sorted(unknown)}"
            secrets = {s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s}
            for secret in secrets:  # credentials only in Secrets, and nothing but AWS_* there
                assert set(by_kind(docs, "Secret")[secret]["stringData"]) <= AWS_ENV
            for name, value in env.items():
                if re.search(r"SECRET|TOKEN", name) and not name.endswith("_FILE"):
                    assert any(name in by_kind(docs, "Secret")[s]["stringData"] for s in secrets), name
                assert isinstance(value, str), f"{name}: env values are strings in Kubernetes"


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=ids(EXAMPLE_FILES))
def test_fetcher_accepts_the_configuration(path: Path, tmp_path: Path) -> None:
    check_fetcher_accepts(path, tmp_path)


def test_the_readme_pod_is_valid_and_accepted(tmp_path: Path) -> None:
    """The Pod in the README is the first one a reader copies: it is held to the examples' checks."""
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (manifest,) = [block for block in blocks if "kind: Pod" in block]
    path = tmp_path / "readme-pod.yaml"
    path.write_text(manifest)
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    quickstart = by_kind(documents(EXAMPLES / "quickstart.yaml"), "ConfigMap")["fetcher-config"]
    assert by_kind(documents(path), "ConfigMap")["fetcher-config"]["data"] == quickstart["data"]
    check_fetcher_accepts(path, tmp_path)


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


def check_fetcher_accepts(path: Path, tmp_path: Path, *, pinned: bool = True) -> None:
    """`fetcher --dry-run` with the example's env, args and mounted config files; dest is the shared volume.

    The examples hold placeholders where the reader's digests go; ``pinned`` puts real-looking ones there.
    """
    text = path.read_text()
    if pinned:
        text = text.replace(PLACEHOLDER_SHA256, "9f" * 32).replace(VOCAB_SHA256, "4b" * 32)
    path = tmp_path / path.name
    path.write_text(text)
    docs = documents(path)
    for spec in pod_specs(docs):
        volumes = {v["name"]: v for v in spec["volumes"]}
        (container,) = fetcher_containers(spec)
        mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
        env = {k: v for k, v in container_env(docs, container).items() if not k.startswith("AWS_")}
        args = list(container.get("args", []))
        for mount_path, mount in mounts.items():
            config_map = volumes[mount["name"]].get("configMap")
            if config_map:  # materialise the ConfigMap volume and point the args at it
                local = tmp_path / mount["name"]
                local.mkdir()
                for key, text in by_kind(docs, "ConfigMap")[config_map["name"]]["data"].items():
                    (local / key).write_text(text)
                args = [a.replace(mount_path, str(local)) for a in args]
        run = run_fetcher("--dry-run", *args, env=env)
        assert run.code == 0, run.stderr
        plan = json.loads(run.stdout)["artifacts"]
        assert plan and all(a["sha256"] for a in plan), "every artifact is pinned by sha256"
        for artifact in plan:
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


@dataclass
class Served:
    """What the loopback servers hold, and the text replacements that point an example at them."""

    replacements: dict[str, str]
    files: dict[str, bytes]  # what the app should see under /models


def model_archive() -> tuple[bytes, dict[str, bytes]]:
    files = {
        "sentiment-model/config.json": b'{"architectures": ["SentimentClassifier"]}\n',
        "sentiment-model/weights.safetensors": bytes(range(256)) * 512,
    }
    archive = make_tar(dict(files))  # type: ignore[arg-type]
    return archive, files


def serve(path: Path, origin: Origin, s3: S3, wrong_sha256: bool = False) -> Served:
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


def prepare(path: Path, image: str, served: Served, prefix: str) -> Prepared:
    """The example as a local cluster can run it, and the names podman will give what it creates.

    Every object's name gets the prefix (and so every reference to it), as podman's pods, secrets and
    volumes are global to the machine: two test runs at once must not meet.
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
        for volume in spec["volumes"]:
            if "configMap" in volume:
                volume["configMap"]["name"] = prefix + volume["configMap"]["name"]
            if "persistentVolumeClaim" in volume:
                volume["persistentVolumeClaim"]["claimName"] = prefix + volume["persistentVolumeClaim"]["claimName"]
            if "emptyDir" in volume:
                volumes.append(prefix + volume["name"])  # podman 4.3 makes an emptyDir a named volume
            for mount in (m for c in containers for m in c.get("volumeMounts", [])):
                if mount["name"] == volume["name"]:
                    mount["name"] = prefix + volume["name"]
            volume["name"] = prefix + volume["name"]
        for source in (s for c in containers for s in c.get("envFrom", [])):
            for ref in ("configMapRef", "secretRef"):
                if ref in source:
                    source[ref]["name"] = prefix + source[ref]["name"]
        (init,) = spec["initContainers"]
        assert init["image"] == FETCHER_IMAGE
        init["image"] = image
        init.setdefault("env", []).append({"name": "FETCHER_RETRY_BACKOFF", "value": "0.05"})
        # Keep the finished init container (podman removes it by default), so its log and exit code can be read.
        for where in {id(metadata): metadata, id(doc["metadata"]): doc["metadata"]}.values():
            where.setdefault("annotations", {})["io.podman.annotations.init.container.type"] = "always"
        (app,) = spec["containers"]
        assert app["image"] == APP_IMAGE
        app["image"] = image
        app["command"] = ["python", "-c", APP_CHECK]
        pod_name = doc["metadata"]["name"] if doc["kind"] == "Pod" else f"{doc['metadata']['name']}-pod-0"
        init_name, app_name = f"{pod_name}-{init['name']}", f"{pod_name}-{app['name']}"
    return Prepared(docs, pod_name, init_name, app_name, volumes)


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
    podman, image = session()
    prefix = prefix or f"fetcher-test-{uuid.uuid4().hex[:6]}-"
    prepared = prepare(path, image, served, prefix)
    podman.run("pod", "rm", "--force", "--ignore", prepared.pod, check=False)
    docs, secrets = [], []
    for doc in prepared.docs:
        name = doc["metadata"]["name"]
        if doc["kind"] == "Secret":
            # What `kubectl apply` would store. podman 4.3 stores a Secret from the manifest in a form its own
            # envFrom cannot read back (it expects a JSON map of base64 values), so it is created here.
            podman.run("secret", "rm", name, check=False)
            podman.run("secret", "create", name, "-", stdin=json.dumps(doc["data"]).encode())
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


PLAYED = ["quickstart", "s3-credentials", "several-artifacts", "pvc", "deployment"]


@pytest.mark.parametrize("name", PLAYED)
def test_kube_play_the_app_sees_the_verified_model(
    name: str, origin: Origin, s3: S3, tmp_path: Path, kube: list[Played]
) -> None:
    path = EXAMPLES / f"{name}.yaml"
    served = serve(path, origin, s3)

    played = play(path, served, tmp_path, kube)

    assert played.code == 0, played.output
    report = played.app_report()
    assert report["files"] == {name: sha256(data) for name, data in served.files.items()}
    assert report["model_path_exists"] is True, report
    init = played.state(played.init)
    assert init["ExitCode"] == 0 and init["Status"] == "exited"
    published = [e for e in played.events(played.init) if e.get("event") == "published"]
    assert published and all(e["verified"] for e in published)


@pytest.mark.parametrize("name", ["quickstart", "several-artifacts", "s3-credentials"])
def test_kube_play_a_wrong_sha256_keeps_the_app_from_starting(
    name: str, origin: Origin, s3: S3, tmp_path: Path, kube: list[Played]
) -> None:
    path = EXAMPLES / f"{name}.yaml"
    served = serve(path, origin, s3, wrong_sha256=True)

    played = play(path, served, tmp_path, kube)

    assert played.code != 0
    assert "exited with code 4" in played.output, played.output
    init = played.state(played.init)
    assert init["ExitCode"] == 4 and init["Status"] == "exited"
    failed = [e for e in played.events(played.init) if e.get("event") == "failed"]
    assert failed and failed[-1]["exit_code"] == 4 and "sha256 mismatch" in failed[-1]["error"]
    app = played.state(played.app)
    assert app["Status"] in ("created", "configured"), app
    assert app["StartedAt"].startswith("0001-01-01"), "the app container never started"


def test_kube_play_pvc_a_new_pod_does_not_download_again(
    origin: Origin, s3: S3, tmp_path: Path, kube: list[Played]
) -> None:
    path = EXAMPLES / "pvc.yaml"
    served = serve(path, origin, s3)
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
