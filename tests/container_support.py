"""Podman, the base image and the fetcher image, for the container tests.

The image is built and run as a user would with Docker, but with podman from Debian's packages (no engine, no
image pulls here). ``scripts/container-tools`` installs podman, runc, catatonit and mmdebstrap and writes the
containers.conf podman needs on this kind of machine; ``.ci/run`` calls it.

- The base image stands in for ``python:3.13-slim``: a Debian trixie root filesystem (Python 3.13) made by
  mmdebstrap and imported into podman, passed as ``PYTHON_IMAGE``. Built once per machine and kept.
- The fetcher image is tagged with a hash of its build context (Dockerfile, .dockerignore, pyproject.toml,
  README.md, fetcher/), so an unchanged tree reuses the image of an earlier run.
- pip inside the build uses this machine's pip configuration (``pip config list``: index, certificate,
  constraints), written to a temporary pip.conf and bind-mounted at build time only, with the files and
  directories it names; the host's CA bundle is mounted at /etc/ssl/certs/ca-certificates.crt. Host
  networking only: podman's default bridge lives on a private range.

Without podman the tests skip, except under CI=true, where they fail: CI must not skip them silently.
"""

from __future__ import annotations

import configparser
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import unavailable

ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = "localhost/fetcher-test-base:trixie"
IMAGE_REPO = "localhost/fetcher"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BASE_PACKAGES = "python3,python3-venv,python3-pip,python-is-python3,ca-certificates"
CONTEXT_FILES = ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md")


def containers_conf() -> Path | None:
    given = os.environ.get("CONTAINERS_CONF")
    if given:
        return Path(given)
    default = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "fetcher" / "containers.conf"
    return default if default.is_file() else None


@dataclass
class Podman:
    env: dict[str, str]

    def run(
        self, *args: str, check: bool = True, timeout: float = 300, stdin: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        process = subprocess.run(
            ["podman", *args],
            input=stdin.decode() if stdin is not None else None,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
        )
        if check and process.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)} exited {process.returncode}:\n{process.stdout}\n{process.stderr}"
            )
        return process

    def image_exists(self, ref: str) -> bool:
        return self.run("image", "exists", ref, check=False).returncode == 0


def find_podman() -> Podman:
    if shutil.which("podman") is None:
        unavailable("podman is not installed: run scripts/container-tools (as root)")
    conf = containers_conf()
    if conf is None or not conf.is_file():
        unavailable("no containers.conf for podman: run scripts/container-tools, or set CONTAINERS_CONF")
    env = dict(os.environ, CONTAINERS_CONF=str(conf))
    podman = Podman(env)
    info = podman.run("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False, timeout=60)
    if info.returncode != 0:
        unavailable(f"podman does not work here: {info.stderr.strip()[-500:]}")
    return podman


def ensure_base_image(podman: Podman) -> str:
    """The stand-in for python:3.13-slim, kept between runs."""
    if podman.image_exists(BASE_IMAGE):
        return BASE_IMAGE
    if shutil.which("mmdebstrap") is None:
        unavailable("mmdebstrap is not installed: run scripts/container-tools (as root)")
    with tempfile.TemporaryDirectory(prefix="fetcher-rootfs-") as scratch:
        rootfs = Path(scratch) / "rootfs.tar"
        made = subprocess.run(
            ["mmdebstrap", "--quiet", "--variant=apt", f"--include={BASE_PACKAGES}", "trixie", str(rootfs)],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if made.returncode != 0:
            raise AssertionError(f"mmdebstrap failed:\n{made.stderr[-3000:]}")
        # python:3.13-slim sets PATH and runs as root; so does this stand-in.
        podman.run(
            "import",
            "--change",
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--change",
            'CMD ["python3"]',
            str(rootfs),
            BASE_IMAGE,
        )
    return BASE_IMAGE


def context_digest() -> str:
    """A hash of everything the build sees (the .dockerignore keeps only these)."""
    digest = hashlib.sha256()
    files = [ROOT / name for name in CONTEXT_FILES]
    files += sorted(p for p in (ROOT / "fetcher").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for path in files:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def pip_config() -> dict[str, dict[str, str]]:
    """This machine's effective pip settings (files and PIP_* env), as pip itself reports them."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    sections: dict[str, dict[str, str]] = {}
    env_values: dict[str, str] = {}
    for line in listed.splitlines():
        match = re.fullmatch(r"(:env:|[\w-]+)\.([\w-]+)='(.*)'", line.strip())
        if not match:
            continue
        section, key, value = match.groups()
        if section == ":env:":
            env_values[key] = value
        else:
            sections.setdefault(section, {})[key] = value
    sections.setdefault("global", {}).update(env_values)  # the env wins over the files, as in pip
    return sections


def pip_mounts(config: dict[str, dict[str, str]], scratch: Path) -> list[str]:
    """Volume options that give the build's pip the host's configuration, and the files it names."""
    parser = configparser.ConfigParser(interpolation=None)
    for section, values in config.items():
        parser[section] = values
    conf = scratch / "pip.conf"
    with conf.open("w", encoding="utf-8") as out:
        parser.write(out)
    mounts = {"/etc/pip.conf": str(conf)}
    if CA_BUNDLE.is_file():
        mounts[str(CA_BUNDLE)] = str(CA_BUNDLE.resolve())
    for values in config.values():
        for key, value in values.items():
            if key not in ("cert", "client-cert", "constraint", "find-links", "extra-index-url", "index-url"):
                continue
            for item in value.split():
                if not item.startswith(("file://", "/")):
                    continue
                path = Path(item.removeprefix("file://"))
                if key.endswith("index-url") and path.name == "simple":
                    path = path.parent  # a local index links to its files by ../../files/...
                if path.exists():
                    mounts.setdefault(str(path), str(path.resolve()))
    options = []
    for target, source in mounts.items():
        options += ["--volume", f"{source}:{target}:ro"]
    return options


def build_image(podman: Podman, base: str, tag: str, extra: Sequence[str] = ()) -> None:
    with tempfile.TemporaryDirectory(prefix="fetcher-build-") as scratch:
        podman.run(
            "build",
            "--layers=false",  # no intermediate images left behind; the tag itself is the cache
            "--network",
            "host",
            "--build-arg",
            f"PYTHON_IMAGE={base}",
            "--label",
            f"fetcher.test.context={tag.rsplit(':', 1)[1]}",
            *pip_mounts(pip_config(), Path(scratch)),
            *extra,
            "--tag",
            tag,
            str(ROOT),
            timeout=900,
        )


def ensure_image(podman: Podman) -> str:
    base = ensure_base_image(podman)
    tag = f"{IMAGE_REPO}:test-{context_digest()}"
    if not podman.image_exists(tag):
        build_image(podman, base, tag)
        # Earlier builds of other trees are not needed any more.
        listed = podman.run("images", "--format", "{{.Repository}}:{{.Tag}}", IMAGE_REPO).stdout.split()
        stale = [ref for ref in listed if ref.startswith(f"{IMAGE_REPO}:test-") and ref != tag]
        if stale:
            podman.run("rmi", *stale, check=False)
    return tag


_session: tuple[Podman, str] | None = None


def session() -> tuple[Podman, str]:
    """Podman and the fetcher image, found or built once per test session."""
    global _session
    if _session is None:
        podman = find_podman()
        _session = (podman, ensure_image(podman))
    return _session
