"""Fetching from S3 through moto's real server, with the standard AWS env."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.conftest import S3, Tls, make_tar, model_files, run_fetcher, sha256, tree

if TYPE_CHECKING:
    from tests.faults_support import S3Front


def test_fetches_a_tar_gz_from_s3(s3: S3, tmp_path: Path) -> None:
    archive = make_tar(model_files())
    source = s3.put("models", "sentiment/v1/model.tar.gz", archive)

    run = run_fetcher("--source", source, "--dest", str(tmp_path), "--sha256", sha256(archive), env=s3.env)

    assert run.code == 0, run.stderr
    assert tree(tmp_path) == {k: v for k, v in model_files().items() if isinstance(v, bytes)}
    assert run.event("published")["verified"] is True


def test_path_style_addressing(s3: S3, tmp_path: Path) -> None:
    body = b"weights" * 100
    source = s3.put("path-style", "w.bin", body)
    env = s3.env | {"FETCHER_S3_ADDRESSING_STYLE": "path"}
    run = run_fetcher("--source", source, "--dest", str(tmp_path), "--sha256", sha256(body), env=env)
    assert run.code == 0, run.stderr
    assert tree(tmp_path) == {"w.bin": body}


def test_a_missing_object_is_exit_3_without_retries(s3: S3, tmp_path: Path) -> None:
    s3.put("models", "present.bin", b"x")
    run = run_fetcher("--source", "s3://models/absent.tar.gz", "--dest", str(tmp_path), env=s3.env)
    assert run.code == 3
    assert "s3://models/absent.tar.gz does not exist" in run.error
    assert run.all("retrying") == []


def test_a_missing_bucket_is_exit_3(s3: S3, tmp_path: Path) -> None:
    run = run_fetcher("--source", "s3://no-such-bucket/m.tar.gz", "--dest", str(tmp_path), env=s3.env)
    assert run.code == 3
    assert "does not exist" in run.error


def test_an_unreachable_endpoint_is_retried_then_exit_3(tmp_path: Path) -> None:
    env = {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_ACCESS_KEY_ID": "a",
        "AWS_SECRET_ACCESS_KEY": "b",
        "AWS_REGION": "us-east-1",
    }
    run = run_fetcher("--source", "s3://b/k", "--dest", str(tmp_path), "--retries", "1", env=env)
    assert run.code == 3
    assert len(run.all("retrying")) == 1


def test_an_endpoint_without_its_scheme_is_exit_2_naming_the_variable(tmp_path: Path) -> None:
    env = {"AWS_ENDPOINT_URL": "minio.local:9000", "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}
    run = run_fetcher("--source", "s3://b/k", "--dest", str(tmp_path / "d"), env=env)
    assert run.code == 2, run.stderr  # was exit 1, an internal error with a traceback
    assert (
        run.error == "the S3 endpoint is not a URL ('minio.local:9000'): set AWS_ENDPOINT_URL to http(s)://host[:port]"
    )
    assert "Traceback" not in run.stderr
    secret = run_fetcher("--source", "s3://b/k", "--dest", str(tmp_path / "e"),
                         env=env | {"AWS_ENDPOINT_URL": "minio:s3cr3tPassw0rd@minio:9000"})  # fmt: skip
    assert secret.code == 2 and "the endpoint given is not shown" in secret.error
    assert "s3cr3tPassw0rd" not in secret.stderr  # no URL parser finds the password without a scheme
    region = run_fetcher(
        "--source",
        "s3://b/k",
        "--dest",
        str(tmp_path / "f"),
        env={"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b", "AWS_DEFAULT_REGION": "eu west"},
    )
    assert region.code == 2 and region.error.startswith("the S3 region is not valid"), region.stderr


def test_the_aws_secret_never_reaches_the_logs(s3: S3, tmp_path: Path) -> None:
    run = run_fetcher("--source", "s3://models/absent", "--dest", str(tmp_path), env=s3.env)
    assert run.code == 3
    assert s3.env["AWS_SECRET_ACCESS_KEY"] not in run.stderr
    assert s3.env["AWS_ACCESS_KEY_ID"] not in run.stderr


# --- TLS, and the errors S3 answers: moto behind a front that terminates TLS or injects errors --------


def test_an_https_endpoint_trusted_through_aws_ca_bundle(s3: S3, s3_tls: S3Front, tls: Tls, tmp_path: Path) -> None:
    body = b"weights" * 1000
    source = s3.put("tls", "w.bin", body)
    env = s3_tls.env | {"AWS_CA_BUNDLE": str(tls.ca_file)}
    run = run_fetcher("--source", source, "--dest", str(tmp_path), "--sha256", sha256(body), env=env)
    assert run.code == 0, run.stderr
    assert tree(tmp_path) == {"w.bin": body}
    assert len(s3_tls.gets()) == 1


@pytest.mark.parametrize("bundle", ["missing", "not-pem"])
@pytest.mark.fault(
    "AWS_CA_BUNDLE that cannot be loaded, https S3 endpoint: exit 2 at once, naming the variable and path",
    exit=2,
    area="s3",
)
def test_a_ca_bundle_that_cannot_be_loaded_is_a_usage_error(
    s3: S3, s3_tls: S3Front, tmp_path: Path, bundle: str
) -> None:
    source = s3.put("tls", "w.bin", b"w")
    path = tmp_path / "ca.pem"
    if bundle == "not-pem":
        path.write_text("not a certificate\n")
    dest = tmp_path / "d"
    run = run_fetcher("--source", source, "--dest", str(dest), env=s3_tls.env | {"AWS_CA_BUNDLE": str(path)})
    assert run.code == 2, run.stderr
    assert run.error.startswith(f"cannot load CA certificates from AWS_CA_BUNDLE={path}: ")
    assert "\n" not in run.error
    assert run.all("retrying") == []
    assert s3_tls.gets() == []
    assert not dest.exists() or sorted(p.name for p in dest.iterdir()) in ([], [".fetcher"])


@pytest.mark.fault(
    "an untrusted certificate on an https S3 endpoint: exit 3 at once, naming the server", exit=3, area="s3"
)
def test_an_untrusted_certificate_fails_at_once_naming_the_server(s3: S3, s3_tls: S3Front, tmp_path: Path) -> None:
    source = s3.put("tls", "w.bin", b"w")
    run = run_fetcher("--source", source, "--dest", str(tmp_path / "d"), env=s3_tls.env)
    assert run.code == 3, run.stderr
    assert run.error.startswith(f"TLS certificate of {s3_tls.endpoint}/tls/w.bin not trusted: ")
    assert "AWS_CA_BUNDLE" in run.error  # the hint: how to trust a private CA
    assert run.all("retrying") == []


@pytest.mark.fault("an S3 body that trickles is cut and resumed with a pinned range", exit=0, area="s3")
def test_a_trickling_s3_body_is_cut_and_resumed(s3: S3, s3_front: S3Front, tmp_path: Path) -> None:
    body = bytes(range(256)) * 1200
    source = s3.put("errs", "trickle.bin", body)
    s3_front.trickle = [100]  # the first GET at 100 bytes/s, then at full speed
    low_speed = ("--low-speed-limit", "1Ki", "--low-speed-time", "1")
    env = s3_front.env
    run = run_fetcher(
        "--source", source, "--dest", str(tmp_path), "--sha256", sha256(body), *low_speed, env=env, timeout=60
    )
    assert run.code == 0, run.stderr
    assert tree(tmp_path) == {"trickle.bin": body}
    [retry] = run.all("retrying")
    assert "below --low-speed-limit 1024 bytes/s" in retry["reason"] and retry["resume_at"] > 0
