"""Fetching from S3 through moto's real server, with the standard AWS env."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import S3, make_tar, model_files, run_fetcher, sha256, tree


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


def test_the_aws_secret_never_reaches_the_logs(s3: S3, tmp_path: Path) -> None:
    run = run_fetcher("--source", "s3://models/absent", "--dest", str(tmp_path), env=s3.env)
    assert run.code == 3
    assert s3.env["AWS_SECRET_ACCESS_KEY"] not in run.stderr
    assert s3.env["AWS_ACCESS_KEY_ID"] not in run.stderr
