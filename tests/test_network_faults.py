"""Network and protocol faults: a cut transfer of an object that changed, a trickle.

Every case checks the whole promise: the exit code, a one-line reason, and dest
holding the old version or the new one, never two versions stitched together.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.conftest import Origin, run_fetcher, tree

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
    assert sorted(p.name for p in dest.iterdir()) == [".fetcher", "w.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    second = origin.hits("/w.bin")[1].headers
    for name, value in sent.items():
        assert second[name] == value
    if sent:  # pinned: a resume
        assert second["Range"] == "bytes=50000-"
    else:  # nothing to pin a resume to: from the start again, the bytes already passed on compared
        assert "Range" not in second and "If-Match" not in second and "If-Unmodified-Since" not in second
    assert "If-Match" in second or "If-Match" not in sent  # never If-Match on a weak ETag
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
    assert run.error.startswith(f"{url} sent ") and "--low-speed-time 1 s" in run.error
    assert len(run.all("retrying")) == 2
    assert len(origin.hits("/w.bin")) == 3
    assert sorted(p.name for p in dest.iterdir()) == [".fetcher"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_a_trickle_is_left_alone_with_the_floor_off(origin: Origin, tmp_path: Path) -> None:
    url = origin.add("/w.bin", b"y" * 300, trickle=[200])
    run = run_fetcher("--source", url, "--dest", str(tmp_path), "--low-speed-limit", "0", "--low-speed-time", "1")
    assert run.code == 0, run.stderr
    assert run.all("retrying") == []
