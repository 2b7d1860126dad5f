"""What a test run found, per case, in forms for people, JSON and JUnit XML."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from xml.etree import ElementTree as ET

from nfctl.diagnostics import Diagnostic


@dataclass
class Failure:
    kind: str  # verdict | packet | map | error
    message: str
    line: int | None = None
    step: int | None = None
    run: int | None = None  # which repetition of the step (1-based)
    diff: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "message": self.message}
        for key in ("line", "step", "run"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.diff:
            out["diff"] = self.diff
        return out


@dataclass
class CaseResult:
    nf: str
    name: str
    file: str
    line: int | None
    chain: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    runs: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def location(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file

    def to_dict(self) -> dict[str, Any]:
        return {
            "nf": self.nf,
            "name": self.name,
            "file": self.file,
            "line": self.line,
            "ok": self.ok,
            "chain": self.chain,
            "runs": self.runs,
            "seconds": round(self.seconds, 6),
            "failures": [f.to_dict() for f in self.failures],
        }


@dataclass
class TestReport:
    __test__ = False  # not a pytest class
    path: str
    cases: list[CaseResult] = field(default_factory=list)
    errors: list[Diagnostic] = field(default_factory=list)
    untested: list[str] = field(default_factory=list)  # NFs without tests.yaml
    seconds: float = 0.0
    compile_seconds: float = 0.0
    run_seconds: float = 0.0  # time spent running cases (no compile)

    @property
    def ok(self) -> bool:
        return not self.errors and all(c.ok for c in self.cases)

    @property
    def runs(self) -> int:
        return sum(c.runs for c in self.cases)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "passed": sum(1 for c in self.cases if c.ok),
            "failed": sum(1 for c in self.cases if not c.ok),
            "runs": self.runs,
            "seconds": round(self.seconds, 4),
            "compileSeconds": round(self.compile_seconds, 4),
            "runSeconds": round(self.run_seconds, 4),
            "untested": self.untested,
            "errors": [e.to_dict() for e in self.errors],
            "cases": [c.to_dict() for c in self.cases],
        }


def junit_xml(report: TestReport) -> str:
    """JUnit XML as CI systems read it: one testsuite per NF, one testcase per case;
    build and file errors are <error> cases so they are never silently missing."""
    suites = ET.Element("testsuites", name="nfctl test", time=f"{report.seconds:.4f}")
    by_nf: dict[str, list[CaseResult]] = {}
    for case in report.cases:
        by_nf.setdefault(case.nf, []).append(case)
    for nf, cases in by_nf.items():
        suite = ET.SubElement(
            suites,
            "testsuite",
            name=nf,
            tests=str(len(cases)),
            failures=str(sum(1 for c in cases if not c.ok)),
            errors="0",
            skipped="0",
            time=f"{sum(c.seconds for c in cases):.6f}",
        )
        for case in cases:
            element = ET.SubElement(
                suite,
                "testcase",
                name=case.name,
                classname=nf,
                file=case.file,
                line=str(case.line or 0),
                time=f"{case.seconds:.6f}",
            )
            if not case.ok:
                failure = ET.SubElement(
                    element,
                    "failure",
                    message=case.failures[0].message,
                    type=case.failures[0].kind,
                )
                failure.text = "\n".join(render_failure(case.location, f) for f in case.failures)
    if report.errors:
        suite = ET.SubElement(
            suites,
            "testsuite",
            name="nfctl",
            tests=str(len(report.errors)),
            failures="0",
            errors=str(len(report.errors)),
            skipped="0",
        )
        for diag in report.errors:
            element = ET.SubElement(
                suite, "testcase", name=diag.location(), classname="nfctl", file=diag.file
            )
            error = ET.SubElement(element, "error", message=diag.message, type="error")
            error.text = str(diag) + (f"\n{diag.detail}" if diag.detail else "")
    ET.indent(suites)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"


def render_failure(location: str, failure: Failure) -> str:
    where = (
        f"{location.rpartition(':')[0] or location}:{failure.line}" if failure.line else location
    )
    step = f" step {failure.step}" if failure.step is not None else ""
    run = f" run {failure.run}" if failure.run is not None else ""
    lines = [f"{where}:{step}{run} {failure.kind}: {failure.message}"]
    lines.extend(f"    {d}" for d in failure.diff)
    return "\n".join(lines)
