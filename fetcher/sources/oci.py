"""oci:// sources: a model artifact in an OCI registry, every blob verified by its digest.

A tag is resolved to a digest first (one manifest HEAD), and everything after
is read by digest, so a tag moved mid-pull cannot mix two artifacts. Every
manifest's bytes are checked against the digest that named them, and every
layer against its descriptor's digest and size, so nothing needs a
``--sha256`` from the user. Layers become files by what the artifact says
they are (``layer_file``): a ModelPack weight, an ORAS file, a Docker model
file, or a tar to unpack at the root. Blobs are read with ranges, like any large file, over the shared pool.

Credentials come from a docker ``config.json`` (``--registry-auth-file``, the
format of a ``kubernetes.io/dockerconfigjson`` Secret): its ``auths`` entries
only, as the kubelet reads them; a credential helper it names is never run.
Registries answer the first request with a challenge (``WWW-Authenticate``):
Basic, or Bearer with a token service to ask, anonymously, with the credentials
or with an identity token; ``RegistryAuth`` answers it as docker does, and again
when a token expires mid-pull. Neither the credentials nor the token reach
another host: blob downloads are often redirected to object storage (see
``HttpClient``). What a registry or its token service answers is read only up
to a cap (``read_capped``), so a hostile one cannot fill fetcher's memory.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import platform
import re
import threading
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import structlog

from fetcher.errors import ArchiveError, FetchError, IntegrityError, TransientFetchError, UsageError
from fetcher.manifest import SHA256, Digest, Entry, Manifest, check_layout, relative_path
from fetcher.redact import redact_url
from fetcher.schemes import OciReference, parse_oci
from fetcher.sources.base import Body, Connection, Selection
from fetcher.sources.fast_http import tls_context
from fetcher.sources.http import HttpClient, Pin, origin, read_capped

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEXES = (OCI_INDEX, DOCKER_LIST)
ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))
MAX_MANIFEST = 4 * 1024 * 1024  # the distribution registry's own limit on a manifest's size
MAX_ANSWER = 64 * 1024  # what fetcher reads of an error body or a token service's answer

MODELPACK_MANIFEST = "application/vnd.cncf.model.manifest.v1+json"
MODELPACK_CONFIG = "application/vnd.cncf.model.config.v1+json"
MODELPACK_LAYER = re.compile(
    r"application/vnd\.cncf\.model\.(?:weight|weight\.config|doc|code|dataset)\.v1\.(raw|tar|tar\+gzip|tar\+zstd)"
)
MODELPACK_PATH = "org.cncf.model.filepath"
TITLE = "org.opencontainers.image.title"
ORAS_UNPACK = "io.deis.oras.content.unpack"
DOCKER_MODEL_CONFIG = "application/vnd.docker.ai.model.config"
DOCKER_MODEL_LAYER = re.compile(r"application/vnd\.docker\.ai\.([a-z0-9]+)(?:\.[a-z0-9.+-]+)?")
IMAGE_CONFIGS = ("application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json")
IMAGE_LAYER = re.compile(
    r"application/vnd\.oci\.image\.layer\.v1\.tar(?:\+gzip|\+zstd)?|application/vnd\.docker\.image\.rootfs\.diff\.tar\.gzip"
)
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")

log = structlog.get_logger("fetcher")

# Docker Hub: the name people write, the host its API answers on, and the key docker writes its credentials under.
DOCKER_HUB = ("docker.io", "index.docker.io", "registry-1.docker.io")
DOCKER_HUB_API = "registry-1.docker.io"
DOCKER_HUB_KEY = "https://index.docker.io/v1/"

# The distribution spec's error codes that no retry changes.
REGISTRY_ERRORS: dict[str, str] = {
    "MANIFEST_UNKNOWN": "{ref} was not found in {registry} (MANIFEST_UNKNOWN): check the tag or digest",
    "NAME_UNKNOWN": "{repo} was not found in {registry} (NAME_UNKNOWN): check the repository's name",
    "BLOB_UNKNOWN": "a layer of {ref} is missing from {registry} (BLOB_UNKNOWN)",
    "UNAUTHORIZED": "{registry} refused access to {repo} (UNAUTHORIZED): check --registry-auth-file",
    "DENIED": "{registry} denied access to {repo} (DENIED): check --registry-auth-file",
}
# A 404 to a manifest HEAD, which has no body to say whether the repository or the tag is missing.
NOT_FOUND = "{ref} was not found in {registry} (HTTP 404): check the repository's name and the tag or digest"


class OciSource:
    """One artifact (or image) in a registry."""

    def __init__(self, source: str, connection: Connection, selection: Selection) -> None:
        self.ref: OciReference = parse_oci(source)
        self.display = redact_url(source)
        host = DOCKER_HUB_API if self.ref.registry in DOCKER_HUB else self.ref.registry
        self.endpoint = f"{'http' if connection.oci_plain_http else 'https'}://{host}"
        self.platform = connection.oci_platform or f"linux/{_node_arch()}"
        self._oci_path = connection.oci_path
        self._explicit_platform = connection.oci_platform
        self._filtered = bool(selection.include or selection.exclude)
        credentials = registry_credentials(connection.registry_auth_file, self.ref.registry)
        self._auth = RegistryAuth(
            self.endpoint, credentials, f"repository:{self.ref.repository}:pull", connection.timeout
        )
        self._client = HttpClient(self.endpoint, connection, explain=self._explain, auth=self._auth)
        self._digest: str | None = self.ref.digest
        self._pins: dict[str, Pin] = {}

    @property
    def _api(self) -> str:
        return f"{self.endpoint}/v2/{self.ref.repository}"

    def identity(self) -> str:
        """The digest the reference names now, and the platform asked for: no request when pinned by digest."""
        if self._digest is None:
            response = self._client.head(f"{self._api}/manifests/{self.ref.reference}", self.display, ACCEPT)
            digest = response.headers.get("Docker-Content-Digest", "")
            if not DIGEST.fullmatch(digest):  # the header is optional: the manifest's own bytes say it
                digest = "sha256:" + hashlib.sha256(self._manifest(self.ref.reference, None)[1]).hexdigest()
            self._digest = digest
        return f"oci:{self._digest} {self.platform}" + (f" {self._oci_path}" if self._oci_path else "")

    def resolve(self) -> Manifest:
        identity = self.identity()
        assert self._digest is not None
        media_type, data = self._manifest(self._digest, self._digest)
        document = _json(data, self.display)
        if media_type in INDEXES or document.get("manifests") is not None:
            chosen = self._choose(document)
            media_type, data = self._manifest(chosen, chosen)
            document = _json(data, self.display)
        note = None if self.ref.digest else f"{self.ref.repository}:{self.ref.reference} is {self._digest}"
        if self._is_image(document):
            if self._filtered:  # they would pick layers, not files: the image's filesystem would be wrong
                raise UsageError("--include/--exclude select files of a model artifact, not of an image (--oci-path)")
            entries = tuple(self._image_layers(document))
            return Manifest(entries, directory=True, identity=identity, note=note, image_subtree=self._oci_path)
        entries = tuple(self._entries(document))
        check_layout(entries, "layer")
        return Manifest(entries, directory=True, identity=identity, note=note)

    def _manifest(self, reference: str, digest: str | None) -> tuple[str, bytes]:
        """A manifest's media type and bytes, checked against ``digest`` when one names it (exit 4 if not).

        Read as a stream and never past ``MAX_MANIFEST``: a hostile registry's endless answer is cut there.
        """
        url = f"{self._api}/manifests/{reference}"
        with self._client.stream(url, self.display, Pin(), accept=ACCEPT) as (body, response):
            data, whole = read_capped(body.chunks, MAX_MANIFEST)
            media_type = response.headers.get("Content-Type", "").split(";", 1)[0].strip()
        if not whole:
            raise FetchError(f"{self.display}: the registry sent a manifest larger than {MAX_MANIFEST} bytes")
        if digest is not None and (got := "sha256:" + hashlib.sha256(data).hexdigest()) != digest:
            raise IntegrityError(f"{self.display}: manifest digest mismatch: asked for {digest}, got {got}")
        return media_type, data

    def _choose(self, index: dict[str, Any]) -> str:
        """The one manifest of an index, or the one for ``platform`` among several."""
        manifests = [m for m in index.get("manifests") or [] if isinstance(m, dict)]
        wanted = self.platform.split("/")
        found = [m for m in manifests if _platform_of(m)[: len(wanted)] == wanted]
        if len(manifests) == 1 and (self._explicit_platform is None or not _platform_of(manifests[0])):
            found = manifests  # the only one, whatever it says, unless --oci-platform asked for another
        if not found:
            offered = sorted({"/".join(p) for m in manifests if (p := _platform_of(m))}) or ["none"]
            raise FetchError(
                f"{self.display} has no manifest for {self.platform} (it offers {', '.join(offered)}): "
                "choose one with --oci-platform"
            )
        digest = found[0].get("digest")
        if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
            raise FetchError(f"{self.display}: its index names a manifest without a sha256 digest")
        return digest

    def _is_image(self, manifest: dict[str, Any]) -> bool:
        """An ordinary container image (its config an image's, its layers untitled): a model inside one needs
        --oci-path (exit 5 without it); a model artifact given --oci-path is a usage error."""
        config = manifest.get("config")
        config_type = str(config.get("mediaType", "")) if isinstance(config, dict) else ""
        titled = any(isinstance(x, dict) and TITLE in (x.get("annotations") or {}) for x in self._layers(manifest))
        image = config_type in IMAGE_CONFIGS and str(manifest.get("artifactType") or config_type) in IMAGE_CONFIGS
        if image and not titled and self._oci_path is None:
            raise ArchiveError(
                f"{self.display} is an ordinary container image, not a model artifact: name the model's "
                "directory inside it with --oci-path (a modelcar's is /models)"
            )
        if self._oci_path is not None and not (image and not titled):
            raise UsageError(f"--oci-path applies to an ordinary image; {self.display} is a model artifact")
        return image and not titled

    def _layers(self, manifest: dict[str, Any]) -> Iterator[tuple[dict[str, Any], str, int]]:
        layers = manifest.get("layers")
        if not isinstance(layers, list):
            raise FetchError(f"{self.display}: its manifest lists no layers")
        for layer in layers:
            if not isinstance(layer, dict):
                raise FetchError(f"{self.display}: its manifest lists a layer that is not an object")
            digest, size = layer.get("digest"), layer.get("size")
            if not isinstance(digest, str) or not DIGEST.fullmatch(digest) or not isinstance(size, int) or size < 0:
                raise FetchError(f"{self.display}: a layer without a sha256 digest or a size")
            yield layer, digest, size

    def _image_layers(self, manifest: dict[str, Any]) -> Iterator[Entry]:
        """Every layer, in order, to be applied as one filesystem (``pipeline.unpack_image``)."""
        for index, (layer, digest, size) in enumerate(self._layers(manifest)):
            media_type = str(layer.get("mediaType", ""))
            if not IMAGE_LAYER.fullmatch(media_type):
                raise ArchiveError(f"refused layer {digest}: media type {media_type!r} is no image layer fetcher reads")
            expected = Digest(SHA256, digest.removeprefix("sha256:"), "the registry (layer digest)")
            yield Entry(f"layer-{index:03d}", size, expected, locator=digest, pin=digest, unpack=True)

    def _entries(self, manifest: dict[str, Any]) -> Iterator[Entry]:
        config = manifest.get("config")
        config_type = str(config.get("mediaType", "")) if isinstance(config, dict) else ""
        artifact_type = str(manifest.get("artifactType") or config_type)
        for layer, digest, size in self._layers(manifest):
            annotations = layer.get("annotations") if isinstance(layer.get("annotations"), dict) else {}
            name, unpack = layer_file(str(layer.get("mediaType", "")), digest, annotations or {}, artifact_type)
            expected = Digest(SHA256, digest.removeprefix("sha256:"), "the registry (layer digest)")
            path = relative_path(name, "layer file")
            yield Entry(path, size, expected, locator=digest, pin=digest, unpack=unpack)

    @contextmanager
    def open(self, entry: Entry, start: int = 0, end: int | None = None) -> Iterator[Body]:
        display = f"{self.display.rstrip('/')}/{entry.path}"
        pin = self._pins.setdefault(entry.locator, Pin())
        with self._client.stream(f"{self._api}/blobs/{entry.locator}", display, pin, start, end) as (body, _):
            yield body

    def _explain(self, response: httpx.Response, display: str) -> FetchError | None:
        """The registry's own error code (the spec's JSON errors) where it names a final failure."""
        if response.status_code not in (401, 403, 404):
            return None
        try:  # its first MAX_ANSWER bytes: an error body that never ends is explained by its status
            data = response.content if response.is_stream_consumed else read_capped(response.iter_raw(), MAX_ANSWER)[0]
            errors = json.loads(data).get("errors") or []
            code = next((e.get("code") for e in errors if e.get("code") in REGISTRY_ERRORS), None)
        except (ValueError, AttributeError, TypeError, httpx.HTTPError):
            code = None
        if code is None and response.status_code == 401:
            code = "UNAUTHORIZED"
        elif code is None and response.status_code == 404:  # a HEAD has no body to say which
            code = "NOT_FOUND" if "/manifests/" in str(response.request.url) else "BLOB_UNKNOWN"
        if code is None:
            return None
        ref = self.ref.repository + ("@" if self.ref.digest else ":") + self.ref.reference
        text = NOT_FOUND if code == "NOT_FOUND" else REGISTRY_ERRORS[code]
        return FetchError(text.format(ref=ref, repo=self.ref.repository, registry=self.ref.registry))

    def close(self) -> None:
        self._client.close()
        self._auth.close()


def layer_file(media_type: str, digest: str, annotations: dict[str, Any], artifact_type: str) -> tuple[str, bool]:
    """What a layer becomes in dest, by what the artifact says it is: a file's path, and whether
    it is a tar to unpack at the model's root instead (its members carry their own paths).

    Raises:
        ArchiveError: a layer that is no file of a model (exit 5, naming its media type).
    """
    title = annotations.get(TITLE)
    if artifact_type in (MODELPACK_MANIFEST, MODELPACK_CONFIG) or media_type.startswith("application/vnd.cncf.model."):
        match = MODELPACK_LAYER.fullmatch(media_type)
        if match is None:
            raise ArchiveError(f"refused layer {digest}: media type {media_type!r} is no ModelPack layer")
        name = annotations.get(MODELPACK_PATH) or title
        if match[1] != "raw":  # as modctl packs it: the tar's members are the paths, filepath names what it holds
            return (name if isinstance(name, str) and name else f"layer-{digest[7:19]}"), True
        if not isinstance(name, str) or not name:
            raise ArchiveError(f"refused layer {digest}: a raw ModelPack layer without its {MODELPACK_PATH} annotation")
        return name, False
    if artifact_type.startswith(DOCKER_MODEL_CONFIG):
        if isinstance(title, str) and title:
            return title, False
        match = DOCKER_MODEL_LAYER.fullmatch(media_type)
        if match is None:
            raise ArchiveError(f"refused layer {digest}: media type {media_type!r} is no Docker model layer")
        return f"sha256-{digest[7:]}.{match[1]}", False
    if isinstance(title, str) and title:
        # oras packs a directory as a tar+gzip whose members already begin with its name: unpacked at the root
        return title, str(annotations.get(ORAS_UNPACK, "")).lower() == "true"
    raise ArchiveError(f"refused layer {digest}: media type {media_type or '(none)'!r} names no file of a model")


class RegistryAuth(httpx.Auth):
    """A registry's challenge, answered as docker answers it.

    Each request goes with the current token (or Basic credentials, once a registry
    asked for them). A 401 from the registry itself is answered once: a Bearer
    challenge by asking its token service (anonymously, with the credentials, or with
    the identity token) for a token of this repository's scope, which also renews one
    that expired mid-pull; a Basic one with the credentials. A 401 from any other host
    (a redirect's target) is never answered: the credentials are for the registry only.
    """

    def __init__(self, registry_url: str, credentials: Credentials | None, scope: str, timeout: float) -> None:
        self._origin = origin(registry_url)
        self._basic = credentials.basic if credentials is not None else None
        self._refresh = credentials.identity_token if credentials is not None else None
        self._scope = scope
        self._timeout = timeout
        self._header: str | None = None
        self._lock = threading.Lock()
        self._tokens: httpx.Client | None = None

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        sent = self._header
        if sent is not None:
            request.headers["Authorization"] = sent
        response = yield request
        if response.status_code != 401 or origin(str(response.request.url)) != self._origin:
            return
        header = self._answer(response.headers.get("WWW-Authenticate", ""), sent)
        if header is None:
            return
        request.headers["Authorization"] = header
        yield request

    def _answer(self, challenge: str, sent: str | None) -> str | None:
        scheme, params = parse_challenge(challenge)
        with self._lock:
            if self._header is not None and self._header != sent:  # another request renewed it meanwhile
                return self._header
            if scheme == "bearer" and params.get("realm"):
                self._header = f"Bearer {self._token(params)}"
            elif scheme == "basic" and self._basic is not None:
                user, password = self._basic
                self._header = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
            else:
                return None
            return self._header

    def _token(self, challenge: dict[str, str]) -> str:
        """A token from the challenge's realm: a GET, with Basic credentials if any, or with an identity
        token the OAuth2 POST docker sends (grant_type=refresh_token, the token in the form, never the URL)."""
        realm = challenge["realm"]
        if urlsplit(realm).scheme not in ("https", self._origin[0]):  # plain HTTP only for a plain-HTTP registry
            raise FetchError(f"the registry's token service is not HTTPS ({redact_url(realm)}): refused")
        params = {"scope": challenge.get("scope") or self._scope}
        if challenge.get("service"):
            params["service"] = challenge["service"]
        if self._tokens is None:
            self._tokens = httpx.Client(
                verify=tls_context(),
                timeout=self._timeout,
                follow_redirects=False,
                headers={"Accept-Encoding": "identity"},  # its answer is read raw, and capped
            )
        if self._refresh is not None:
            form = params | {"grant_type": "refresh_token", "refresh_token": self._refresh, "client_id": "fetcher"}
            method, url, auth = "POST", httpx.URL(realm), None
        else:  # the realm's own query is kept, as docker keeps it
            form, method, url, auth = None, "GET", httpx.URL(realm).copy_merge_params(params), self._basic
        try:
            with self._tokens.stream(method, url, data=form, auth=auth) as response:
                status = response.status_code
                data, whole = read_capped(response.iter_raw(), MAX_ANSWER) if status < 300 else (b"", True)
        except httpx.HTTPError as exc:
            raise TransientFetchError(
                f"the registry's token service {redact_url(realm)} failed: {type(exc).__name__}"
            ) from exc
        if status in (400, 401, 403):  # 400: OAuth2's answer to a refresh token it does not take
            what = "the identity token" if self._refresh else "the credentials" if self._basic else "an anonymous pull"
            raise FetchError(f"the registry's token service refused {what} (HTTP {status}): check --registry-auth-file")
        if status >= 500 or status == 429:
            raise TransientFetchError(f"the registry's token service answered HTTP {status}")
        if not whole:
            raise FetchError(f"the registry's token service ({redact_url(realm)}) sent more than {MAX_ANSWER} bytes")
        try:
            answer = json.loads(data)
            token = answer.get("token") or answer.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not re.fullmatch(r"[\x21-\x7e]+", token):
            answered = f" (HTTP {status})" if status != 200 else ""
            raise FetchError(f"the registry's token service ({redact_url(realm)}) gave no usable token{answered}")
        return token

    def close(self) -> None:
        if self._tokens is not None:
            self._tokens.close()


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="...",service="...",scope="..."``: its scheme (lower case) and parameters."""
    scheme, _, rest = header.strip().partition(" ")
    rest = re.split(r",\s*(?=[A-Za-z][\w.-]*\s+[A-Za-z]+=)", rest, maxsplit=1)[0]  # the first challenge's only
    params = {k.lower(): v for k, v in re.findall(r'([A-Za-z]+)="([^"]*)"', rest)}
    return scheme.lower(), params


@dataclass(frozen=True)
class Credentials:
    """A registry's entry in a docker ``config.json``: a user and password, and an identity token (the OAuth2
    refresh token ``docker login`` keeps for Azure's registry and others), which takes their place at a token
    service."""

    user: str = ""
    password: str = field(default="", repr=False)
    identity_token: str | None = field(default=None, repr=False)

    @property
    def basic(self) -> tuple[str, str] | None:
        """For Basic auth: none in an entry that holds only an identity token."""
        return (self.user, self.password) if self.user or self.password else None


def registry_credentials(path: Path | None, registry: str) -> Credentials | None:
    """What a docker ``config.json`` holds for ``registry`` in its ``auths``, under any key docker writes.

    A credential helper (``credHelpers``, ``credsStore``) is a program, which fetcher never runs: when one
    keeps this registry's credentials, a warning names it and the pull goes on anonymously.

    Raises:
        UsageError: the file cannot be read, or its entry for the registry is malformed.
    """
    if path is None:
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"--registry-auth-file {path}: cannot read it: {exc.strerror}") from None
    except ValueError:
        raise UsageError(f"--registry-auth-file {path}: not JSON (a docker config.json)") from None
    if not isinstance(document, dict):
        return None
    keys = {registry, f"https://{registry}", f"http://{registry}", f"https://{registry}/v1/", f"https://{registry}/v2/"}
    if registry in DOCKER_HUB:
        keys |= {DOCKER_HUB_KEY, *DOCKER_HUB}
    keys = {key.rstrip("/") for key in keys}
    entry = _config_entry(document.get("auths"), keys)
    found = _credentials(entry, path, registry) if isinstance(entry, dict) else None
    helper = _config_entry(document.get("credHelpers"), keys) or document.get("credsStore")
    if found is None and isinstance(helper, str) and helper:
        log.warning(
            "credential helper not run",
            registry=registry,
            helper=f"docker-credential-{helper}",
            reason="fetcher reads only the auths entries of --registry-auth-file "
            "(mount a kubernetes.io/dockerconfigjson Secret); pulling anonymously",
        )
    return found


def _config_entry(section: object, keys: set[str]) -> object:
    """What a config.json section (``auths``, ``credHelpers``) holds under any of ``keys``, a trailing slash aside."""
    if not isinstance(section, dict):
        return None
    return next((value for key, value in section.items() if str(key).rstrip("/") in keys), None)


def _credentials(entry: dict[str, Any], path: Path, registry: str) -> Credentials | None:
    """An ``auths`` entry's ``auth`` (base64 of user:password) or username and password, and identitytoken."""
    user, password = "", ""
    if isinstance(entry.get("auth"), str) and entry["auth"]:
        try:
            user, colon, password = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            user, colon, password = "", "", ""
        if not colon:
            raise UsageError(f"--registry-auth-file {path}: the 'auth' of {registry} is not base64 of user:password")
    elif isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
        user, password = entry["username"], entry["password"]
    token = entry.get("identitytoken")
    token = token if isinstance(token, str) and token else None
    return Credentials(user, password, token) if user or password or token else None


def _platform_of(descriptor: dict[str, Any]) -> list[str]:
    found = descriptor.get("platform")
    if not isinstance(found, dict):
        return []
    parts = [str(found.get("os", "")), str(found.get("architecture", ""))]
    if found.get("variant"):
        parts.append(str(found["variant"]))
    return [p.lower() for p in parts]


def _node_arch() -> str:
    """This node's architecture as OCI names it (GOARCH)."""
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)


def _json(data: bytes, display: str) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except ValueError:
        raise FetchError(f"{display}: the registry sent a manifest that is not JSON") from None
    if not isinstance(document, dict):
        raise FetchError(f"{display}: the registry sent a manifest that is not a JSON object")
    return document
