"""Secrets never reach logs, the plan or the termination message."""

from __future__ import annotations

from pathlib import Path

from fetcher.redact import mask_headers, redact_url, scrub
from tests.conftest import Origin, run_fetcher, sha256

SIGNATURE = "f00dfacecafebabe0123456789abcdef"
PRESIGNED = (
    "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20261128%2Fus-east-1%2Fs3%2Faws4_request"
    f"&X-Amz-Date=20261128T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature={SIGNATURE}"
)


def test_presigned_url_and_token_stay_out_of_every_output(origin: Origin, tmp_path: Path) -> None:
    origin.add("/m.tar.gz", b"x", fail=[500] * 10)
    token = tmp_path / "token"
    token.write_text("tok-9f8e7d6c5b4a")
    termination = tmp_path / "termination-log"

    run = run_fetcher(
        "--source",
        origin.url("/m.tar.gz" + PRESIGNED),
        "--dest",
        str(tmp_path / "d"),
        "--retries",
        "2",
        "--bearer-token-file",
        str(token),
        "--header",
        "X-Api-Key: key-1a2b3c4d",
        "--termination-log",
        str(termination),
    )

    assert run.code == 3
    assert len(run.all("retrying")) == 2  # the failures were logged, with the URL
    outputs = run.stderr + run.stdout + termination.read_text()
    assert "X-Amz-Signature=***" in outputs
    for secret in (SIGNATURE, "AKIAIOSFODNN7EXAMPLE", "tok-9f8e7d6c5b4a", "key-1a2b3c4d"):
        assert secret not in outputs
    # ...while the server really did get them
    request = origin.hits("/m.tar.gz")[0]
    assert request.headers["Authorization"] == "Bearer tok-9f8e7d6c5b4a"
    assert SIGNATURE in request.path


def test_userinfo_passwords_are_masked(origin: Origin, tmp_path: Path) -> None:
    url = f"http://user:pa55word@127.0.0.1:{origin.port}/absent"
    run = run_fetcher("--source", url, "--dest", str(tmp_path))
    assert run.code == 3
    assert "pa55word" not in run.stderr
    assert "user:***@" in run.error


def test_redaction_helpers() -> None:
    assert redact_url("https://h/p?sig=abc&x=1") == "https://h/p?sig=***&x=1"
    assert mask_headers([("Authorization", "Bearer x"), ("X-Team", "ml")]) == ["Authorization: ***", "X-Team: ml"]
    assert scrub("failed: Authorization: Bearer eyJhbGciOi.abc.def") == "failed: Authorization: Bearer ***"
    assert scrub("key AKIAIOSFODNN7EXAMPLE used") == "key *** used"
    assert (
        redact_url("https://h/p?Policy=p&Key-Pair-Id=k&Signature=s")
        == "https://h/p?Policy=p&Key-Pair-Id=***&Signature=***"
    )


def test_tokens_in_a_redirect_target_stay_out_of_the_error(origin: Origin, tls_origin: Origin, tmp_path: Path) -> None:
    # The certificate error names the server that failed, i.e. the redirect's target, whose
    # URL carries its own kinds of token: Backblaze, Akamai, CDN HMACs.
    query = "?Authorization=b2-tok-1111&__token__=exp=9~hmac=ak-tok-2222&hdnts=ak-tok-3333&hmac=cdn-tok-4444&v=2"
    target = tls_origin.add("/m.bin", b"never sent") + query
    url = origin.add("/m.bin", b"", redirect=target)
    run = run_fetcher("--source", url, "--dest", str(tmp_path))
    assert run.code == 3
    assert run.error.startswith(f"TLS certificate of {target.split('?')[0]}?Authorization=***&__token__=***&")
    for secret in ("b2-tok-1111", "ak-tok-2222", "ak-tok-3333", "cdn-tok-4444"):
        assert secret not in run.stderr + run.stdout


def test_a_token_file_with_two_lines_is_refused_without_echoing_it(origin: Origin, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first-half\nsecond-half-SECRET\n")
    run = run_fetcher(
        "--source", origin.add("/w.bin", b"x"), "--dest", str(tmp_path / "d"), "--bearer-token-file", str(token)
    )
    assert run.code == 2
    assert "one line of printable ASCII" in run.error
    assert "SECRET" not in run.stderr and "first-half" not in run.stderr
    assert origin.requests == []


def test_a_dry_run_checks_the_token_file_as_a_real_run_would(tmp_path: Path) -> None:
    args = ("--source", "https://models.example.com/m.bin", "--dest", str(tmp_path), "--dry-run")
    missing = run_fetcher(*args, "--bearer-token-file", str(tmp_path / "absent"))
    assert missing.code == 2
    assert missing.error == f"--bearer-token-file {tmp_path / 'absent'}: No such file or directory"
    token = tmp_path / "token"
    token.write_text("tok-5e5e5e\n")
    run = run_fetcher(*args, "--bearer-token-file", str(token))
    assert run.code == 0, run.stderr
    assert "tok-5e5e5e" not in run.stdout + run.stderr


def test_a_restart_with_the_model_present_does_not_need_the_token(origin: Origin, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("tok-6f6f6f\n")
    url = origin.add("/w.bin", b"weights")
    args = ("--source", url, "--dest", str(tmp_path / "d"), "--sha256", sha256(b"weights"))
    assert run_fetcher(*args, "--bearer-token-file", str(token)).code == 0
    token.unlink()  # the Secret was rotated away: nothing needs it while the model is in place
    again = run_fetcher(*args, "--bearer-token-file", str(token))
    assert again.code == 0, again.error
    assert again.event("done")["already_present"] == 1


def test_sigv2_presigned_urls_are_masked_in_the_plan_and_the_marker(origin: Origin, tmp_path: Path) -> None:
    origin.add("/m.bin", b"model")
    url = origin.url("/m.bin?AWSAccessKeyId=AKIAIOSFODNN7EXAMPLE&Expires=1900000000&Signature=c2lnbmF0dXJl")
    plan = run_fetcher("--source", url, "--dest", str(tmp_path), "--dry-run")
    fetched = run_fetcher("--source", url, "--dest", str(tmp_path))
    assert plan.code == 0 and fetched.code == 0, fetched.stderr
    [marker] = (tmp_path / ".fetcher").glob("*.json")
    everything = plan.stdout + plan.stderr + fetched.stderr + marker.read_text()
    assert "AKIAIOSFODNN7EXAMPLE" not in everything and "c2lnbmF0dXJl" not in everything
    assert "AWSAccessKeyId=***" in plan.stdout


def test_secret_headers_do_not_follow_a_redirect_to_another_origin(origin: Origin, tmp_path: Path) -> None:
    other = Origin()
    try:
        target = other.add("/m.bin", b"model")
        url = origin.add("/m.bin", b"", redirect=target)
        run = run_fetcher(
            "--source", url, "--dest", str(tmp_path), "--header", "X-Api-Key: key-77", "--header", "X-Team: ml"
        )
        assert run.code == 0, run.stderr
        assert origin.hits("/m.bin")[0].headers["X-Api-Key"] == "key-77"
        redirected = other.hits("/m.bin")[0].headers
        assert "X-Api-Key" not in redirected
        assert redirected["X-Team"] == "ml"
    finally:
        other.close()
