"""A real OCI registry on loopback, and real clients that push to it, for the oci:// tests.

``Registry`` runs Debian's ``docker-registry`` (the CNCF distribution registry, 2.8) with a config of
its own: filesystem storage in a temp dir, 127.0.0.1 on a free port, HTTPS with a private CA (or
plain HTTP), and one of three auth modes, as the registries fetcher meets do it:

- ``none``: anonymous pulls and pushes;
- ``htpasswd``: Basic credentials on every request;
- ``token``: the docker token protocol. The registry trusts ``TokenService``, a small server here
  that signs ES256 JWTs with a certificate (sent in the JWT's ``x5c`` header) chained to the CA the
  registry's ``rootcertbundle`` holds. It records every token request, so a test can see which
  credentials a client sent, and its token lifetime is short on demand, so renewal can be tested.

``redirect=True`` turns on the registry's own ``redirect`` storage middleware: a blob GET or HEAD is
answered with a 307 to ``BlobStore``, a second origin on 127.0.0.2 that serves the registry's storage
directory as object storage would, and records what each request carried (credentials must never
arrive there).

Artifacts are pushed with PyPI's ``oras`` client: ``push_oras`` with its own ``push`` (files and a
directory as tar+gzip); ``push_modelpack``, ``push_index`` and ``put_manifest`` upload blobs with it
and PUT manifests built here through it, because ``push`` cannot set an artifactType, per-layer media
types with annotations of our choosing, or push an index.

The fixtures (``registry``, ``registry_basic``, ``registry_token``, ``registry_http``,
``registry_redirect``, ``make_registry``) skip without ``docker-registry`` locally and fail under
CI=true (scripts/container-tools installs it).
"""

from __future__ import annotations

import base64
import datetime
import gzip
import hashlib
import http.client
import ipaddress
import json
import math
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import bcrypt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.conftest import unavailable

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MODEL_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MODEL_CONFIG = "application/vnd.cncf.model.config.v1+json"
MODEL_WEIGHT_RAW = "application/vnd.cncf.model.weight.v1.raw"
MODEL_FILEPATH = "org.cncf.model.filepath"
TITLE = "org.opencontainers.image.title"
UNPACK = "io.deis.oras.content.unpack"
ORAS_DIGEST = "io.deis.oras.content.digest"
TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"

Auth = Literal["none", "htpasswd", "token"]
Endless = Literal["manifest", "error", "token"]  # what EndlessRegistry never stops sending
SERVICE = "fetcher-test-registry"
ISSUER = "fetcher-test-token-service"
LEEWAY = 60  # seconds the registry (distribution 2.8, token.Leeway) accepts a token past its exp


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


# --- certificates ----------------------------------------------------------------


@dataclass
class Pki:
    """A private CA, one server certificate for 127.0.0.1 and 127.0.0.2, and the token signer's certificate."""

    ca_file: Path  # what clients trust, and the registry's rootcertbundle for tokens
    server_file: Path  # certificate then key (PEM): the registry, the token service and the blob store
    signer_key: ec.EllipticCurvePrivateKey
    signer_der: bytes  # the token signer's certificate, for the JWT's x5c

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.server_file)
        return context


def make_pki(where: Path) -> Pki:
    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)

    def builder(subject: str, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fetcher registry test CA")]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - day)
            .not_valid_after(now + day)
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        builder("fetcher registry test CA", ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(  # strict verifiers (Python 3.13's default context) want a CA to say it signs certificates
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    authority = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    server_key = ec.generate_private_key(ec.SECP256R1())
    addresses = [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "127.0.0.2")]
    server = (
        builder("127.0.0.1", server_key)
        .add_extension(x509.SubjectAlternativeName(addresses), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(authority, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    signer_key = ec.generate_private_key(ec.SECP256R1())
    signer = (
        builder("fetcher test token signer", signer_key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(authority, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    where.mkdir(parents=True, exist_ok=True)
    ca_file, server_file = where / "ca.pem", where / "server.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server_file.write_bytes(
        server.public_bytes(serialization.Encoding.PEM)
        + server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return Pki(ca_file, server_file, signer_key, signer.public_bytes(serialization.Encoding.DER))


# --- small servers ------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str  # with the query
    headers: dict[str, str]
    status: int = 0
    form: dict[str, list[str]] = field(default_factory=dict)  # a POST's urlencoded body


class _Server:
    """A ThreadingHTTPServer on its own thread, over TLS when given a context."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], host: str, tls: ssl.SSLContext | None) -> None:
        self.httpd = ThreadingHTTPServer((host, 0), handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.host = f"{host}:{self.httpd.server_address[1]}"
        self.url = f"{'https' if tls else 'http'}://{self.host}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenService:
    """The docker token protocol's token server (distribution's docs: "Token Authentication Specification").

    GET /token?service=...&scope=repository:NAME:pull,push with Basic credentials of a known user
    grants what was asked; without credentials only ``pull`` on a repository in ``public`` is granted
    (an anonymous token with empty access otherwise, as Docker Hub answers); wrong credentials are a 401.
    POST /token is the OAuth2 form ("Token Authentication Specification: OAuth2"): grant_type=refresh_token
    with one of ``refresh_tokens`` (what a docker config.json keeps as an ``identitytoken``) grants as its
    user's credentials would; an unknown one is a 400 ``invalid_grant``, as OAuth2 answers.
    Tokens are ES256 JWTs carrying the signer's certificate in ``x5c``; ``lifetime`` is both
    ``expires_in`` and, net of the registry's leeway, what the registry enforces.
    """

    def __init__(
        self,
        pki: Pki,
        users: Mapping[str, str],
        *,
        public: set[str],
        lifetime: int,
        tls: bool,
        refresh_tokens: Mapping[str, str] | None = None,
    ) -> None:
        self.pki = pki
        self.users = dict(users)
        self.refresh_tokens = dict(refresh_tokens or {})  # token -> user
        self.public = public
        self.lifetime = lifetime
        self.requests: list[Seen] = []
        self.issued = 0
        service = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                seen = Seen("GET", self.path, dict(self.headers.items()))
                self._reply(seen, *service.answer(self.path, self.headers.get("Authorization")))

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                seen = Seen("POST", self.path, dict(self.headers.items()), form=urllib.parse.parse_qs(body))
                self._reply(seen, *service.refresh(self.path, seen.form))

            def _reply(self, seen: Seen, status: int, body: dict[str, Any]) -> None:
                service.requests.append(seen)
                seen.status = status
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                if status == 401:
                    self.send_header("WWW-Authenticate", 'Basic realm="fetcher-test-token-service"')
                self.end_headers()
                self.wfile.write(payload)

        self.server = _Server(Handler, "127.0.0.1", pki.server_context() if tls else None)
        self.realm = f"{self.server.url}/token"

    def answer(self, path: str, authorization: str | None) -> tuple[int, dict[str, Any]]:
        url = urllib.parse.urlsplit(path)
        if url.path != "/token":
            return 404, {"errors": [{"code": "NOT_FOUND"}]}
        query = urllib.parse.parse_qs(url.query)
        user = ""
        if authorization:
            scheme, _, credentials = authorization.partition(" ")
            try:
                user, _, password = base64.b64decode(credentials).decode().partition(":")
            except ValueError:
                user, password = "", ""
            if scheme.lower() != "basic" or not user or self.users.get(user) != password:
                return 401, {"errors": [{"code": "UNAUTHORIZED", "message": "wrong credentials"}]}
        return 200, self.grant(user, query.get("scope", []), query.get("service", [SERVICE])[0])

    def refresh(self, path: str, form: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        """The OAuth2 POST: a refresh token (docker's identity token) exchanged for an access token."""
        if urllib.parse.urlsplit(path).path != "/token":
            return 404, {"errors": [{"code": "NOT_FOUND"}]}
        user = self.refresh_tokens.get(form.get("refresh_token", [""])[0])
        if form.get("grant_type") != ["refresh_token"] or user is None:
            return 400, {"error": "invalid_grant"}
        answer = self.grant(user, form.get("scope", []), form.get("service", [SERVICE])[0])
        return 200, {"access_token": answer["access_token"], "expires_in": self.lifetime}

    def grant(self, user: str, scopes: list[str], audience: str) -> dict[str, Any]:
        """A token for what ``user`` (anonymous: "") may do of ``scopes``."""
        access = []
        for scope in scopes:
            for one in scope.split(" "):
                kind, _, rest = one.partition(":")
                name, _, actions = rest.rpartition(":")
                if kind != "repository" or not name:
                    continue
                wanted = [a for a in actions.split(",") if a]
                granted = wanted if user else [a for a in wanted if a == "pull" and name in self.public]
                if granted:
                    access.append({"type": "repository", "name": name, "actions": granted})
        token = self.sign(user, audience, access)
        self.issued += 1
        now = datetime.datetime.now(datetime.UTC).isoformat()
        return {"token": token, "access_token": token, "expires_in": self.lifetime, "issued_at": now}

    def sign(self, subject: str, audience: str, access: list[dict[str, Any]], *, expires: int | None = None) -> str:
        """A JWT the registry accepts for ``access`` until ``expires`` (epoch seconds, default now + lifetime)."""
        clock = time.time()
        now = int(clock)
        # exp is whole seconds: rounded up, a token lives at least its lifetime (truncated, a 1 s token
        # issued at x.99 s lived 10 ms, and was refused on its first use)
        until = math.ceil(clock) + self.lifetime
        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(self.pki.signer_der).decode()]}
        claims = {
            "iss": ISSUER,
            "sub": subject,
            "aud": audience,
            "exp": (until if expires is None else expires) - LEEWAY,
            "nbf": now - 1,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self.pki.signer_key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def close(self) -> None:
        self.server.close()


class BlobStore:
    """Object storage on another host (127.0.0.2) that the registry redirects blob reads to.

    Serves the registry's storage directory by path (what its ``redirect`` middleware appends to the
    base URL), with ranges and a strong ETag as S3 would; records every request with its headers.
    """

    def __init__(self, root: Path, tls: ssl.SSLContext | None) -> None:
        self.root = root
        self.requests: list[Seen] = []
        self.rate: int | None = None  # bytes/s to send bodies at (a slow bucket), None: at once
        store = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                seen = Seen(self.command, self.path, dict(self.headers.items()))
                store.requests.append(seen)
                relative = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
                path = (store.root / relative).resolve()
                if not path.is_relative_to(store.root.resolve()) or not path.is_file():
                    seen.status = 404
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = path.read_bytes()
                start, end, status = 0, len(data), 200
                ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if ranged and int(ranged[1]) < len(data):
                    start = int(ranged[1])
                    end = min(len(data), int(ranged[2]) + 1) if ranged[2] else len(data)
                    status = 206
                seen.status = status
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(end - start))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", f'"{hashlib.md5(data).hexdigest()}"')  # S3's ETag is not the sha256
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
                self.end_headers()
                rate = store.rate
                if body and rate is None:
                    self.wfile.write(data[start:end])
                elif body and rate is not None:
                    step = max(1, rate // 20)
                    try:
                        for offset in range(start, end, step):
                            self.wfile.write(data[offset : min(end, offset + step)])
                            time.sleep(step / rate)
                    except OSError:  # the client went away (killed)
                        self.close_connection = True

        self.server = _Server(Handler, "127.0.0.2", tls)
        self.url = self.server.url

    def close(self) -> None:
        self.server.close()


class EndlessRegistry:
    """A hostile registry, over plain HTTP, whose answer never ends: a manifest (``"manifest"``), a 404's error
    body (``"error"``), or its token service's token (``"token"``: every manifest GET without a token is first
    answered with a Bearer challenge naming ``/token`` here). Each goes on until the client hangs up, or
    ``limit`` bytes in all; ``sent`` counts what was written, so a test sees how much a client took in.
    """

    def __init__(self, endless: Endless, limit: int = 256 * 2**20) -> None:
        self.sent = 0
        hostile = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # a body that lasts until the connection closes

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if urllib.parse.urlsplit(self.path).path == "/token":
                    self._endless(200, "application/json", b'{"token": "', b"a")
                elif endless == "token" and "Authorization" not in self.headers:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", f'Bearer realm="{hostile.url}/token",service="endless"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif endless == "error":
                    self._endless(404, "application/json", b'{"errors": [{"code": "MANIFEST_UNKNOWN", "x": "', b"x")
                else:
                    self._endless(200, OCI_MANIFEST, b'{"schemaVersion": 2, "layers": [', b" ")

            def _endless(self, status: int, content_type: str, head: bytes, filler: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.end_headers()
                chunk = filler * 65536
                try:
                    self.wfile.write(head)
                    while hostile.sent < limit:
                        self.wfile.write(chunk)
                        hostile.sent += len(chunk)
                except OSError:  # the client hung up, as one that caps what it reads does
                    pass

        self.server = _Server(Handler, "127.0.0.1", None)
        self.host = self.server.host
        self.url = self.server.url

    def __enter__(self) -> EndlessRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.close()


# --- what is pushed -------------------------------------------------------------------


@dataclass
class Blob:
    """A layer to push: its bytes, media type and annotations."""

    data: bytes
    media_type: str = MODEL_WEIGHT_RAW
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return _sha256(self.data)

    def descriptor(self) -> dict[str, Any]:
        found: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data)}
        if self.annotations:
            found["annotations"] = dict(self.annotations)
        return found


def _canonical(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


@dataclass
class AccessLine:
    method: str
    path: str
    status: int
    user_agent: str


# --- the registry -----------------------------------------------------------------------


class Registry:
    """Debian's docker-registry on 127.0.0.1 with a config, storage and credentials of its own.

    ``auth``: "none", "htpasswd" (Basic) or "token" (``self.token`` is the TokenService); ``tls``:
    HTTPS with ``ca_file`` to trust, or plain HTTP; ``public``: repositories anonymous clients may
    pull in token mode; ``token_lifetime``: seconds a token lives; ``redirect``: blob reads answer
    307 to ``self.blobs`` on 127.0.0.2.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        auth: Auth = "none",
        tls: bool = True,
        username: str = "fetcher",
        password: str = "registry-secret-pw",  # a test credential: grep the logs for it to find a leak
        public: set[str] | None = None,
        token_lifetime: int = 300,
        redirect: bool = False,
    ) -> None:
        self.workdir = workdir
        self.auth: Auth = auth
        self.tls = tls
        self.username = username
        self.password = password
        self.storage_dir = workdir / "storage"
        self.pki = make_pki(workdir / "pki")
        self.ca_file: Path | None = self.pki.ca_file if tls else None
        # podman's and skopeo's --cert-dir (--src-cert-dir): a directory holding the CA as ca.crt
        self.cert_dir: Path | None = None
        if tls:
            self.cert_dir = workdir / "certs.d"
            self.cert_dir.mkdir()
            shutil.copyfile(self.pki.ca_file, self.cert_dir / "ca.crt")
        self.token: TokenService | None = None
        self.blobs: BlobStore | None = None
        self.port = _free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.scheme = "https" if tls else "http"
        self.url = f"{self.scheme}://{self.host}"
        self.log_file = workdir / "registry.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._public = set(public or ())
        self._token_lifetime = token_lifetime
        self.identity_token = secrets.token_urlsafe(24)  # token mode: an OAuth2 refresh token for ``username``
        self._redirect = redirect

    # -- lifecycle

    def start(self) -> Registry:
        binary = shutil.which("docker-registry")
        if binary is None:
            unavailable("needs docker-registry (Debian's package): scripts/container-tools")
            raise AssertionError("unreachable")
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
                "redirect": {"disable": not self._redirect},
            },
            "http": {
                "addr": self.host,
                "secret": secrets.token_hex(16),
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
        }
        if self.tls:
            config["http"]["tls"] = {"certificate": str(self.pki.server_file), "key": str(self.pki.server_file)}
        if self.auth == "htpasswd":
            htpasswd = self.workdir / "htpasswd"
            hashed = bcrypt.hashpw(self.password.encode(), bcrypt.gensalt(rounds=4)).decode()
            htpasswd.write_text(f"{self.username}:{hashed}\n")
            config["auth"] = {"htpasswd": {"realm": "fetcher-test-registry", "path": str(htpasswd)}}
        elif self.auth == "token":
            self.token = TokenService(
                self.pki,
                {self.username: self.password},
                public=self._public,
                lifetime=self._token_lifetime,
                tls=self.tls,
                refresh_tokens={self.identity_token: self.username},
            )
            config["auth"] = {
                "token": {
                    "realm": self.token.realm,
                    "service": SERVICE,
                    "issuer": ISSUER,
                    "rootcertbundle": str(self.pki.ca_file),
                }
            }
        if self._redirect:
            self.blobs = BlobStore(self.storage_dir, self.pki.server_context() if self.tls else None)
            config["middleware"] = {"storage": [{"name": "redirect", "options": {"baseurl": self.blobs.url + "/"}}]}
        config_file = self.workdir / "config.yml"
        for _attempt in range(5):  # the free port may be taken by another test before the registry binds it
            config["http"]["addr"] = self.host
            config_file.write_text(json.dumps(config, indent=2))  # JSON is YAML
            with self.log_file.open("ab") as log:
                self._process = subprocess.Popen(
                    [binary, "serve", str(config_file)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            if self._wait_listening():
                return self
            self.port = _free_port()
            self.host = f"127.0.0.1:{self.port}"
            self.url = f"{self.scheme}://{self.host}"
        raise RuntimeError(f"docker-registry found no free port:\n{self.log_file.read_text()}")

    def _wait_listening(self) -> bool:
        """True once it listens; False if it lost its port to someone else."""
        deadline = time.monotonic() + 15
        assert self._process is not None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                log = self.log_file.read_text()
                if "address already in use" in log[-500:]:
                    return False
                raise RuntimeError(f"docker-registry exited {self._process.returncode}:\n{log}")
            if self._answers():
                return True
            time.sleep(0.02)  # polling its start-up: there is no readiness signal to wait on
        raise RuntimeError(f"docker-registry did not listen on {self.host}:\n{self.log_file.read_text()}")

    def _answers(self) -> bool:
        """Whether the registry (not whoever else holds the port) answers GET /v2/."""
        connection: http.client.HTTPConnection
        if self.ca_file:
            context = ssl.create_default_context(cafile=self.ca_file)
            connection = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=1, context=context)
        else:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
        try:
            connection.request("GET", "/v2/")
            response = connection.getresponse()
            return response.getheader("Docker-Distribution-Api-Version") == "registry/2.0"
        except (OSError, http.client.HTTPException):
            return False
        finally:
            connection.close()

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        for server in (self.token, self.blobs):
            if server is not None:
                server.close()

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what tests read

    def verify(self) -> ssl.SSLContext | bool:
        """What an httpx client needs to trust this registry (False over plain HTTP)."""
        return ssl.create_default_context(cafile=self.ca_file) if self.ca_file else False

    def ref(self, repo: str, reference: str = "latest") -> str:
        """``host/repo:tag`` or ``host/repo@sha256:...``: the oci:// source without its scheme."""
        return f"{self.host}/{repo}{'@' if reference.startswith('sha256:') else ':'}{reference}"

    def blob_path(self, digest: str) -> Path:
        """Where the registry stores a blob (or a manifest): overwrite it to corrupt what it serves."""
        algorithm, _, hexdigest = digest.partition(":")
        return self.storage_dir / "docker/registry/v2/blobs" / algorithm / hexdigest[:2] / hexdigest / "data"

    def basic_auth(self, username: str | None = None, password: str | None = None) -> str:
        """The base64 ``user:password`` of a docker config's ``auth`` (and of a Basic header)."""
        pair = f"{username or self.username}:{self.password if password is None else password}"
        return base64.b64encode(pair.encode()).decode()

    def docker_config(
        self,
        path: Path,
        *,
        username: str | None = None,
        password: str | None = None,
        key: str | None = None,
        identity_token: str | None = None,
    ) -> Path:
        """Write a docker ``config.json`` (a kubernetes.io/dockerconfigjson Secret's content) for this registry.

        ``key`` is the auths key, ``host:port`` by default (docker also writes ``https://host:port``).
        With ``identity_token`` the entry is what ``docker login`` writes when the registry hands out one
        (Azure's does): the user with an empty password, and the token as ``identitytoken``.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"auth": self.basic_auth(username, password)}
        if identity_token is not None:
            entry = {"auth": self.basic_auth(username, ""), "identitytoken": identity_token}
        auths = {key or self.host: entry}
        path.write_text(json.dumps({"auths": auths}, indent=2))
        return path

    def access_log(self) -> list[AccessLine]:
        """Every request the registry answered, from its access log, oldest first."""
        found = []
        pattern = re.compile(r'"(\w+) (\S+) HTTP/[\d.]+" (\d{3}) \S+ "[^"]*" "([^"]*)"')
        for line in self.log_file.read_text(errors="replace").splitlines():
            if match := pattern.search(line):
                found.append(AccessLine(match[1], match[2], int(match[3]), match[4]))
        return found

    # -- pushing, with the oras client

    def oras(self, repo: str | None = None, *, authenticated: bool = True) -> Any:
        """An ``oras.provider.Registry`` client for this registry, logged in unless ``authenticated=False``.

        With token auth and a ``repo``, it starts with a token to push there (see below).
        """
        import oras.provider  # type: ignore[import-untyped]

        verify: bool | str = str(self.ca_file) if self.ca_file else False
        client = oras.provider.Registry(
            hostname=self.host,
            insecure=not self.tls,
            tls_verify=verify,
            auth_backend="token" if self.auth == "token" else "basic",
        )
        if authenticated and self.auth != "none":
            client.auth.set_basic_auth(self.username, self.password)
        if authenticated and self.token is not None and repo is not None:
            # oras-py keeps the first token it got (pull only, from a HEAD) for the POST that needs push;
            # so pushes carry a pull,push token minted here, which also keeps them out of token.requests.
            access = [{"type": "repository", "name": repo, "actions": ["pull", "push"]}]
            client.auth.token = self.token.sign(self.username, SERVICE, access, expires=int(time.time()) + 3600)
        return client

    def _container(self, client: Any, repo: str, reference: str) -> Any:
        return client.get_container(self.ref(repo, reference))

    def push_blob(self, repo: str, blob: Blob | bytes, client: Any = None) -> dict[str, Any]:
        """Upload one blob (POST then PUT, by the oras client); returns its descriptor."""
        blob = blob if isinstance(blob, Blob) else Blob(blob, "application/octet-stream")
        client = client or self.oras(repo)
        staged = self.workdir / "uploads" / blob.digest.replace(":", "-")
        staged.parent.mkdir(parents=True, exist_ok=True)
        staged.write_bytes(blob.data)
        response = client.upload_blob(str(staged), self._container(client, repo, "latest"), blob.descriptor())
        if response.status_code not in (200, 201, 202):
            raise RuntimeError(f"blob upload of {blob.digest} to {repo}: {response.status_code} {response.text}")
        return blob.descriptor()

    def put_manifest(
        self, repo: str, reference: str | None, manifest: Mapping[str, Any] | bytes, client: Any = None
    ) -> str:
        """PUT a manifest or index under a tag, or by its digest when ``reference`` is None; returns its digest.

        Its media type (Content-Type) is its ``mediaType`` field. The bytes sent are exactly ``manifest`` when
        given as bytes, else its compact JSON, so the digest is the sha256 of what the registry stores.
        """
        body = manifest if isinstance(manifest, bytes) else _canonical(manifest)
        media_type = json.loads(body).get("mediaType") or OCI_MANIFEST
        digest = _sha256(body)
        client = client or self.oras(repo)
        container = self._container(client, repo, reference or digest)
        response = client.do_request(
            f"{client.prefix}://{container.manifest_url()}", "PUT", data=body, headers={"Content-Type": media_type}
        )
        if response.status_code != 201:
            raise RuntimeError(f"manifest PUT to {repo}: {response.status_code} {response.text}")
        if response.headers.get("Docker-Content-Digest") != digest:
            raise RuntimeError(f"manifest PUT to {repo}: stored as {response.headers} rather than {digest}")
        return digest

    def push_oras(
        self,
        repo: str,
        tag: str,
        files: Mapping[str, bytes],
        dirs: Mapping[str, Mapping[str, bytes]] | None = None,
        *,
        annotations: Mapping[str, str] | None = None,
    ) -> str:
        """``oras push`` of files (a layer each, titled by name) and directories; returns the manifest digest.

        oras-py tars and gzips a directory with members under its name and titles it so, but does not
        mark it ``io.deis.oras.content.unpack: "true"`` as the oras CLI does: that annotation (and
        ``io.deis.oras.content.digest``, the sha256 of the tar) is added to the pushed manifest, which is
        then PUT again under the same tag.
        """
        source = self.workdir / "push" / secrets.token_hex(4)
        paths = []
        for name, data in files.items():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes(data)
            paths.append(str(source / name))
        for name, members in (dirs or {}).items():
            for member, data in members.items():
                (source / name / member).parent.mkdir(parents=True, exist_ok=True)
                (source / name / member).write_bytes(data)
            paths.append(str(source / name))
        client = self.oras(repo)
        target = self.ref(repo, tag)
        response = client.push(
            target,
            files=paths,
            disable_path_validation=True,
            manifest_annotations=dict(annotations or {}),
            quiet=True,
        )
        digest = str(response.headers["Docker-Content-Digest"])
        if not dirs:
            return digest
        manifest = client.get_manifest(target)
        for layer in manifest["layers"]:
            title = layer.get("annotations", {}).get(TITLE)
            if title in dirs and layer["mediaType"] == TAR_GZIP:
                layer["annotations"][UNPACK] = "true"
                layer["annotations"][ORAS_DIGEST] = _sha256(
                    gzip.decompress(self.get_blob(repo, layer["digest"], client))
                )
        return self.put_manifest(repo, tag, manifest, client)

    def push_modelpack(
        self,
        repo: str,
        tag: str | None,
        files: Mapping[str, bytes | Blob],
        *,
        config: Mapping[str, Any] | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> str:
        """A CNCF ModelPack artifact; returns the manifest digest.

        Each entry is a layer: bytes become a ``weight.v1.raw`` layer, a ``Blob`` keeps its media type
        (a ``...weight.v1.tar`` made with tests.conftest.make_tar, say). Either way its
        ``org.cncf.model.filepath`` is the entry's name unless the Blob sets one.
        """
        client = self.oras(repo)
        layers = []
        for name, entry in files.items():
            blob = entry if isinstance(entry, Blob) else Blob(entry, MODEL_WEIGHT_RAW)
            blob = Blob(blob.data, blob.media_type, {MODEL_FILEPATH: name, **blob.annotations})
            layers.append(self.push_blob(repo, blob, client))
        model_config = dict(
            config
            or {
                "descriptor": {"name": repo, "createdAt": "2025-01-01T00:00:00Z"},
                "config": {"format": "safetensors"},
                "modelfs": {"type": "layers", "diffIds": [layer["digest"] for layer in layers]},
            }
        )
        config_descriptor = self.push_blob(repo, Blob(_canonical(model_config), MODEL_CONFIG), client)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": MODEL_ARTIFACT,
            "config": config_descriptor,
            "layers": layers,
        }
        if annotations:
            manifest["annotations"] = dict(annotations)
        return self.put_manifest(repo, tag, manifest, client)

    def push_layers(
        self,
        repo: str,
        tag: str | None,
        layers: Sequence[bytes],
        *,
        docker: bool = False,
        config: bytes = b'{"architecture": "amd64", "os": "linux"}',
    ) -> str:
        """An ordinary image put together by hand, a gzipped tar a layer (tests.conftest.make_tar), so whiteouts
        and odd members stay exactly as written; in OCI's media types, or Docker's schema 2 ones with ``docker``
        (as ``docker buildx`` pushes them). Returns the manifest digest."""
        client = self.oras(repo)
        kinds = (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER) if docker else (OCI_MANIFEST, IMAGE_CONFIG, TAR_GZIP)
        manifest = {
            "schemaVersion": 2,
            "mediaType": kinds[0],
            "config": self.push_blob(repo, Blob(config, kinds[1]), client),
            "layers": [self.push_blob(repo, Blob(layer, kinds[2]), client) for layer in layers],
        }
        return self.put_manifest(repo, tag, manifest, client)

    def push_index(self, repo: str, tag: str, platforms: Mapping[str, str], *, media_type: str = OCI_INDEX) -> str:
        """An index of manifests already pushed to ``repo``: {"linux/amd64": digest, "linux/arm/v7": digest}."""
        client = self.oras(repo)
        entries = []
        for platform, digest in platforms.items():
            body = self.get_manifest(repo, digest, client)
            os_name, arch, *variant = platform.split("/")
            entry: dict[str, Any] = {
                "mediaType": json.loads(body).get("mediaType", OCI_MANIFEST),
                "digest": digest,
                "size": len(body),
                "platform": {"architecture": arch, "os": os_name},
            }
            if variant:
                entry["platform"]["variant"] = variant[0]
            entries.append(entry)
        return self.put_manifest(repo, tag, {"schemaVersion": 2, "mediaType": media_type, "manifests": entries}, client)

    def push_image(
        self, repo: str, tag: str, layers: Sequence[Mapping[str, bytes]], *, compression: str = "gzip"
    ) -> str:
        """``podman build`` an image FROM scratch, one layer per mapping of path -> bytes, and ``podman push`` it.

        A modelcar: ``push_image("org/modelcar", "v1", [{"models/config.json": ..., "models/w.bin": ...}])``.
        Returns the manifest digest. The local image is removed again; mark the test
        ``pytest.mark.xdist_group("containers")`` as the other podman tests are.
        """
        from tests.container_support import find_podman

        podman = find_podman()
        context = self.workdir / "image" / secrets.token_hex(4)
        steps = ["FROM scratch"]
        for number, files in enumerate(layers):
            for path, data in files.items():
                (context / f"layer{number}" / path).parent.mkdir(parents=True, exist_ok=True)
                (context / f"layer{number}" / path).write_bytes(data)
            steps.append(f"COPY layer{number}/ /")
        (context / "Containerfile").write_text("\n".join(steps) + "\n")
        target = self.ref(repo, tag)
        podman.run("build", "--quiet", "--network=none", "--tag", target, str(context))
        digest_file = context / "digest"
        trust = ["--cert-dir", str(self.cert_dir)] if self.cert_dir else ["--tls-verify=false"]
        creds = ["--creds", f"{self.username}:{self.password}"] if self.auth != "none" else []
        try:
            podman.run(
                "push", *trust, *creds, "--compression-format", compression, "--digestfile", str(digest_file), target
            )
        finally:
            podman.run("rmi", "--force", target, check=False)
        return digest_file.read_text().strip()

    def get_manifest(self, repo: str, reference: str, client: Any = None) -> bytes:
        """The manifest's bytes as the registry serves them."""
        client = client or self.oras(repo)
        container = self._container(client, repo, reference)
        accept = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST))
        response = client.do_request(f"{client.prefix}://{container.manifest_url()}", "GET", headers={"Accept": accept})
        if response.status_code != 200:
            raise RuntimeError(f"manifest GET {repo}:{reference}: {response.status_code} {response.text}")
        return bytes(response.content)

    def get_blob(self, repo: str, digest: str, client: Any = None) -> bytes:
        client = client or self.oras(repo)
        response = client.get_blob(self._container(client, repo, "latest"), digest)
        if response.status_code != 200:
            raise RuntimeError(f"blob GET {repo}@{digest}: {response.status_code} {response.text}")
        return bytes(response.content)


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def make_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Registry]]:
    """Start registries with any of Registry's options: ``make_registry(auth="token", token_lifetime=2)``."""
    started: list[Registry] = []

    def make(**options: Any) -> Registry:
        registry = Registry(tmp_path_factory.mktemp("registry"), **options)
        started.append(registry)
        return registry.start()

    yield make
    for registry in started:
        registry.stop()


@pytest.fixture
def registry(make_registry: Callable[..., Registry]) -> Registry:
    """Anonymous pulls and pushes, over HTTPS."""
    return make_registry()


@pytest.fixture
def registry_http(make_registry: Callable[..., Registry]) -> Registry:
    """Anonymous, over plain HTTP."""
    return make_registry(tls=False)


@pytest.fixture
def registry_basic(make_registry: Callable[..., Registry]) -> Registry:
    """htpasswd: Basic credentials on every request, over HTTPS."""
    return make_registry(auth="htpasswd")


@pytest.fixture
def registry_token(make_registry: Callable[..., Registry]) -> Registry:
    """Token auth through ``registry_token.token``; the repository ``public/model`` pulls anonymously."""
    return make_registry(auth="token", public={"public/model"})


@pytest.fixture
def registry_redirect(make_registry: Callable[..., Registry]) -> Registry:
    """htpasswd, with blob reads redirected (307) to ``registry_redirect.blobs`` on 127.0.0.2."""
    return make_registry(auth="htpasswd", redirect=True)
