"""FAULTS.md as the plugin writes it: gathered across xdist workers, never from a partial run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import ROOT

CASES = """
import pytest

@pytest.mark.fault("refused", exit=3, area="network")
def test_holds():
    pass

@pytest.mark.fault("cut", exit=3, area="network")
def test_breaks():
    assert 1 == 2, "one is not two"

@pytest.mark.parametrize("n", [
    pytest.param(1, marks=pytest.mark.fault("full disk", exit=6, area="disk")),
    pytest.param(2, marks=pytest.mark.fault("read-only | remounted", exit=6, area="disk")),
])
def test_param(n):
    if n == 2:
        pytest.skip("no tmpfs here")

@pytest.mark.fault("bad flag", exit=2, area="config")
@pytest.mark.xfail(strict=True, reason="the config item")
def test_known():
    assert False

def test_not_a_case():
    pass
"""


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    pytester.makeini("[pytest]\ntestpaths = tests\n")
    (pytester.path / "tests").mkdir()
    (pytester.path / "tests" / "test_cases.py").write_text(CASES)
    (pytester.path / "tests" / "test_other.py").write_text("def test_plain():\n    pass\n")
    return pytester


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one-process", "xdist"])
def test_a_whole_run_writes_every_case_and_its_outcome(suite: pytest.Pytester, workers: list[str]) -> None:
    result = suite.runpytest_subprocess("-p", "tests.faults_plugin", *workers)
    result.assert_outcomes(passed=4, failed=1, skipped=1, xfailed=1)
    text = (suite.path / "FAULTS.md").read_text()
    assert "**2 of 5 cases hold.**" in text
    assert "| network | 2 | 1 | 1 | 0 |" in text and "| disk | 2 | 1 | 0 | 1 |" in text
    assert "| refused | 3 | held | `tests/test_cases.py::test_holds` |" in text
    assert "| cut | 3 | FAILED: AssertionError: one is not two" in text
    assert "| read-only \\| remounted | 6 | skipped: no tmpfs here |" in text
    assert "| bad flag | 2 | xfail: the config item |" in text
    assert "not_a_case" not in text and "test_plain" not in text
    assert text.index("## network") < text.index("## disk") < text.index("## config")


@pytest.mark.parametrize(
    "subset",
    [["tests/test_cases.py"], ["-k", "holds"], ["-x"], ["-m", "fault"]],
    ids=["a-file", "-k", "-x", "-m"],
)
def test_a_partial_run_leaves_faults_md_alone(suite: pytest.Pytester, subset: list[str]) -> None:
    (suite.path / "FAULTS.md").write_text("the last whole run's\n")
    suite.runpytest_subprocess("-p", "tests.faults_plugin", "-n", "2", *subset)
    assert (suite.path / "FAULTS.md").read_text() == "the last whole run's\n"


def test_a_partial_run_writes_where_asked(suite: pytest.Pytester, tmp_path: Path) -> None:
    target = tmp_path / "subset.md"
    suite.runpytest_subprocess("-p", "tests.faults_plugin", "-k", "holds", f"--faults-md={target}")
    assert "**1 of 1 cases hold.**" in target.read_text()
    assert not (suite.path / "FAULTS.md").exists()
