"""Secrets never reach logs, the plan or the termination message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fetcher.redact import looks_like_credential, mask_headers, redact_url, scrub
from tests.conftest import Origin, run_fetcher, sha256, tree

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


@pytest.mark.parametrize(
    ("userinfo", "secret"),
    [
        pytest.param("user:pa55word", "pa55word", id="user-and-password"),
        pytest.param(
            "ghp_16C7e42F292c6912E7710c838347Ae178B4a",
            "16C7e42F292c6912E7710c838347Ae178B4a",
            marks=pytest.mark.fault("a token as a URL's user name, without a password", exit=3, area="secrets"),
            id="token-as-user",
        ),
        pytest.param(
            ":SECRETpw",
            "SECRETpw",
            marks=pytest.mark.fault("a password with an empty user name in the URL", exit=3, area="secrets"),
            id="empty-user",
        ),
    ],
)
def test_any_userinfo_is_masked(origin: Origin, tmp_path: Path, userinfo: str, secret: str) -> None:
    url = f"http://{userinfo}@127.0.0.1:{origin.port}/absent"
    termination = tmp_path / "termination-log"
    dest = tmp_path / "d"
    plan = run_fetcher("--source", url, "--dest", str(dest), "--dry-run")
    run = run_fetcher("--source", url, "--dest", str(dest), "--termination-log", str(termination))
    assert plan.code == 0 and run.code == 3
    assert run.error == f"HTTP 404 Not Found from http://***@127.0.0.1:{origin.port}/absent"
    assert termination.read_text() == run.error + "\n"
    assert json.loads(plan.stdout)["artifacts"][0]["source"] == f"http://***@127.0.0.1:{origin.port}/absent"
    assert secret not in plan.stdout + plan.stderr + run.stdout + run.stderr
    assert not dest.exists(), "a failed first run leaves no dest behind"


def test_redaction_helpers() -> None:
    assert redact_url("https://h/p?sig=abc&x=1") == "https://h/p?sig=***&x=1"
    assert mask_headers([("Authorization", "Bearer x"), ("X-Team", "ml"), ("Accept", "*/*")]) == [
        "Authorization: ***",
        "X-Team: ***",
        "Accept: */*",
    ]
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


@pytest.mark.fault(
    "user headers (an Artifactory X-JFrog-Art-Api key) and the bearer token on a redirect to another host",
    exit=0,
    area="secrets",
)
def test_no_user_header_follows_a_redirect_to_another_origin(origin: Origin, tmp_path: Path) -> None:
    other = Origin()
    token = tmp_path / "token"
    token.write_text("tok-0a0b0c0d\n")
    try:
        target = other.add("/m.bin", b"model")
        url = origin.add("/m.bin", b"", redirect=target)
        run = run_fetcher(
            "--source",
            url,
            "--dest",
            str(tmp_path / "d"),
            "--header",
            "X-JFrog-Art-Api: AKCp8jQ8tXYZ",
            "--header",
            "X-Team: ml",
            "--bearer-token-file",
            str(token),
        )
        assert run.code == 0, run.stderr
        assert tree(tmp_path / "d") == {"m.bin": b"model"}
        first = origin.hits("/m.bin")[0].headers
        assert (first["X-JFrog-Art-Api"], first["X-Team"], first["Authorization"]) == (
            "AKCp8jQ8tXYZ",
            "ml",
            "Bearer tok-0a0b0c0d",
        )
        redirected = other.hits("/m.bin")[0].headers  # another port: another origin
        assert not {"X-JFrog-Art-Api", "X-Team", "Authorization"} & set(redirected)
    finally:
        other.close()


def test_user_headers_do_follow_a_redirect_within_the_origin(origin: Origin, tmp_path: Path) -> None:
    origin.add("/new.bin", b"model")
    url = origin.add("/m.bin", b"", redirect=origin.url("/new.bin"))
    run = run_fetcher("--source", url, "--dest", str(tmp_path), "--header", "X-JFrog-Art-Api: AKCp8jQ8tXYZ")
    assert run.code == 0, run.stderr
    assert origin.hits("/new.bin")[0].headers["X-JFrog-Art-Api"] == "AKCp8jQ8tXYZ"


@pytest.mark.fault(
    "header values of any name (X-JFrog-Art-Api) in the plan log line and the dry-run output", exit=0, area="secrets"
)
def test_header_values_are_never_shown_whatever_their_name(origin: Origin, tmp_path: Path) -> None:
    url = origin.add("/m.bin", b"model")
    headers = (
        "--header",
        "X-JFrog-Art-Api: AKCp8jQ8tXYZ",
        "--header",
        "X-Team: ml-platform",
        "--header",
        "Accept: */*",
    )
    plan = run_fetcher("--source", url, "--dest", str(tmp_path), *headers, "--dry-run")
    run = run_fetcher("--source", url, "--dest", str(tmp_path), *headers)
    assert plan.code == 0 and run.code == 0, run.stderr
    shown = ["X-JFrog-Art-Api: ***", "X-Team: ***", "Accept: */*"]
    assert json.loads(plan.stdout)["artifacts"][0]["headers"] == shown
    assert run.event("plan")["headers"] == shown
    assert "AKCp8jQ8tXYZ" not in plan.stdout + plan.stderr + run.stderr
    assert "ml-platform" not in plan.stdout + run.stderr


ALIBABA = "auth_key=1444435200-0-0-80cd3f2d1c3bc3a8bbd1e2e6b8b6d1f1"
UNNAMED = "t=Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MGFi"  # a token under a name no list would know


@pytest.mark.parametrize(
    ("query", "secret"),
    [
        pytest.param(
            ALIBABA,
            "80cd3f2d1c3bc3a8bbd1e2e6b8b6d1f1",
            marks=pytest.mark.fault("an Alibaba auth_key= URL signature", exit=3, area="secrets"),
            id="alibaba-auth-key",
        ),
        pytest.param(
            UNNAMED,
            "Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MGFi",
            marks=pytest.mark.fault("a long random query value under an unknown name", exit=3, area="secrets"),
            id="unnamed-token",
        ),
    ],
)
def test_credential_shaped_query_values_stay_out_of_every_output(
    origin: Origin, tmp_path: Path, query: str, secret: str
) -> None:
    origin.add("/m.bin", b"model")
    termination = tmp_path / "termination-log"
    dest = tmp_path / "d"
    good = origin.url(f"/m.bin?{query}&v=2")
    fetched = run_fetcher("--source", good, "--dest", str(dest))
    failed = run_fetcher(
        "--source", origin.url(f"/absent?{query}&v=2"), "--dest", str(dest), "--termination-log", str(termination)
    )
    assert fetched.code == 0, fetched.stderr
    assert failed.code == 3
    name = query.split("=")[0]
    assert failed.error == f"HTTP 404 Not Found from {origin.url(f'/absent?{name}=***&v=2')}"
    [marker] = (dest / ".fetcher").glob("*.json")
    everything = fetched.stderr + failed.stderr + termination.read_text() + marker.read_text()
    assert secret not in everything
    assert f"{name}=***&v=2" in marker.read_text()
    assert origin.hits("/m.bin")[0].path.endswith(f"?{query}&v=2")  # the server got it whole


def test_urls_told_apart_only_by_masked_values_are_still_two_artifacts(origin: Origin, tmp_path: Path) -> None:
    # Masking is for people; the state key must not merge two objects because both values were masked.
    origin.add("/m.bin", b"model")
    first = run_fetcher("--source", origin.url("/m.bin?t=Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MGFi"), "--dest", str(tmp_path))
    second = run_fetcher("--source", origin.url("/m.bin?t=cXV4YmF6Zm9vYmFyOTg3NjU0MzIxMGJh"), "--dest", str(tmp_path))
    assert first.code == 0 and second.code == 0, second.stderr
    assert second.event("plan")["source"] == first.event("plan")["source"]  # both shown masked
    assert second.all("already present") == []
    assert len(origin.hits("/m.bin")) == 2


def test_a_rotated_signature_is_the_same_artifact(origin: Origin, tmp_path: Path) -> None:
    # A named credential is no part of what the object is: a re-signed URL finds the model in place.
    origin.add("/m.bin", b"model")
    assert run_fetcher("--source", origin.url("/m.bin?Signature=c2lnLW9uZQ"), "--dest", str(tmp_path)).code == 0
    again = run_fetcher("--source", origin.url("/m.bin?Signature=c2lnLXR3bw"), "--dest", str(tmp_path))
    assert again.code == 0, again.stderr
    assert again.event("done")["already_present"] == 1
    assert len(origin.hits("/m.bin")) == 1


def test_urls_in_free_text_are_redacted_as_urls() -> None:
    text = "failed: GET https://ghp_16C7e42F292c6912E7710c838347Ae178B4a@h/p?auth_key=1-0-0-abc&x=1 refused"
    assert scrub(text) == "failed: GET https://***@h/p?auth_key=***&x=1 refused"
    assert scrub("see http://:SECRET@h/m") == "see http://***@h/m"


@pytest.mark.parametrize(
    "value",
    [
        "80cd3f2d1c3bc3a8bbd1e2e6b8b6d1f1",  # an md5
        "ghp_16C7e42F292c6912E7710c838347Ae178B4a",
        "hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2ln",  # a JWT
        "3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY+MTRCxf3vjVBH40Nr8X8gdRQBpUMLUo",
        "550e8400-e29b-41d4-a716-446655440000",
    ],
)
def test_long_random_values_look_like_credentials(value: str) -> None:
    assert looks_like_credential(value)
    assert redact_url(f"https://h/m?x={value}") == "https://h/m?x=***"
    assert redact_url(f"https://h/m?x={value}", guess=False) == f"https://h/m?x={value}"  # the state key keeps it


@pytest.mark.parametrize(
    "value",
    [
        "2026-01-01T00:00:00Z",
        "20261128T000000Z",
        "models/sentiment/v3/model.tar.gz",
        "meta-llama/Llama-3.1-8B-Instruct",
        "distilbert-base-uncased-finetuned-sst-2-english",
        "model-00001-of-00004.safetensors",
        "1900000000",
        "tokenizer.json",
    ],
)
def test_words_dates_and_names_do_not(value: str) -> None:
    assert not looks_like_credential(value)
