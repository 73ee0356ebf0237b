"""Fetching over HTTP from a loopback origin, including the faults real origins have."""

from __future__ import annotations

import random
from pathlib import Path

import certifi
import pytest

from tests.conftest import Origin, Tls, make_tar, model_files, run_fetcher, sha256, tree


def test_fetches_verifies_and_unpacks_a_tar_gz(origin: Origin, tmp_path: Path) -> None:
    archive = make_tar(model_files())
    url = origin.add("/models/sentiment.tar.gz", archive)
    dest = tmp_path / "models"

    run = run_fetcher("--source", url, "--dest", str(dest), "--sha256", sha256(archive))

    assert run.code == 0, run.stderr
    assert tree(dest) == {k: v for k, v in model_files().items() if isinstance(v, bytes)}
    done = run.event("published")
    assert done["verified"] is True and done["format"] == "tar.gz" and done["files"] == 3
    assert done["sha256"] == sha256(archive)
    assert [e["event"] for e in run.events][:2] == ["start", "plan"]
    assert run.event("done")["fetched"] == 1
    # the request asked for the bytes as stored, never re-encoded
    assert origin.hits("/models/sentiment.tar.gz")[0].headers["Accept-Encoding"] == "identity"


def test_a_restart_with_the_model_present_makes_no_request(origin: Origin, tmp_path: Path) -> None:
    archive = make_tar(model_files())
    url = origin.add("/m.tar.gz", archive)
    args = ("--source", url, "--dest", str(tmp_path), "--sha256", sha256(archive))
    assert run_fetcher(*args).code == 0
    requests_before = len(origin.requests)

    again = run_fetcher(*args)

    assert again.code == 0
    assert len(origin.requests) == requests_before
    assert again.event("already present")["sha256"] == sha256(archive)


def test_a_damaged_model_is_fetched_again(origin: Origin, tmp_path: Path) -> None:
    archive = make_tar(model_files())
    url = origin.add("/m.tar.gz", archive)
    args = ("--source", url, "--dest", str(tmp_path), "--sha256", sha256(archive))
    assert run_fetcher(*args).code == 0
    (tmp_path / "model" / "weights.safetensors").write_bytes(b"truncated")

    again = run_fetcher(*args)

    assert again.code == 0
    assert len(origin.hits("/m.tar.gz")) == 2
    assert (tmp_path / "model" / "weights.safetensors").stat().st_size == 300_000


def test_retries_503_honouring_retry_after(origin: Origin, tmp_path: Path) -> None:
    body = b"weights" * 1000
    url = origin.add("/w.bin", body, fail=[503, 503], retry_after="1")

    run = run_fetcher("--source", url, "--dest", str(tmp_path), "--sha256", sha256(body))

    assert run.code == 0, run.stderr
    assert (tmp_path / "w.bin").read_bytes() == body
    retries = run.all("retrying")
    assert len(retries) == 2
    assert retries[0]["delay_s"] == 1.0  # the server's Retry-After, not our 0.05 s backoff
    assert "HTTP 503" in retries[0]["reason"]
    assert len(origin.hits("/w.bin")) == 3


def test_429_is_retried_too(origin: Origin, tmp_path: Path) -> None:
    body = b"x" * 5000
    url = origin.add("/w.bin", body, fail=[429])
    run = run_fetcher("--source", url, "--dest", str(tmp_path))
    assert run.code == 0, run.stderr
    assert "HTTP 429" in run.event("retrying")["reason"]


def test_a_connection_cut_mid_body_resumes_with_a_range(origin: Origin, tmp_path: Path) -> None:
    archive = make_tar(model_files())
    url = origin.add("/m.tar.gz", archive, cut_after=[100_000], etag='"v1"')

    run = run_fetcher("--source", url, "--dest", str(tmp_path), "--sha256", sha256(archive))

    assert run.code == 0, run.stderr
    second = origin.hits("/m.tar.gz")[1]
    resumed_at = int(second.headers["Range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= 100_000
    assert second.headers["If-Match"] == '"v1"'  # pinned: never stitch two versions
    assert run.event("retrying")["resume_at"] == resumed_at
    assert tree(tmp_path)["model/weights.safetensors"] == model_files()["model/weights.safetensors"]


def test_a_server_that_ignores_ranges_still_gives_the_right_bytes(origin: Origin, tmp_path: Path) -> None:
    archive = make_tar(model_files())
    url = origin.add("/m.tar.gz", archive, cut_after=[150_000], ranges=False)

    run = run_fetcher("--source", url, "--dest", str(tmp_path), "--sha256", sha256(archive))

    assert run.code == 0, run.stderr
    assert len(origin.hits("/m.tar.gz")) == 2
    assert run.event("published")["size"] == len(archive)


def test_an_object_that_changes_between_attempts_is_refused(origin: Origin, tmp_path: Path) -> None:
    url = origin.add("/w.bin", b"A" * 200_000, cut_after=[50_000], etag='"v1"', then=(b"B" * 200_000, '"v2"'))

    run = run_fetcher("--source", url, "--dest", str(tmp_path))

    assert run.code == 3
    assert "changed during the download" in run.error
    assert origin.hits("/w.bin")[1].headers["If-Match"] == '"v1"'
    assert tree(tmp_path) == {}


def test_404_fails_at_once_with_exit_3(origin: Origin, tmp_path: Path) -> None:
    run = run_fetcher("--source", origin.url("/missing.tar.gz"), "--dest", str(tmp_path))
    assert run.code == 3
    assert "HTTP 404" in run.error and "/missing.tar.gz" in run.error
    assert len(origin.hits("/missing.tar.gz")) == 1  # a 404 is not retried
    assert run.all("retrying") == []


def test_persistent_5xx_gives_up_after_the_retries(origin: Origin, tmp_path: Path) -> None:
    url = origin.add("/w.bin", b"x", fail=[500] * 10)
    run = run_fetcher("--source", url, "--dest", str(tmp_path), "--retries", "2")
    assert run.code == 3
    assert "HTTP 500" in run.error
    assert len(origin.hits("/w.bin")) == 3


def test_a_stalled_server_times_out(origin: Origin, tmp_path: Path) -> None:
    url = origin.add("/w.bin", b"x" * 1000, stall=5)
    run = run_fetcher("--source", url, "--dest", str(tmp_path), "--timeout", "0.3", "--retries", "1")
    assert run.code == 3
    assert "timed out" in run.error


def test_nothing_listens(tmp_path: Path) -> None:
    run = run_fetcher("--source", "http://127.0.0.1:9/m.tar.gz", "--dest", str(tmp_path), "--retries", "1")
    assert run.code == 3
    assert "connection to http://127.0.0.1:9/m.tar.gz failed" in run.error


def test_an_html_page_instead_of_the_model_is_refused(origin: Origin, tmp_path: Path) -> None:
    url = origin.add("/m.tar.gz", b"<html><body>Please log in</body></html>", content_type="text/html; charset=utf-8")
    run = run_fetcher("--source", url, "--dest", str(tmp_path))
    assert run.code == 3
    assert "HTML page" in run.error
    assert tree(tmp_path) == {}


def test_a_plain_file_keeps_the_url_name_without_the_query(origin: Origin, tmp_path: Path) -> None:
    body = b"\x00\x01weights" * 100
    origin.add("/files/model.safetensors", body)
    run = run_fetcher("--source", origin.url("/files/model.safetensors?download=1"), "--dest", str(tmp_path))
    assert run.code == 0, run.stderr
    assert tree(tmp_path) == {"model.safetensors": body}
    assert oct((tmp_path / "model.safetensors").stat().st_mode & 0o777) == "0o644"


def test_progress_lines_during_a_long_transfer(origin: Origin, tmp_path: Path) -> None:
    body = b"w" * 400_000
    url = origin.add("/w.bin", body, rate=800_000)
    run = run_fetcher("--source", url, "--dest", str(tmp_path), "--progress-interval", "0.1")
    assert run.code == 0, run.stderr
    progress = run.all("progress")
    assert len(progress) >= 2
    assert {"bytes", "percent", "mb_per_s", "eta_s", "total"} <= set(progress[-1])
    assert 0 < progress[0]["percent"] < 100
    summary = run.event("done")
    assert summary["bytes"] == len(body) and "seconds" in summary and "mb_per_s" in summary


def test_headers_and_bearer_token_reach_the_server(origin: Origin, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cr3t-token\n")
    url = origin.add("/w.bin", b"data", require={"Authorization": "Bearer s3cr3t-token", "X-Team": "ml"})
    run = run_fetcher(
        "--source",
        url,
        "--dest",
        str(tmp_path / "out"),
        "--header",
        "X-Team: ml",
        "--bearer-token-file",
        str(token_file),
    )
    assert run.code == 0, run.stderr
    assert "s3cr3t-token" not in run.stderr


def test_401_hints_at_credentials(origin: Origin, tmp_path: Path) -> None:
    url = origin.add("/w.bin", b"data", require={"Authorization": "Bearer right"})
    run = run_fetcher("--source", url, "--dest", str(tmp_path))
    assert run.code == 3
    assert "HTTP 401" in run.error and "--bearer-token-file" in run.error


@pytest.mark.fault(
    "a retry answered whole (200, Range ignored) by another version: never stitched", exit=3, area="protocol"
)
def test_a_retry_answered_whole_by_another_version_is_not_stitched(origin: Origin, tmp_path: Path) -> None:
    # the origin ignores Range and If-Match, and the object was replaced in between
    url = origin.add(
        "/w.bin", b"A" * 200_000, cut_after=[50_000], etag='"v1"', ranges=False, then=(b"B" * 200_000, '"v2"')
    )
    run = run_fetcher("--source", url, "--dest", str(tmp_path))
    assert run.code == 3
    assert "changed during the download" in run.error
    assert tree(tmp_path) == {}


def test_a_redirect_loop_fails_at_once(origin: Origin, tmp_path: Path) -> None:
    url = origin.add("/loop", b"", redirect=origin.url("/loop"))
    run = run_fetcher("--source", url, "--dest", str(tmp_path))
    assert run.code == 3
    assert "TooManyRedirects" in run.error
    assert run.all("retrying") == []


def test_sigterm_during_a_retry_wait_stops_at_once_with_a_reason(origin: Origin, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    url = origin.add("/w.bin", b"x", fail=[503] * 10, retry_after="120")
    termination = tmp_path / "termination-log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FETCHER_")}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fetcher",
            "--source",
            url,
            "--dest",
            str(tmp_path / "d"),
            "--termination-log",
            str(termination),
            "--log-format",
            "json",
        ],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not origin.hits("/w.bin") and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # now in the 120 s Retry-After wait
    stopped_at = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 143
    assert time.monotonic() - stopped_at < 10
    assert "stopped by SIGTERM" in termination.read_text()
    assert '"exit_code": 143' in stderr.strip().splitlines()[-1]


def test_sigterm_in_the_second_of_two_artifacts_names_it_and_what_was_published(origin: Origin, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    first = origin.add("/a.bin", b"a")
    second = origin.add("/b.bin", b"b", fail=[503] * 10, retry_after="120")
    termination = tmp_path / "termination-log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FETCHER_")}
    args = [first, str(tmp_path / "a"), second, str(tmp_path / "b"), "--termination-log", str(termination)]
    process = subprocess.Popen(
        [sys.executable, "-m", "fetcher", *args], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 30
    while not origin.hits("/b.bin") and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=30)
    assert process.returncode == 143
    assert termination.read_text() == f"stopped by SIGTERM before {second} was published (1 of 2 artifacts done)\n"
    assert tree(tmp_path / "a") == {"a.bin": b"a"}


def test_https_from_a_private_ca_named_by_ssl_cert_file(tls_origin: Origin, tls: Tls, tmp_path: Path) -> None:
    files = model_files()
    body = make_tar(files, "gz")
    url = tls_origin.add("/sentiment.tar.gz", body)
    run = run_fetcher(
        "--source", url, "--dest", str(tmp_path), "--sha256", sha256(body), env={"SSL_CERT_FILE": str(tls.ca_file)}
    )
    assert run.code == 0, run.stderr
    assert tree(tmp_path) == files
    assert url.startswith("https://")


@pytest.mark.fault("an untrusted HTTPS certificate: exit 3 at once, naming the server", exit=3, area="network")
def test_an_untrusted_certificate_fails_at_once_with_a_hint(tls_origin: Origin, tmp_path: Path) -> None:
    url = tls_origin.add("/sentiment.tar.gz", b"never sent")
    run = run_fetcher("--source", url, "--dest", str(tmp_path))
    assert run.code == 3
    assert run.error.startswith(f"TLS certificate of {url} not trusted: ")
    assert run.error.endswith("(for a private CA, set SSL_CERT_FILE to its PEM bundle)")
    assert run.all("retrying") == []  # another try meets the same certificate
    assert tls_origin.requests == []
    assert tree(tmp_path) == {}

    public = certifi.where()  # set, but not to the CA that signed this server
    run = run_fetcher("--source", url, "--dest", str(tmp_path), env={"SSL_CERT_FILE": public})
    assert run.code == 3
    assert run.error.endswith(f"(trusting only the CAs in SSL_CERT_FILE={public})")


@pytest.mark.fault("a redirect across hosts and schemes to an untrusted server", exit=3, area="network")
def test_a_redirect_to_an_untrusted_server_names_that_server(
    origin: Origin, tls_origin: Origin, tmp_path: Path
) -> None:
    target = tls_origin.add("/m.bin", b"never sent")
    url = origin.add("/m.bin", b"", redirect=target)
    run = run_fetcher("--source", url, "--dest", str(tmp_path))
    assert run.code == 3
    assert run.error.startswith(f"TLS certificate of {target} not trusted: ")


def test_a_ca_bundle_that_cannot_be_loaded_is_a_usage_error(tls_origin: Origin, tmp_path: Path) -> None:
    url = tls_origin.add("/m.bin", b"never sent")
    run = run_fetcher("--source", url, "--dest", str(tmp_path), env={"SSL_CERT_FILE": "/etc/nonexistent-ca.pem"})
    assert run.code == 2
    assert run.error.startswith("cannot load CA certificates from SSL_CERT_FILE=/etc/nonexistent-ca.pem: ")
    assert "Traceback" not in run.stderr


def test_a_ca_bundle_that_cannot_load_is_a_usage_error_behind_a_proxy_too(origin: Origin, tmp_path: Path) -> None:
    env = {"SSL_CERT_FILE": "/etc/nonexistent-ca.pem", "HTTPS_PROXY": origin.url(""), "NO_PROXY": "", "no_proxy": ""}
    run = run_fetcher("--source", "https://models.invalid/m.bin", "--dest", str(tmp_path), env=env)
    assert run.code == 2, run.stderr
    assert run.error.startswith("cannot load CA certificates from SSL_CERT_FILE=/etc/nonexistent-ca.pem: ")
    assert "Traceback" not in run.stderr
    assert origin.requests == []


def test_an_https_body_that_ends_when_the_connection_closes_arrives_whole(
    tls_origin: Origin, tls: Tls, tmp_path: Path
) -> None:
    body = random.Random(5).randbytes(3_000_000)
    url = tls_origin.add("/w.bin", body, until_close=True, ranges=False)
    run = run_fetcher("--source", url, "--dest", str(tmp_path), env={"SSL_CERT_FILE": str(tls.ca_file)})
    assert run.code == 0, run.stderr
    assert tree(tmp_path) == {"w.bin": body}  # no --sha256: only the bytes themselves can tell


def test_a_proxy_from_the_environment_is_used(origin: Origin, tmp_path: Path) -> None:
    body = b"weights " * 4096
    origin.add("http://models.invalid/w.bin", body)  # a proxy is asked for the whole URL
    run = run_fetcher(
        "--source",
        "http://models.invalid/w.bin",
        "--dest",
        str(tmp_path),
        "--sha256",
        sha256(body),
        # CAs that cannot load are no concern of a plain-http fetch, proxy or not
        env={"HTTP_PROXY": origin.url(""), "NO_PROXY": "", "no_proxy": "", "SSL_CERT_FILE": "/etc/nonexistent-ca.pem"},
    )
    assert run.code == 0, run.stderr
    assert tree(tmp_path) == {"w.bin": body}
    assert len(origin.hits("http://models.invalid/w.bin")) == 1
