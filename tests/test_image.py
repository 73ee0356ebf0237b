"""The image, built with podman from the Dockerfile and run as `docker run` would run it.

Read-only root filesystem (and, unlike podman's default, no tmpfs on /tmp), a numeric non-root user, a
volume for /models and configuration by env, fetching from a loopback HTTP server and from moto's S3
server. The first run on a machine builds the base image and the fetcher image (about a minute); later
runs reuse both while the build context is unchanged.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fetcher import __version__
from tests.conftest import S3, Origin, make_tar, model_files, sha256, tree
from tests.container_support import ROOT, Podman, session

pytestmark = pytest.mark.xdist_group("containers")  # one podman at a time, on one xdist worker

USER = "65532:65532"


@pytest.fixture
def image() -> tuple[Podman, str]:
    return session()


@dataclass
class Ran:
    code: int
    stdout: str
    stderr: str
    events: list[dict[str, Any]]

    def event(self, name: str) -> dict[str, Any]:
        found = [e for e in self.events if e.get("event") == name]
        assert found, f"no {name!r} event in:\n{self.stderr}"
        return found[-1]


def docker_run(podman: Podman, image: str, dest: Path, env: dict[str, str], *args: str) -> Ran:
    """`docker run --rm --read-only --user 65532:65532 -v dest:/models -e ... image args`."""
    options = ["run", "--rm", "--network", "host", "--read-only", "--read-only-tmpfs=false", "--user", USER]
    options += ["--volume", f"{dest}:/models"]
    for name, value in env.items():
        options += ["--env", f"{name}={value}"]
    process = podman.run(*options, image, *args, check=False, timeout=180)
    events = []
    for line in process.stderr.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            events.append({"event": "(not json)", "line": line})
    return Ran(process.returncode, process.stdout, process.stderr, events)


def models_dir(tmp_path: Path) -> Path:
    dest = tmp_path / "models"
    dest.mkdir()
    os.chown(dest, 65532, 65532)  # what fsGroup or an emptyDir gives the pod
    return dest


def expected_files() -> dict[str, bytes]:
    return {k: v for k, v in model_files().items() if isinstance(v, bytes)}


# --- the Dockerfile itself ----------------------------------------------------------------------------------


def test_hadolint_finds_nothing() -> None:
    hadolint = Path(os.sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_defaults() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.13-slim$", text, re.M)
    assert text.count("FROM ${PYTHON_IMAGE}") == 2, "both stages start from the same image"
    assert f"ARG VERSION={__version__}\n" in text, "the version label follows fetcher.__version__"
    assert 'USER 65532:65532\nENTRYPOINT ["fetcher"]' in text


# --- the built image ----------------------------------------------------------------------------------------


def test_image_metadata(image: tuple[Podman, str]) -> None:
    podman, tag = image
    config = json.loads(podman.run("image", "inspect", tag).stdout)[0]["Config"]
    assert config["User"] == USER
    assert config["Entrypoint"] == ["fetcher"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == "fetcher"
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.base.name"].startswith("localhost/fetcher-test-base")

    started = time.monotonic()
    version = podman.run("run", "--rm", "--read-only", tag, "--version")
    seconds = time.monotonic() - started
    assert version.stdout.strip() == f"fetcher {__version__}"
    assert seconds < 20, f"`fetcher --version` took {seconds:.1f} s in the container"


def test_image_holds_only_the_venv_on_top_of_the_base(image: tuple[Podman, str]) -> None:
    podman, tag = image
    probe = (
        "import json, os, shutil, sys, pathlib; "
        "venv = pathlib.Path('/opt/venv'); "
        "size = sum(p.stat().st_size for p in venv.rglob('*') if p.is_file() and not p.is_symlink()); "
        "print(json.dumps({'size': size, 'prefix': sys.prefix, 'version': list(sys.version_info[:3]), "
        "'pip': (venv / 'bin' / 'pip').exists(), 'compilers': [c for c in ('cc', 'gcc', 'clang') if shutil.which(c)], "
        "'src': os.path.exists('/src'), 'tests': [str(p) for p in venv.rglob('tests/test_*.py')][:3], "
        "'pip_cache': os.path.exists('/root/.cache/pip')}))"
    )
    out = podman.run("run", "--rm", "--read-only", "--entrypoint", "python", tag, "-c", probe).stdout
    found = json.loads(out)
    assert found["prefix"] == "/opt/venv"
    assert tuple(found["version"]) >= (3, 13, 4)
    assert found["pip"] is False and found["compilers"] == [] and found["src"] is False
    assert found["tests"] == [] and found["pip_cache"] is False
    assert found["size"] < 40 * 2**20, f"the venv grew to {found['size'] / 2**20:.1f} MiB"


# --- running it ---------------------------------------------------------------------------------------------


def test_docker_run_fetches_over_http_into_a_volume(image: tuple[Podman, str], origin: Origin, tmp_path: Path) -> None:
    podman, tag = image
    archive = make_tar(model_files())
    url = origin.add("/sentiment-v3.tar.gz", archive, etag='"v3"')
    dest = models_dir(tmp_path)
    env = {"FETCHER_SOURCE": url, "FETCHER_SHA256": sha256(archive), "FETCHER_DEST": "/models"}

    run = docker_run(podman, tag, dest, env)

    assert run.code == 0, run.stderr
    assert tree(dest) == expected_files()
    assert run.event("published")["verified"] is True
    assert {p.stat().st_uid for p in dest.rglob("*")} == {65532}
    assert (dest / ".fetcher").is_dir()

    again = docker_run(podman, tag, dest, env)  # a restarted pod with the same volume
    assert again.code == 0, again.stderr
    assert again.event("done")["already_present"] == 1
    assert len(origin.hits("/sentiment-v3.tar.gz")) == 1


def test_docker_run_with_a_wrong_sha256_exits_4_and_publishes_nothing(
    image: tuple[Podman, str], origin: Origin, tmp_path: Path
) -> None:
    podman, tag = image
    archive = make_tar(model_files())
    url = origin.add("/sentiment-v3.tar.gz", archive)
    dest = models_dir(tmp_path)
    env = {"FETCHER_SOURCE": url, "FETCHER_SHA256": sha256(b"another model"), "FETCHER_DEST": "/models"}

    run = docker_run(podman, tag, dest, env)

    assert run.code == 4, run.stderr
    assert "sha256 mismatch" in run.event("failed")["error"]
    assert run.event("failed")["exit_code"] == 4
    assert tree(dest) == {}


def test_docker_run_fetches_from_s3(image: tuple[Podman, str], s3: S3, tmp_path: Path) -> None:
    podman, tag = image
    archive = make_tar(model_files(), compression="xz")
    source = s3.put("models", "sentiment/v3/model.tar.xz", archive)
    dest = models_dir(tmp_path)
    env = s3.env | {"FETCHER_SOURCE": source, "FETCHER_SHA256": sha256(archive), "FETCHER_DEST": "/models"}

    run = docker_run(podman, tag, dest, env)

    assert run.code == 0, run.stderr
    assert tree(dest) == expected_files()
    assert run.event("published")["format"] == "tar.xz"
    assert env["AWS_SECRET_ACCESS_KEY"] not in run.stderr


def test_a_read_only_volume_is_exit_6(image: tuple[Podman, str], origin: Origin, tmp_path: Path) -> None:
    podman, tag = image
    url = origin.add("/vocab.txt", b"good\nbad\n")
    dest = tmp_path / "models"
    dest.mkdir()  # owned by root: the user of the image cannot write it, as without fsGroup
    env = {"FETCHER_SOURCE": url, "FETCHER_SHA256": sha256(b"good\nbad\n"), "FETCHER_DEST": "/models"}

    run = docker_run(podman, tag, dest, env)

    assert run.code == 6, run.stderr
    assert run.event("failed")["exit_code"] == 6
