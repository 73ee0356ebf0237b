"""HTTPS through an HTTP CONNECT proxy, as clusters in companies reach the outside."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.conftest import S3, Origin, Tls, make_tar, model_files, run_fetcher, sha256, tree

if TYPE_CHECKING:
    from tests.faults_support import S3Front
    from tests.proxy import ConnectProxy

pytest_plugins = ("tests.proxy",)  # its fixtures: connect_proxy, authenticating_proxy

PROXY_PASSWORD = "pr0xy-S3CRET"


def _env(proxy_url: str, tls: Tls, **extra: str) -> dict[str, str]:
    return {"HTTPS_PROXY": proxy_url, "SSL_CERT_FILE": str(tls.ca_file)} | extra


def test_https_goes_through_the_proxy_in_https_proxy(
    tls_origin: Origin, tls: Tls, connect_proxy: ConnectProxy, tmp_path: Path
) -> None:
    archive = make_tar(model_files())
    url = tls_origin.add("/m.tar.gz", archive, etag='"v1"')
    run = run_fetcher(
        "--source", url, "--dest", str(tmp_path), "--sha256", sha256(archive), env=_env(connect_proxy.url(), tls)
    )
    assert run.code == 0, run.stderr
    assert tree(tmp_path) == {k: v for k, v in model_files().items() if isinstance(v, bytes)}
    assert [c.line for c in connect_proxy.seen] == [f"CONNECT 127.0.0.1:{tls_origin.port} HTTP/1.1"]
    assert connect_proxy.tunnelled > len(archive)  # the bytes came through the tunnel
    assert len(tls_origin.hits("/m.tar.gz")) == 1


@pytest.mark.fault("a cut HTTPS transfer through a CONNECT proxy resumes pinned", exit=0, area="network")
def test_a_cut_transfer_through_the_proxy_resumes(
    tls_origin: Origin, tls: Tls, connect_proxy: ConnectProxy, tmp_path: Path
) -> None:
    archive = make_tar(model_files())
    url = tls_origin.add("/m.tar.gz", archive, etag='"v1"', cut_after=[100_000])
    run = run_fetcher(
        "--source", url, "--dest", str(tmp_path), "--sha256", sha256(archive), env=_env(connect_proxy.url(), tls)
    )
    assert run.code == 0, run.stderr
    second = tls_origin.hits("/m.tar.gz")[1].headers
    assert second["If-Match"] == '"v1"' and second["Range"].startswith("bytes=")
    assert len(connect_proxy.seen) == 2  # a new tunnel for the resumed request


def test_no_proxy_bypasses_the_proxy(tls_origin: Origin, tls: Tls, connect_proxy: ConnectProxy, tmp_path: Path) -> None:
    body = b"weights" * 1000
    url = tls_origin.add("/w.bin", body)
    env = _env(connect_proxy.url(), tls, NO_PROXY="127.0.0.1")
    run = run_fetcher("--source", url, "--dest", str(tmp_path), "--sha256", sha256(body), env=env)
    assert run.code == 0, run.stderr
    assert tree(tmp_path) == {"w.bin": body}
    assert connect_proxy.seen == []
    assert len(tls_origin.hits("/w.bin")) == 1


def test_a_proxy_that_needs_credentials_gets_them_and_they_are_never_shown(
    tls_origin: Origin, tls: Tls, authenticating_proxy: ConnectProxy, tmp_path: Path
) -> None:
    body = b"weights" * 1000
    url = tls_origin.add("/w.bin", body)
    env = _env(authenticating_proxy.url(f"proxyuser:{PROXY_PASSWORD}"), tls)
    plan = run_fetcher("--source", url, "--dest", str(tmp_path), "--dry-run", env=env)
    run = run_fetcher("--source", url, "--dest", str(tmp_path), "--sha256", sha256(body), env=env)
    assert run.code == 0, run.stderr
    assert tree(tmp_path) == {"w.bin": body}
    [connect] = authenticating_proxy.seen
    assert connect.status == 200 and connect.headers["Proxy-Authorization"].startswith("Basic ")
    assert "Proxy-Authorization" not in tls_origin.hits("/w.bin")[0].headers  # for the proxy, not the origin
    [marker] = (tmp_path / ".fetcher").glob("*.json")
    for text in (plan.stdout, plan.stderr, run.stdout, run.stderr, marker.read_text()):
        assert PROXY_PASSWORD not in text
        assert "cHJveHl1c2VyOnByMHh5LVMzQ1JFVA" not in text  # nor its Basic form
    json.loads(plan.stdout)  # the plan is whole


@pytest.mark.fault(
    "a proxy refusing the credentials (407): exit 3, the proxy password in no output", exit=3, area="secrets"
)
def test_a_proxy_refusing_the_credentials_fails_without_showing_them(
    tls_origin: Origin, tls: Tls, authenticating_proxy: ConnectProxy, tmp_path: Path
) -> None:
    url = tls_origin.add("/w.bin", b"weights")
    termination = tmp_path / "termination-log"
    dest = tmp_path / "d"
    env = _env(authenticating_proxy.url("proxyuser:wr0ng-PASSWORD"), tls)
    run = run_fetcher("--source", url, "--dest", str(dest), "--termination-log", str(termination), env=env)
    assert run.code == 3, run.stderr
    refused = "407 Proxy Authentication Required (check the credentials in HTTPS_PROXY)"
    assert run.error == f"the proxy for {url} refused to connect: {refused}"
    assert termination.read_text() == run.error + "\n"
    assert run.all("retrying") == []  # the same answer every time
    for text in (run.stdout, run.stderr, termination.read_text()):
        assert "wr0ng-PASSWORD" not in text
    assert tls_origin.requests == []
    assert not dest.exists(), "a failed first run leaves no dest behind"


@pytest.mark.fault(
    "an untrusted certificate behind a CONNECT proxy: exit 3 at once, naming the server", exit=3, area="network"
)
def test_an_untrusted_certificate_through_the_proxy_fails_at_once(
    tls_origin: Origin, connect_proxy: ConnectProxy, tmp_path: Path
) -> None:
    url = tls_origin.add("/w.bin", b"weights")
    run = run_fetcher("--source", url, "--dest", str(tmp_path), env={"HTTPS_PROXY": connect_proxy.url()})
    assert run.code == 3
    assert run.error.startswith(f"TLS certificate of {url} not trusted: ")
    assert run.all("retrying") == []
    assert len(connect_proxy.seen) == 1


def test_s3_over_https_goes_through_the_proxy(
    s3: S3, s3_tls: S3Front, tls: Tls, connect_proxy: ConnectProxy, tmp_path: Path
) -> None:
    body = b"weights" * 1000
    source = s3.put("proxied", "w.bin", body)
    env = s3_tls.env | {"AWS_CA_BUNDLE": str(tls.ca_file), "HTTPS_PROXY": connect_proxy.url()}
    run = run_fetcher("--source", source, "--dest", str(tmp_path), "--sha256", sha256(body), env=env)
    assert run.code == 0, run.stderr
    assert tree(tmp_path) == {"w.bin": body}
    assert [c.line.rsplit(" ", 1)[0] for c in connect_proxy.seen] == [f"CONNECT 127.0.0.1:{s3_tls.port}"]
