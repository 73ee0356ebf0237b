"""FAULTS.md: every case of the fault suite, the exit code it expects, and whether it held.

A fault case is a test marked ``@pytest.mark.fault("case", exit=N, area="...")``, on the test
or on one of its params. At collection each case's marker is copied into the item's
``user_properties``, which travel with every report: under pytest-xdist the controller, which
collects nothing itself, gathers the outcomes from the workers' reports all the same.

When is FAULTS.md (at the repository root) written? Only when the list is whole, so that a
partial run never replaces it with a subset:

- the suite ran as a whole: no test paths or node ids given (``--ignore`` is allowed), no
  ``-k``, ``-m``, ``--deselect``, ``--lf``, and the run was not stopped early (``-x``, Ctrl-C);
- or ``--faults-md=PATH`` asks for it, whatever ran (``--faults-md=-`` never writes).

A case "holds" when its test passed. A strict xfail (a known break another change fixes) is
listed as not holding, with its reason; a skip is listed with its reason.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

AREAS = ("network", "protocol", "s3", "directory", "archive", "publish", "disk", "process", "config", "secrets")
_KEY = "fault"


@dataclass
class Case:
    nodeid: str
    case: str
    exit: int | None
    area: str
    outcome: str = "not run"  # held | FAILED | error | skipped | xfail | not run
    detail: str = ""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--faults-md",
        default=None,
        metavar="PATH",
        help="write the fault-suite table to PATH whatever ran ('-': never); "
        "by default FAULTS.md is written at the root only after a whole-suite run",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fault(case, exit, area): a case of the fault suite, listed in FAULTS.md")
    config.pluginmanager.register(FaultsReport(config), "fetcher-faults-report")


class FaultsReport:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.cases: dict[str, Case] = {}

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            marker = item.get_closest_marker("fault")  # a param's own marker before the function's
            if marker is None:
                continue
            case = marker.args[0] if marker.args else marker.kwargs.get("case", item.name)
            area = str(marker.kwargs.get("area", "other"))
            item.user_properties.append((_KEY, {"case": str(case), "exit": marker.kwargs.get("exit"), "area": area}))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        found = next((value for key, value in report.user_properties if key == _KEY), None)
        if found is None:
            return
        case = self.cases.setdefault(report.nodeid, Case(report.nodeid, found["case"], found["exit"], found["area"]))
        xfail = getattr(report, "wasxfail", None)
        if report.when == "call" or (report.when == "setup" and not report.passed):
            if xfail is not None and report.skipped:
                case.outcome, case.detail = "xfail", str(xfail).removeprefix("reason: ")
            elif report.passed:
                case.outcome, case.detail = "held", ""
            elif report.skipped:
                case.outcome, case.detail = "skipped", _skip_reason(report)
            else:
                case.outcome = "FAILED" if report.when == "call" else "error"
                case.detail = _first_line(report)
        elif report.when == "teardown" and report.failed and case.outcome == "held":
            case.outcome, case.detail = "error", "in teardown: " + _first_line(report)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if hasattr(self.config, "workerinput"):  # an xdist worker: the controller writes
            return
        target = self._target(session, exitstatus)
        if target is None or not self.cases:
            return
        target.write_text(render(list(self.cases.values())), encoding="utf-8")
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            held = sum(c.outcome == "held" for c in self.cases.values())
            reporter.ensure_newline()
            reporter.write_line(f"fault suite: {held} of {len(self.cases)} cases hold; written to {target}")

    def _target(self, session: pytest.Session, exitstatus: int) -> Path | None:
        option = self.config.getoption("--faults-md")
        if option == "-":
            return None
        if option:
            return Path(option)
        o = self.config.option
        testpaths = [str(self.config.rootpath / p) for p in self.config.getini("testpaths")]
        given = [str(Path(a).resolve()) for a in self.config.args]
        whole = (
            given in ([], [str(self.config.rootpath)], testpaths)
            and not getattr(o, "keyword", "")
            and not getattr(o, "markexpr", "")
            and not getattr(o, "deselect", None)
            and not getattr(o, "lf", False)
            and not session.shouldfail
            and not session.shouldstop
            and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED)
        )
        return self.config.rootpath / "FAULTS.md" if whole else None


def _skip_reason(report: pytest.TestReport) -> str:
    if isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    return _first_line(report)


def _first_line(report: pytest.TestReport) -> str:
    text = ""
    with contextlib.suppress(Exception):
        crash = getattr(report.longrepr, "reprcrash", None)
        text = crash.message if crash is not None else str(report.longrepr)
    return text.strip().splitlines()[0][:160] if text.strip() else ""


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render(cases: list[Case]) -> str:
    """The Markdown: a table per area, in the README's order of the promise, then the totals."""
    by_area: dict[str, list[Case]] = defaultdict(list)
    for case in cases:
        by_area[case.area].append(case)
    order = [a for a in AREAS if a in by_area] + sorted(a for a in by_area if a not in AREAS)
    held = sum(c.outcome == "held" for c in cases)
    lines = [
        "# Fault suite",
        "",
        "Generated by the test suite (`scripts/test`, see `tests/faults_plugin.py`); do not edit.",
        "Each case is a test marked `@pytest.mark.fault`. It holds when fetcher ends with the expected exit code,",
        "a one-line message naming the cause, dest exactly the old version or the new one, nothing outside dest,",
        "and a later healthy run succeeds.",
        "",
        f"**{held} of {len(cases)} cases hold.**",
        "",
        "| area | cases | hold | do not hold | skipped |",
        "|---|---:|---:|---:|---:|",
    ]
    for area in order:
        group = by_area[area]
        good = sum(c.outcome == "held" for c in group)
        skipped = sum(c.outcome == "skipped" for c in group)
        lines.append(f"| {area} | {len(group)} | {good} | {len(group) - good - skipped} | {skipped} |")
    for area in order:
        lines += ["", f"## {area}", "", "| case | exit | result | test |", "|---|---:|---|---|"]
        for case in sorted(by_area[area], key=lambda c: c.nodeid):
            result = case.outcome if not case.detail else f"{case.outcome}: {case.detail}"
            exit_code = "" if case.exit is None else case.exit
            lines.append(f"| {_cell(case.case)} | {exit_code} | {_cell(result)} | `{_cell(case.nodeid)}` |")
    return "\n".join(lines) + "\n"
