"""Network and protocol faults: a cut transfer of an object that changed, a trickle.

Every case checks the whole promise: the exit code, a one-line reason, and dest
holding the old version or the new one, never two versions stitched together.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest

from tests.conftest import Origin, make_tar, run_fetcher, sha256, tree

OLD = b"A" * 200_000
NEW = b"B" * 200_000
LM1 = "Wed, 01 Jan 2025 00:00:00 GMT"
LM2 = "Thu, 02 Jan 2025 00:00:00 GMT"
FUTURE = "Fri, 01 Jan 2100 00:00:00 GMT"  # not one second before the response's Date: a weak validator


def _changed_mid_transfer(origin: Origin, **pin: object) -> str:
    """An object re-uploaded while the first response was being sent, which was then cut."""
    return origin.add("/w.bin", OLD, cut_after=[50_000], then=(NEW, pin.pop("then_etag", None)), **pin)


CHANGED = [
    pytest.param(
        {"etag": '"v1"', "then_etag": '"v2"'},
        {"If-Match": '"v1"'},
        marks=pytest.mark.fault(
            "a cut transfer resumed with If-Match, the object changed (strong ETag)", exit=3, area="protocol"
        ),
        id="strong-etag",
    ),
    pytest.param(
        {"etag": 'W/"v1"', "then_etag": 'W/"v2"', "last_modified": LM1, "then_modified": LM2},
        {"If-Unmodified-Since": LM1},
        marks=pytest.mark.fault(
            "a cut transfer resumed with If-Unmodified-Since, the object changed (weak ETag, Last-Modified)",
            exit=3,
            area="protocol",
        ),
        id="weak-etag-and-last-modified",
    ),
    pytest.param(
        {"last_modified": LM1, "then_modified": LM2},
        {"If-Unmodified-Since": LM1},
        marks=pytest.mark.fault(
            "a cut transfer resumed with If-Unmodified-Since, the object changed (Last-Modified only)",
            exit=3,
            area="protocol",
        ),
        id="last-modified",
    ),
    pytest.param(
        {"etag": 'W/"v1"', "then_etag": 'W/"v2"', "last_modified": LM1, "then_modified": LM2, "conditionals": False},
        {"If-Unmodified-Since": LM1},
        marks=pytest.mark.fault(
            "a cut transfer resumed from a server that ignores preconditions, the object changed",
            exit=3,
            area="protocol",
        ),
        id="preconditions-ignored",
    ),
    pytest.param(
        {"etag": 'W/"v1"', "then_etag": 'W/"v2"'},
        {},
        marks=pytest.mark.fault(
            "a cut transfer of an object with only a weak ETag, the object changed: re-read from 0, refused",
            exit=3,
            area="protocol",
        ),
        id="weak-etag-only",
    ),
    pytest.param(
        {},
        {},
        marks=pytest.mark.fault(
            "a cut transfer of an object with no validator, the object changed: re-read from 0, refused",
            exit=3,
            area="protocol",
        ),
        id="no-validator",
    ),
    pytest.param(
        {"last_modified": FUTURE, "then_modified": FUTURE},
        {},
        marks=pytest.mark.fault(
            "a cut transfer of an object whose Last-Modified is not before its Date (weak), the object changed",
            exit=3,
            area="protocol",
        ),
        id="weak-last-modified",
    ),
]


@pytest.mark.parametrize(("pin", "sent"), CHANGED)
def test_an_object_changed_during_a_cut_transfer_is_never_stitched(
    origin: Origin, tmp_path: Path, pin: dict[str, object], sent: dict[str, str]
) -> None:
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "w.bin").write_bytes(b"the old version")  # published by hand: fetcher must not touch it
    url = _changed_mid_transfer(origin, **pin)

    run = run_fetcher("--source", url, "--dest", str(dest), "--filename", "w.bin")

    assert run.code == 3, run.stderr
    assert "changed during the download" in run.error and "\n" not in run.error
    assert (dest / "w.bin").read_bytes() == b"the old version"
    assert sorted(p.name for p in dest.iterdir()) == ["w.bin"]  # nothing new, not even .fetcher/
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    second = origin.hits("/w.bin")[1].headers
    for name, value in sent.items():
        assert second[name] == value
    if sent:  # pinned: a resume
        assert second["Range"] == "bytes=50000-"
    else:  # nothing to pin a resume to: from the start again, the bytes already passed on compared
        assert "Range" not in second and "If-Match" not in second and "If-Unmodified-Since" not in second
    if "etag" in pin and str(pin["etag"]).startswith("W/"):
        assert "If-Match" not in second


@pytest.mark.parametrize(
    "pin",
    [
        pytest.param({"etag": 'W/"v1"'}, id="weak-etag-only"),
        pytest.param({}, id="no-validator"),
        pytest.param({"last_modified": LM1}, id="last-modified"),
    ],
)
@pytest.mark.fault("a cut transfer of an unchanged object without a strong ETag completes", exit=0, area="protocol")
def test_a_cut_transfer_of_an_unchanged_object_completes_with_any_validator(
    origin: Origin, tmp_path: Path, pin: dict[str, str]
) -> None:
    body = random.Random(3).randbytes(300_000)
    url = origin.add("/w.bin", body, cut_after=[100_000], **pin)  # type: ignore[arg-type]
    run = run_fetcher("--source", url, "--dest", str(tmp_path))
    assert run.code == 0, run.stderr
    assert tree(tmp_path) == {"w.bin": body}
    assert len(run.all("retrying")) == 1
    second = origin.hits("/w.bin")[1].headers
    assert ("Range" in second) == ("last_modified" in pin)


def test_a_transfer_cut_again_and_again_with_progress_waits_the_first_delay_each_time(
    origin: Origin, tmp_path: Path
) -> None:
    # Each cut resumes further on: --retries counts from 1 again, and so does the backoff's doubling.
    body = random.Random(4).randbytes(300_000)
    url = origin.add("/w.bin", body, etag='"v1"', cut_after=[50_000] * 5)
    env = {"FETCHER_RETRY_BACKOFF": "0.2"}
    run = run_fetcher("--source", url, "--dest", str(tmp_path), "--retries", "1", env=env)
    assert run.code == 0, run.stderr
    assert tree(tmp_path) == {"w.bin": body}
    retries = run.all("retrying")
    assert [r["attempt"] for r in retries] == [1] * 5
    assert max(r["delay_s"] for r in retries) < 0.5, retries  # 0.2 s and its jitter; was 0.2, 0.4, ... 3.2 s


def test_a_restart_from_zero_is_logged_as_such(origin: Origin, tmp_path: Path) -> None:
    url = origin.add("/w.bin", OLD, cut_after=[50_000])
    run = run_fetcher("--source", url, "--dest", str(tmp_path))
    assert run.code == 0, run.stderr
    assert run.event("retrying")["resume_at"] == 0


LOW_SPEED = ("--low-speed-limit", "1Ki", "--low-speed-time", "1")


@pytest.mark.fault(
    "a server trickling bytes, each inside --timeout, is cut and the transfer resumed", exit=0, area="network"
)
def test_a_trickle_is_cut_and_resumed(origin: Origin, tmp_path: Path) -> None:
    body = random.Random(4).randbytes(300_000)
    url = origin.add("/w.bin", body, etag='"v1"', trickle=[100])  # 100 bytes/s, then full speed

    run = run_fetcher("--source", url, "--dest", str(tmp_path), *LOW_SPEED, timeout=60)

    assert run.code == 0, run.stderr
    assert tree(tmp_path) == {"w.bin": body}
    [retry] = run.all("retrying")
    assert "below --low-speed-limit 1024 bytes/s" in retry["reason"]
    second = origin.hits("/w.bin")[1].headers
    assert second["Range"] == f"bytes={retry['resume_at']}-" and retry["resume_at"] > 0
    assert second["If-Match"] == '"v1"'


@pytest.mark.fault(
    "a server that only ever trickles: exit 3 after the retries, naming the limit", exit=3, area="network"
)
def test_a_server_that_only_trickles_fails_after_the_retries(origin: Origin, tmp_path: Path) -> None:
    # Every attempt makes a little progress: that must not refill the retry budget.
    url = origin.add("/w.bin", b"x" * 300_000, etag='"v1"', trickle=[100] * 10)
    dest = tmp_path / "d"

    run = run_fetcher("--source", url, "--dest", str(dest), "--retries", "2", *LOW_SPEED, timeout=60)

    assert run.code == 3
    assert run.error.startswith(f"{url} averaged ") and "--low-speed-time 1 s" in run.error
    assert len(run.all("retrying")) == 2
    assert len(origin.hits("/w.bin")) == 3
    assert not dest.exists(), "a failed first run leaves no dest behind"
    assert list(tmp_path.iterdir()) == []


def test_a_trickle_is_left_alone_with_the_floor_off(origin: Origin, tmp_path: Path) -> None:
    url = origin.add("/w.bin", b"y" * 300, trickle=[200])
    run = run_fetcher("--source", url, "--dest", str(tmp_path), "--low-speed-limit", "0", "--low-speed-time", "1")
    assert run.code == 0, run.stderr
    assert run.all("retrying") == []


# --- the whole promise, fault by fault: an earlier version in dest, the fault, then a healthy run ---

OLD_FILES = {"model/config.json": b'{"v": 1}\n', "model/w.bin": random.Random(1).randbytes(200_000)}
NEW_FILES = {"model/config.json": b'{"v": 2}\n', "model/w.bin": random.Random(2).randbytes(200_000)}
OLD_ARCHIVE = make_tar(OLD_FILES)
NEW_ARCHIVE = make_tar(NEW_FILES)


def _fault(case: str, exit: int, area: str = "network") -> pytest.MarkDecorator:
    return pytest.mark.fault(case, exit=exit, area=area)


# Faults the general suite (tests/test_faults.py) does not already cover: a reset, a stall mid-body, an
# HTML page, a redirect to a dead port and an ignored Range are there.
FAULTS = [
    pytest.param(
        {"stall": 5.0},
        ("--timeout", "0.5"),
        3,
        "timed out",
        marks=_fault("a server silent before the body", 3),
        id="silent",
    ),
    pytest.param(
        {"trickle": [100] * 10},
        ("--low-speed-limit", "1Ki", "--low-speed-time", "1"),
        3,
        "below --low-speed-limit",
        marks=_fault("a server that only ever trickles", 3),
        id="trickle",
    ),
    pytest.param(
        {"fail": [503] * 10}, (), 3, "HTTP 503", marks=_fault("503 on every request", 3, "protocol"), id="503"
    ),
    pytest.param({"fail": [404]}, (), 3, "HTTP 404 Not Found", marks=_fault("404 at once", 3, "protocol"), id="404"),
    pytest.param(
        {"fail": [403]},
        (),
        3,
        "HTTP 403",
        marks=_fault("403 at once, with a hint at credentials", 3, "protocol"),
        id="403",
    ),
    pytest.param(
        {"redirect": "/m.tar.gz"},
        (),
        3,
        "TooManyRedirects",
        marks=_fault("a redirect loop", 3, "protocol"),
        id="redirect-loop",
    ),
    pytest.param(
        {"body": OLD_ARCHIVE + b"tampered"},
        (),
        4,
        "sha256 mismatch",
        marks=_fault("other bytes than the sha256 pins", 4, "protocol"),
        id="wrong-bytes",
    ),
    pytest.param(
        {"cut_after": [50_000], "align_ranges": 4096, "etag": '"n"'},
        (),
        0,
        "",
        marks=_fault("a resume answered with another range than asked", 0, "protocol"),
        id="wrong-range",
    ),
]


@pytest.mark.parametrize(("fault", "flags", "code", "says"), FAULTS)
def test_a_fault_leaves_the_old_version_and_a_healthy_run_then_succeeds(
    origin: Origin, tmp_path: Path, fault: dict[str, object], flags: tuple[str, ...], code: int, says: str
) -> None:
    dest = tmp_path / "d"
    termination = tmp_path / "termination-log"
    url = origin.add("/m.tar.gz", OLD_ARCHIVE)
    assert run_fetcher("--source", url, "--dest", str(dest), "--sha256", sha256(OLD_ARCHIVE)).code == 0

    fault = copy.deepcopy(fault)  # the origin pops its lists: the parameters stay as written for a rerun
    body = fault.pop("body", NEW_ARCHIVE)
    if fault.get("redirect") == "/m.tar.gz":
        fault["redirect"] = url
    origin.add("/m.tar.gz", body, **fault)  # type: ignore[arg-type]
    new = ("--source", url, "--dest", str(dest), "--sha256", sha256(NEW_ARCHIVE), "--retries", "1")
    run = run_fetcher(*new, *flags, "--termination-log", str(termination), timeout=60)

    assert run.code == code, run.stderr
    if code:
        assert says in run.error and "\n" not in run.error
        assert termination.read_text() == run.error + "\n"
        assert tree(dest) == OLD_FILES  # exactly the old version
        origin.add("/m.tar.gz", NEW_ARCHIVE)  # healthy again
        assert run_fetcher(*new).code == 0
    assert tree(dest) == NEW_FILES
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["d"] + (["termination-log"] if code else []))
