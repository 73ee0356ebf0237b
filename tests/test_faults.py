"""The general fault suite: a bad network, a lying server, S3's errors, a full or read-only disk, signals.

Every case checks the whole promise: the documented exit code; one line naming the cause; dest
holding exactly the old version (published by a healthy run first) or the new one; nothing
created beside dest; and a healthy run afterwards publishes the new version. FAULTS.md lists them.
"""

from __future__ import annotations

import contextlib
import random
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import S3, Origin, Run, Tls, needs, run_fetcher, sha256, small_volume, unavailable
from tests.faults_support import Background, Exchange, Promise, S3Error, S3Front, Scripted, version

OLD, OLD_FILES = version(1)
NEW, NEW_FILES = version(2)
PATH = "/m.tar.gz"
SPLIT = ("--part-size", "64Ki", "--concurrency", "4", "--split-below", "100G")


@pytest.fixture
def promise(tmp_path: Path) -> Promise:
    return Promise(tmp_path / "sandbox")


@pytest.fixture
def scripted() -> Iterator[Callable[..., Scripted]]:
    servers: list[Scripted] = []

    def start(script: Callable[[Exchange], None], port: int = 0) -> Scripted:
        servers.append(Scripted(script, port))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def fetch(url: str, promise: Promise, body: bytes, *extra: str, env: dict[str, str] | None = None) -> Run:
    return run_fetcher("--source", url, "--dest", str(promise.dest), "--sha256", sha256(body), *extra, env=env)


def seeded(url: str, promise: Promise, env: dict[str, str] | None = None) -> None:
    """dest holds the old version, published by a healthy run."""
    run = run_fetcher("--source", url, "--dest", str(promise.dest), "--sha256", sha256(OLD), env=env)
    assert run.code == 0, run.stderr
    promise.holds(OLD_FILES)
    promise.old = OLD_FILES


def healthy_again(url: str, promise: Promise, env: dict[str, str] | None = None) -> None:
    run = run_fetcher("--source", url, "--dest", str(promise.dest), "--sha256", sha256(NEW), env=env)
    assert run.code == 0, run.stderr
    promise.holds(NEW_FILES)


def update(url: str, promise: Promise, *extra: str, env: dict[str, str] | None = None) -> Run:
    return run_fetcher("--source", url, "--dest", str(promise.dest), "--sha256", sha256(NEW), *extra, env=env)


def serve_old(exchange: Exchange) -> None:
    exchange.serve(OLD, etag='"v1"')


def serve_new(exchange: Exchange) -> None:
    exchange.serve(NEW, etag='"v2"')


# --- network ------------------------------------------------------------------------


@pytest.mark.fault("connection refused: retried, then exit 3", exit=3, area="network")
def test_connection_refused(scripted: Callable[..., Scripted], promise: Promise) -> None:
    server = scripted(serve_old)
    url, port = server.url(PATH), server.port
    seeded(url, promise)
    server.close()  # nothing listens on that port now

    run = update(url, promise, "--retries", "1")

    promise.holds_old(run, 3, f"127.0.0.1:{port}")
    assert "Connect" in run.error or "refused" in run.error
    assert len(run.all("retrying")) == 1
    scripted(serve_new, port)
    healthy_again(url, promise)


def _reset_after(count: int, times: int) -> Callable[[Exchange], None]:
    """Answer honestly, except that the first ``times`` answers are reset after ``count`` bytes."""

    def script(exchange: Exchange) -> None:
        if exchange.number >= times:
            return serve_new(exchange)
        first = exchange.range[0] if exchange.range else 0
        part = NEW[first:]
        exchange.head(206 if first else 200, _headers(len(part), first))
        exchange.write(part[:count])
        exchange.reset()

    return script


def _headers(length: int, first: int = 0, etag: str = '"v2"') -> dict[str, str]:
    headers = {"Content-Length": str(length), "ETag": etag, "Accept-Ranges": "bytes"}
    if first:
        headers["Content-Range"] = f"bytes {first}-{len(NEW) - 1}/{len(NEW)}"
    return headers


@pytest.mark.fault("connection reset (RST) mid-body on every attempt: exit 3", exit=3, area="network")
def test_a_reset_mid_body_every_time(scripted: Callable[..., Scripted], promise: Promise) -> None:
    server = scripted(serve_old)
    seeded(server.url(PATH), promise)
    server.script = _reset_after(0, times=1_000)
    # each attempt gets no further: the retry budget runs out
    run = update(server.url(PATH), promise, "--retries", "2")
    promise.holds_old(run, 3, server.url(PATH))
    assert len(run.all("retrying")) == 2
    server.script = serve_new
    healthy_again(server.url(PATH), promise)


@pytest.mark.fault("connection reset (RST) mid-body once: resumed with a Range, exit 0", exit=0, area="network")
def test_a_reset_mid_body_is_resumed(scripted: Callable[..., Scripted], promise: Promise) -> None:
    server = scripted(serve_old)
    seeded(server.url(PATH), promise)
    server.script = _reset_after(200_000, times=1)
    run = update(server.url(PATH), promise)
    assert run.code == 0, run.stderr
    promise.holds(NEW_FILES)
    assert run.event("retrying")["resume_at"] > 0
    assert server.requests[-1].headers["Range"].startswith("bytes=")


@pytest.mark.fault("a server that goes silent mid-body past --timeout: retried, then exit 3", exit=3, area="network")
def test_a_stall_past_the_timeout(scripted: Callable[..., Scripted], promise: Promise) -> None:
    server = scripted(serve_old)
    seeded(server.url(PATH), promise)
    release = threading.Event()

    def stall(exchange: Exchange) -> None:
        exchange.head(200, _headers(len(NEW)))
        exchange.write(NEW[:100_000])
        release.wait(60)  # silent, connection open

    server.script = stall
    try:
        run = update(server.url(PATH), promise, "--timeout", "0.5", "--retries", "1")
    finally:
        release.set()
    promise.holds_old(run, 3, ("timed out", "timeout"))
    assert server.url(PATH) in run.error
    server.script = serve_new
    healthy_again(server.url(PATH), promise)


def _short(exchange: Exchange) -> None:
    """Announce the whole rest, send all but its last 1000 bytes, end the connection cleanly."""
    first = exchange.range[0] if exchange.range else 0
    part = NEW[first:]
    exchange.head(206 if first else 200, _headers(len(part), first))
    exchange.write(part[: max(0, len(part) - 1000)])
    exchange.close()


@pytest.mark.fault("short body (fewer bytes than Content-Length) every time: exit 3", exit=3, area="network")
def test_a_short_body_every_time(scripted: Callable[..., Scripted], promise: Promise) -> None:
    server = scripted(serve_old)
    seeded(server.url(PATH), promise)
    server.script = _short
    run = update(server.url(PATH), promise, "--retries", "2")
    promise.holds_old(run, 3, ("ended early", "incomplete", "closed"))
    assert server.url(PATH) in run.error
    server.script = serve_new
    healthy_again(server.url(PATH), promise)


@pytest.mark.fault("short body once: the rest is fetched with a Range, exit 0", exit=0, area="network")
def test_a_short_body_once_is_resumed(scripted: Callable[..., Scripted], promise: Promise) -> None:
    server = scripted(serve_old)
    seeded(server.url(PATH), promise)
    server.script = lambda exchange: _short(exchange) if exchange.number == 0 else serve_new(exchange)
    run = update(server.url(PATH), promise)
    assert run.code == 0, run.stderr
    promise.holds(NEW_FILES)
    assert server.requests[-1].headers["Range"] == f"bytes={len(NEW) - 1000}-"


@pytest.mark.fault("long body (more bytes than its Content-Length): exit 4, never published", exit=4, area="network")
def test_a_long_body(scripted: Callable[..., Scripted], promise: Promise) -> None:
    server = scripted(serve_old)
    seeded(server.url(PATH), promise)

    def long(exchange: Exchange) -> None:
        exchange.head(200, _headers(len(NEW) - 5000))
        exchange.write(NEW)
        exchange.close()

    server.script = long
    run = update(server.url(PATH), promise)
    promise.holds_old(run, 4, "sha256")
    server.script = serve_new
    healthy_again(server.url(PATH), promise)


@pytest.mark.fault("206 that sends more than its Content-Range announced: exit 4", exit=4, area="network")
def test_a_range_longer_than_announced(scripted: Callable[..., Scripted], promise: Promise) -> None:
    server = scripted(serve_old)
    seeded(server.url(PATH), promise)

    def script(exchange: Exchange) -> None:
        if exchange.number == 0:  # cut, so that the rest is asked for with a Range
            exchange.head(200, _headers(len(NEW)))
            exchange.write(NEW[:100_000])
            return exchange.reset()
        first = exchange.range[0] if exchange.range else 0
        exchange.head(206, _headers(len(NEW) - first + 3000, first))  # the total says len(NEW)
        exchange.write(NEW[first:] + bytes(3000))
        exchange.close()

    server.script = script
    run = update(server.url(PATH), promise)
    promise.holds_old(run, 4, ("more than its announced", "sha256"))
    server.script = serve_new
    healthy_again(server.url(PATH), promise)


@pytest.mark.fault("redirect http -> https on another port (trusted CA): exit 0", exit=0, area="network")
def test_a_redirect_to_https(origin: Origin, tls_origin: Origin, tls: Tls, promise: Promise) -> None:
    env = {"SSL_CERT_FILE": str(tls.ca_file)}
    url = origin.add(PATH, OLD, etag='"v1"')
    seeded(url, promise, env)
    origin.add(PATH, b"", redirect=tls_origin.add("/elsewhere/m.tar.gz", NEW, etag='"v2"'))
    run = update(url, promise, env=env)
    assert run.code == 0, run.stderr
    promise.holds(NEW_FILES)
    assert len(tls_origin.hits("/elsewhere/m.tar.gz")) == 1


@pytest.mark.fault(
    "redirect to another loopback port whose server cuts the body: resumed there", exit=0, area="network"
)
def test_a_redirect_to_another_port_resumes_at_the_target(origin: Origin, promise: Promise) -> None:
    other = Origin()
    try:
        url = origin.add(PATH, OLD, etag='"v1"')
        seeded(url, promise)
        origin.add(PATH, b"", redirect=other.add("/m2.tar.gz", NEW, etag='"v2"', cut_after=[150_000]))
        run = update(url, promise)
        assert run.code == 0, run.stderr
        promise.holds(NEW_FILES)
        assert other.hits("/m2.tar.gz")[-1].headers.get("Range") == "bytes=150000-"
    finally:
        other.close()


@pytest.mark.fault("redirect to a port where nothing listens: exit 3 naming that server", exit=3, area="network")
def test_a_redirect_to_a_dead_port(origin: Origin, promise: Promise) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    url = origin.add(PATH, OLD, etag='"v1"')
    seeded(url, promise)
    origin.add(PATH, b"", redirect=f"http://127.0.0.1:{dead}/gone.tar.gz")
    run = update(url, promise, "--retries", "1")
    promise.holds_old(run, 3, ("connection", "Connect"))
    origin.add(PATH, NEW, etag='"v2"')
    healthy_again(url, promise)


# --- protocol ------------------------------------------------------------------------


@pytest.mark.fault("Range ignored on a resume (200, the whole body): its head skipped, exit 0", exit=0, area="protocol")
def test_an_ignored_range(origin: Origin, promise: Promise) -> None:
    url = origin.add(PATH, OLD, etag='"v1"')
    seeded(url, promise)
    origin.add(PATH, NEW, etag='"v2"', ranges=False, cut_after=[150_000])
    run = update(url, promise)
    assert run.code == 0, run.stderr
    promise.holds(NEW_FILES)
    assert len(origin.hits(PATH)) == 3  # the seed, the cut one, the whole one again


def _resume_with(answer: Callable[[Exchange], None]) -> Callable[[Exchange], None]:
    """A first answer cut after 100 kB, then ``answer`` for the resume."""

    def script(exchange: Exchange) -> None:
        if exchange.number == 0:
            exchange.head(200, _headers(len(NEW)))
            exchange.write(NEW[:100_000])
            return exchange.reset()
        answer(exchange)

    return script


def _later_range(exchange: Exchange) -> None:
    first = (exchange.range or (0, None))[0] + 4096
    exchange.head(206, _headers(len(NEW) - first, first))
    exchange.write(NEW[first:])


def _other_total(exchange: Exchange) -> None:
    first = (exchange.range or (0, None))[0]
    headers = _headers(len(NEW) - first, first) | {"Content-Range": f"bytes {first}-{len(NEW) - 1}/{len(NEW) + 1}"}
    exchange.head(206, headers)
    exchange.write(NEW[first:])


def _no_content_range(exchange: Exchange) -> None:
    first = (exchange.range or (0, None))[0]
    exchange.head(206, _headers(len(NEW) - first))
    exchange.write(NEW[first:])


def _other_etag(exchange: Exchange) -> None:
    first = (exchange.range or (0, None))[0]
    exchange.head(206, _headers(len(NEW) - first, first, etag='"v3"'))
    exchange.write(NEW[first:])


@pytest.mark.parametrize(
    ("answer", "cause"),
    [
        pytest.param(
            _later_range,
            "not 100000 as asked",
            marks=pytest.mark.fault("a resume answered from a later byte than asked: exit 3", exit=3, area="protocol"),
            id="later-start",
        ),
        pytest.param(
            _other_total,
            "changed during the download",
            marks=pytest.mark.fault("a resume whose Content-Range gives another size: exit 3", exit=3, area="protocol"),
            id="other-size",
        ),
        pytest.param(
            _no_content_range,
            "Content-Range",
            marks=pytest.mark.fault("a 206 without Content-Range: exit 3", exit=3, area="protocol"),
            id="no-content-range",
        ),
        pytest.param(
            _other_etag,
            "changed during the download",
            marks=pytest.mark.fault("a resume answered with another ETag: exit 3", exit=3, area="protocol"),
            id="other-etag",
        ),
    ],
)
def test_a_wrong_answer_to_a_resume(
    scripted: Callable[..., Scripted], promise: Promise, answer: Callable[[Exchange], None], cause: str
) -> None:
    server = scripted(serve_old)
    seeded(server.url(PATH), promise)
    server.script = _resume_with(answer)
    run = update(server.url(PATH), promise)
    promise.holds_old(run, 3, cause)
    assert server.url(PATH) in run.error
    server.script = serve_new
    healthy_again(server.url(PATH), promise)


@pytest.mark.fault("the ETag changes between parallel parts: exit 3, never stitched", exit=3, area="protocol")
def test_an_etag_that_changes_between_parts(origin: Origin, promise: Promise) -> None:
    url = origin.add(PATH, OLD, etag='"v1"')
    seeded(url, promise)
    origin.add(PATH, NEW, etag='"v2"', rate=2_000_000, then=(version(3)[0], '"v3"'))
    run = update(url, promise, *SPLIT)
    promise.holds_old(run, 3, "changed during the download")
    origin.add(PATH, NEW, etag='"v2"')
    healthy_again(url, promise)


@pytest.mark.fault("an HTML error page with 200: exit 3, naming the Content-Type", exit=3, area="protocol")
def test_an_html_page_with_200(origin: Origin, promise: Promise) -> None:
    url = origin.add(PATH, OLD, etag='"v1"')
    seeded(url, promise)
    origin.add(PATH, b"<html><body>Sign in</body></html>", content_type="text/html; charset=utf-8")
    run = update(url, promise)
    promise.holds_old(run, 3, "text/html")
    assert run.all("retrying") == []
    origin.add(PATH, NEW, etag='"v2"')
    healthy_again(url, promise)


@pytest.mark.fault("a parallel part cut mid-body is retried and the download completes", exit=0, area="protocol")
def test_a_part_retried_then_succeeding(origin: Origin, promise: Promise) -> None:
    url = origin.add(PATH, OLD, etag='"v1"')
    seeded(url, promise)
    # the first answer is whole (fetcher reads one part of it), the first ranged one is cut
    origin.add(PATH, NEW, etag='"v2"', rate=2_000_000, cut_after=[len(NEW), 10_000])
    run = update(url, promise, *SPLIT)
    assert run.code == 0, run.stderr
    promise.holds(NEW_FILES)
    assert run.event("published")["transfer"] == "parallel"
    assert run.all("retrying"), "no part was retried"


# --- S3 --------------------------------------------------------------------------------


def _bucket(s3: S3, request: pytest.FixtureRequest, versioned: bool = False) -> str:
    name = "f-" + "".join(c for c in request.node.name.lower() if c.isalnum())[-40:]
    with contextlib.suppress(s3.client.exceptions.BucketAlreadyOwnedByYou):
        s3.client.create_bucket(Bucket=name)
    if versioned:
        s3.client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


@pytest.mark.parametrize(
    ("status", "code", "cause"),
    [
        pytest.param(
            403,
            "AccessDenied",
            "refused access",
            marks=pytest.mark.fault("S3 AccessDenied: exit 3 at once", exit=3, area="s3"),
            id="AccessDenied",
        ),
        pytest.param(
            403,
            "InvalidAccessKeyId",
            "InvalidAccessKeyId",
            marks=pytest.mark.fault("S3 bad credentials (InvalidAccessKeyId): exit 3 at once", exit=3, area="s3"),
            id="InvalidAccessKeyId",
        ),
        pytest.param(
            403,
            "SignatureDoesNotMatch",
            "SignatureDoesNotMatch",
            marks=pytest.mark.fault("S3 bad secret (SignatureDoesNotMatch): exit 3 at once", exit=3, area="s3"),
            id="SignatureDoesNotMatch",
        ),
        pytest.param(
            400,
            "ExpiredToken",
            "ExpiredToken",
            marks=pytest.mark.fault("S3 ExpiredToken (stale session credentials): exit 3 at once", exit=3, area="s3"),
            id="ExpiredToken",
        ),
        pytest.param(
            400,
            "InvalidRequest",
            "InvalidRequest",
            marks=pytest.mark.fault("S3 error that is no one's fault in particular: exit 3 at once", exit=3, area="s3"),
            id="InvalidRequest",
        ),
    ],
)
def test_s3_refusals(
    s3: S3,
    s3_front: S3Front,
    promise: Promise,
    request: pytest.FixtureRequest,
    status: int,
    code: str,
    cause: str,
) -> None:
    env = s3_front.env
    bucket = _bucket(s3, request)
    source = s3.put(bucket, "m.tar.gz", OLD)
    seeded(source, promise, env)
    s3.put(bucket, "m.tar.gz", NEW)
    s3_front.errors.append(S3Error(status, code))

    run = update(source, promise, env=env)

    promise.holds_old(run, 3, cause)
    assert source in run.error
    assert run.all("retrying") == []
    assert env["AWS_SECRET_ACCESS_KEY"] not in run.stderr
    s3_front.errors.clear()
    healthy_again(source, promise, env)


@pytest.mark.parametrize(
    "missing",
    [
        pytest.param(
            "key",
            marks=pytest.mark.fault("S3 NoSuchKey: exit 3 at once", exit=3, area="s3"),
        ),
        pytest.param(
            "bucket",
            marks=pytest.mark.fault("S3 NoSuchBucket: exit 3 at once", exit=3, area="s3"),
        ),
    ],
)
def test_s3_missing(s3: S3, promise: Promise, request: pytest.FixtureRequest, missing: str) -> None:
    bucket = _bucket(s3, request)
    source = s3.put(bucket, "m.tar.gz", OLD)
    seeded(source, promise, s3.env)
    s3.client.delete_object(Bucket=bucket, Key="m.tar.gz")
    if missing == "bucket":
        s3.client.delete_bucket(Bucket=bucket)

    run = update(source, promise, env=s3.env)

    promise.holds_old(run, 3, "NoSuchKey" if missing == "key" else "NoSuchBucket")
    assert source in run.error
    assert run.all("retrying") == []
    s3.put(bucket, "m.tar.gz", NEW)
    healthy_again(source, promise, s3.env)


@pytest.mark.parametrize(
    ("error", "retries"),
    [
        pytest.param(
            S3Error(503, "SlowDown", times=2),
            2,
            marks=pytest.mark.fault("S3 SlowDown twice: retried, then exit 0", exit=0, area="s3"),
            id="SlowDown",
        ),
        pytest.param(
            S3Error(500, "InternalError", times=1),
            1,
            marks=pytest.mark.fault("S3 InternalError once: retried, then exit 0", exit=0, area="s3"),
            id="InternalError",
        ),
        pytest.param(
            S3Error(503, "ServiceUnavailable", times=1),
            1,
            marks=pytest.mark.fault("S3 503 ServiceUnavailable once: retried, then exit 0", exit=0, area="s3"),
            id="ServiceUnavailable",
        ),
    ],
)
def test_s3_throttling_is_retried(
    s3: S3,
    s3_front: S3Front,
    promise: Promise,
    request: pytest.FixtureRequest,
    error: S3Error,
    retries: int,
) -> None:
    env = s3_front.env
    bucket = _bucket(s3, request)
    source = s3.put(bucket, "m.tar.gz", OLD)
    seeded(source, promise, env)
    s3.put(bucket, "m.tar.gz", NEW)
    s3_front.errors.append(error)

    run = update(source, promise, env=env)

    assert run.code == 0, run.stderr
    promise.holds(NEW_FILES)
    retried = run.all("retrying")
    assert len(retried) == retries
    assert all(error.code in r["reason"] for r in retried)


@pytest.mark.fault("S3 connection closed mid-body: resumed with a Range, exit 0", exit=0, area="s3")
def test_s3_reset_mid_body_is_resumed(
    s3: S3, s3_front: S3Front, promise: Promise, request: pytest.FixtureRequest
) -> None:
    env = s3_front.env
    bucket = _bucket(s3, request)
    source = s3.put(bucket, "m.tar.gz", OLD)
    seeded(source, promise, env)
    s3.put(bucket, "m.tar.gz", NEW)
    s3_front.cuts.append(150_000)
    first = len(s3_front.gets())
    run = update(source, promise, env=env)
    assert run.code == 0, run.stderr
    promise.holds(NEW_FILES)
    assert run.event("retrying")["resume_at"] > 0
    assert s3_front.gets()[first + 1].headers.get("Range", "").startswith("bytes=")


@pytest.mark.fault("S3 with no credentials at all: exit 3 at once, naming the ways to give them", exit=3, area="s3")
def test_s3_without_credentials(s3: S3, promise: Promise, request: pytest.FixtureRequest) -> None:
    bucket = _bucket(s3, request)
    source = s3.put(bucket, "m.tar.gz", OLD)
    seeded(source, promise, s3.env)
    s3.put(bucket, "m.tar.gz", NEW)
    anonymous = {k: v for k, v in s3.env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    run = update(source, promise, env=anonymous)
    promise.holds_old(run, 3, "AWS_ACCESS_KEY_ID")
    assert source in run.error
    assert run.all("retrying") == []
    healthy_again(source, promise, s3.env)


@pytest.mark.fault("S3 SlowDown on every request: retried, then exit 3 naming SlowDown", exit=3, area="s3")
def test_s3_throttling_that_never_ends(
    s3: S3, s3_front: S3Front, promise: Promise, request: pytest.FixtureRequest
) -> None:
    env = s3_front.env
    bucket = _bucket(s3, request)
    source = s3.put(bucket, "m.tar.gz", OLD)
    seeded(source, promise, env)
    s3.put(bucket, "m.tar.gz", NEW)
    s3_front.errors.append(S3Error(503, "SlowDown"))
    run = update(source, promise, "--retries", "2", env=env)
    promise.holds_old(run, 3, "SlowDown")
    assert len(run.all("retrying")) == 2
    s3_front.errors.clear()
    healthy_again(source, promise, env)


@pytest.mark.fault("S3 object overwritten between parts, unversioned bucket: exit 3, never stitched", exit=3, area="s3")
def test_s3_object_overwritten_between_parts(
    s3: S3, s3_front: S3Front, promise: Promise, request: pytest.FixtureRequest
) -> None:
    env = s3_front.env
    bucket = _bucket(s3, request)
    source = s3.put(bucket, "m.tar.gz", OLD)
    seeded(source, promise, env)
    s3.put(bucket, "m.tar.gz", NEW)
    s3_front.after_get = lambda: s3.put(bucket, "m.tar.gz", version(3)[0])
    run = update(source, promise, *SPLIT, env=env)
    promise.holds_old(run, 3, "changed during the download")
    assert all("If-Match" in r.headers for r in s3_front.gets()[2:])  # the seed's and the first are not pinned
    s3.put(bucket, "m.tar.gz", NEW)
    healthy_again(source, promise, env)


@pytest.mark.fault(
    "S3 object overwritten between parts, versioned bucket: the parts stay on the VersionId, exit 0",
    exit=0,
    area="s3",
)
def test_s3_parts_are_pinned_to_the_version(
    s3: S3, s3_front: S3Front, promise: Promise, request: pytest.FixtureRequest
) -> None:
    env = s3_front.env
    bucket = _bucket(s3, request, versioned=True)
    source = s3.put(bucket, "m.tar.gz", OLD)
    seeded(source, promise, env)
    s3.put(bucket, "m.tar.gz", NEW)
    s3_front.after_get = lambda: s3.put(bucket, "m.tar.gz", version(3)[0])
    first = len(s3_front.gets())
    run = update(source, promise, *SPLIT, env=env)
    assert run.code == 0, run.stderr
    promise.holds(NEW_FILES)
    assert run.event("published")["transfer"] == "parallel"
    parts = s3_front.gets()[first + 1 :]
    assert parts and all("versionId=" in r.path for r in parts)


@pytest.mark.fault("S3 version deleted between parts, versioned bucket: exit 3, never stitched", exit=3, area="s3")
def test_s3_version_deleted_between_parts(
    s3: S3, s3_front: S3Front, promise: Promise, request: pytest.FixtureRequest
) -> None:
    env = s3_front.env
    bucket = _bucket(s3, request, versioned=True)
    source = s3.put(bucket, "m.tar.gz", OLD)
    seeded(source, promise, env)
    new_version = s3.client.put_object(Bucket=bucket, Key="m.tar.gz", Body=NEW)["VersionId"]

    def replace() -> None:
        s3.client.delete_object(Bucket=bucket, Key="m.tar.gz", VersionId=new_version)
        s3.put(bucket, "m.tar.gz", version(3)[0])

    s3_front.after_get = replace
    run = update(source, promise, *SPLIT, env=env)
    promise.holds_old(run, 3, source)
    assert run.error == f"{source} changed during the download"  # the pinned version is gone, not the object
    s3.put(bucket, "m.tar.gz", NEW)
    healthy_again(source, promise, env)


# --- disk ---------------------------------------------------------------------------------


@pytest.mark.fault("ENOSPC: a volume too small for the new version: exit 6, old version kept", exit=6, area="disk")
def test_no_space_left(origin: Origin, promise: Promise) -> None:
    big, big_files = version(2, size=3 * 1024 * 1024)
    with small_volume(promise.dest, "2m"):
        url = origin.add(PATH, OLD, etag='"v1"')
        seeded(url, promise)
        origin.add(PATH, big, etag='"v2"')
        run = fetch(url, promise, big)
        promise.holds_old(run, 6, "No space left on device")
        subprocess.run(["mount", "-o", "remount,size=16m", str(promise.dest)], check=True)
        again = fetch(url, promise, big)
        assert again.code == 0, again.stderr
        promise.holds(big_files)


@pytest.mark.fault("read-only dest volume: exit 6, old version kept", exit=6, area="disk")
def test_a_read_only_dest(origin: Origin, promise: Promise) -> None:
    with small_volume(promise.dest, "16m"):
        url = origin.add(PATH, OLD, etag='"v1"')
        seeded(url, promise)
        origin.add(PATH, NEW, etag='"v2"')
        subprocess.run(["mount", "-o", "remount,ro", str(promise.dest)], check=True)
        try:
            run = update(url, promise)
            promise.holds_old(run, 6, ("Read-only file system", str(promise.dest)))
            assert "Read-only" in run.error
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(promise.dest)], check=True)
        healthy_again(url, promise)


@needs("setpriv")
@pytest.mark.fault("dest owned by another user, capabilities dropped: exit 6, old version kept", exit=6, area="disk")
def test_an_unwritable_dest(origin: Origin, promise: Promise) -> None:
    url = origin.add(PATH, OLD, etag='"v1"')
    seeded(url, promise)
    origin.add(PATH, NEW, etag='"v2"')
    subprocess.run(["chown", "-R", "4321:4321", str(promise.dest)], check=True)
    run = run_fetcher("--source", url, "--dest", str(promise.dest), "--sha256", sha256(NEW), capabilities=False)
    promise.holds_old(run, 6, "Permission denied")
    assert str(promise.dest) in run.error
    subprocess.run(["chown", "-R", "0:0", str(promise.dest)], check=True)
    healthy_again(url, promise)


# --- process ----------------------------------------------------------------------------

_INSTANTS = random.Random(20261202)


@pytest.mark.parametrize(
    ("sig", "code", "delay"),
    [
        *(
            pytest.param(
                signal.SIGTERM,
                143,
                _INSTANTS.uniform(0, 1.5),
                marks=pytest.mark.fault(f"SIGTERM at a random instant of a download (#{i})", exit=143, area="process"),
                id=f"SIGTERM-{i}",
            )
            for i in range(3)
        ),
        *(
            pytest.param(
                signal.SIGINT,
                130,
                _INSTANTS.uniform(0, 1.5),
                marks=pytest.mark.fault(f"SIGINT at a random instant of a download (#{i})", exit=130, area="process"),
                id=f"SIGINT-{i}",
            )
            for i in range(2)
        ),
    ],
)
def test_a_signal_during_a_download(
    origin: Origin, promise: Promise, sig: signal.Signals, code: int, delay: float
) -> None:
    url = origin.add(PATH, OLD, etag='"v1"')
    seeded(url, promise)
    origin.add(PATH, NEW, etag='"v2"', rate=250_000)  # ~2.5 s: the signal comes mid-way
    running = Background("--source", url, "--dest", str(promise.dest), "--sha256", sha256(NEW))
    running.wait_for("downloading")
    threading.Event().wait(delay)
    running.process.send_signal(sig)
    run = running.finish()
    name = "SIGTERM" if sig == signal.SIGTERM else "SIGINT"
    promise.holds_old(run, code, name)
    origin.add(PATH, NEW, etag='"v2"')
    healthy_again(url, promise)


@pytest.mark.fault("kill -9 during a download, then a healthy run: exit 0, new version", exit=0, area="process")
def test_kill_9_during_a_download(origin: Origin, promise: Promise) -> None:
    url = origin.add(PATH, OLD, etag='"v1"')
    seeded(url, promise)
    origin.add(PATH, NEW, etag='"v2"', rate=250_000)
    running = Background("--source", url, "--dest", str(promise.dest), "--sha256", sha256(NEW))
    running.wait_for("downloading")
    threading.Event().wait(_INSTANTS.uniform(0.1, 1.5))
    running.process.kill()
    assert running.finish().code == -signal.SIGKILL
    promise.holds(OLD_FILES)
    origin.add(PATH, NEW, etag='"v2"')
    healthy_again(url, promise)


@pytest.mark.fault("two fetchers on one dest at once: both exit 0, dest holds the new version", exit=0, area="process")
def test_two_fetchers_on_one_dest(origin: Origin, promise: Promise) -> None:
    url = origin.add(PATH, OLD, etag='"v1"')
    seeded(url, promise)
    origin.add(PATH, NEW, etag='"v2"', rate=1_000_000)
    args = ("--source", url, "--dest", str(promise.dest), "--sha256", sha256(NEW))
    first = Background(*args)
    first.wait_for("downloading")  # the second starts while the first holds the lock: they overlap
    second = Background(*args)
    one, two = first.finish(), second.finish()
    assert (one.code, two.code) == (0, 0), one.stderr + two.stderr
    promise.holds(NEW_FILES)
    assert len(one.all("already present")) + len(two.all("already present")) <= 1


@needs("setpriv")
@pytest.mark.fault("a file:// source that cannot be read (Permission denied): exit 3 naming it", exit=3, area="disk")
def test_an_unreadable_file_source(promise: Promise, tmp_path: Path) -> None:
    model = tmp_path / "models" / "m.tar.gz"
    model.parent.mkdir()
    model.write_bytes(OLD)
    seeded(model.as_uri(), promise)
    model.write_bytes(NEW)
    subprocess.run(["chown", "4321:4321", str(model)], check=True)
    model.chmod(0o600)
    run = run_fetcher(
        "--source", model.as_uri(), "--dest", str(promise.dest), "--sha256", sha256(NEW), capabilities=False
    )
    promise.holds_old(run, 3, "Permission denied")
    assert str(model) in run.error
    model.chmod(0o644)
    healthy_again(model.as_uri(), promise)


@contextlib.contextmanager
def overlay_on_ramfs(layers: Path, mountpoint: Path) -> Iterator[Path]:
    """An overlay whose upper layer is a ramfs: O_DIRECT is accepted by fcntl, then every direct write is EINVAL."""
    layers.mkdir()
    mountpoint.mkdir()
    mounted: list[Path] = []
    try:
        upper = layers / "upper"
        upper.mkdir()
        if subprocess.run(["mount", "-t", "ramfs", "ramfs", str(upper)], capture_output=True).returncode != 0:
            unavailable("cannot mount a ramfs here")
        mounted.append(upper)
        for name in ("lower", "upper/data", "upper/work"):
            (layers / name).mkdir()
        options = f"lowerdir={layers / 'lower'},upperdir={upper / 'data'},workdir={upper / 'work'}"
        overlay = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(mountpoint)], capture_output=True
        )
        if overlay.returncode != 0:
            unavailable(f"cannot mount an overlay here: {overlay.stderr.decode().strip()}")
        mounted.append(mountpoint)
        yield mountpoint
    finally:
        for path in reversed(mounted):
            subprocess.run(["umount", str(path)], check=False)


@pytest.mark.fault("O_DIRECT accepted by fcntl, refused at the first write: written buffered", exit=0, area="disk")
def test_o_direct_refused_at_write_time(origin: Origin, promise: Promise, tmp_path: Path) -> None:
    # A plain file: on this overlay (no xattrs in its upper layer) a directory cannot be renamed (EXDEV).
    old = random.Random(1).randbytes(100_000)
    new = random.Random(2).randbytes(20 * 1024 * 1024 + 123)  # past diskwrite.DIRECT_AFTER, not block-aligned
    with overlay_on_ramfs(tmp_path / "layers", promise.dest):
        url = origin.add("/w.bin", old, etag='"v1"')
        assert fetch(url, promise, old).code == 0
        promise.holds({"w.bin": old})
        origin.add("/w.bin", new, etag='"v2"')
        run = fetch(url, promise, new)
        assert run.code == 0, run.stderr
        promise.holds({"w.bin": new})
