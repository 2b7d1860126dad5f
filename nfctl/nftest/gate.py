"""The agent's gate: a new build of an NF goes live only when its tests.yaml passes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from nfctl.compiler.client import PreparedNF
from nfctl.diagnostics import Diagnostic
from nfctl.nftest.load import tests_beside
from nfctl.nftest.results import TestReport
from nfctl.nftest.runner import run_tests

TESTS_FAILED = "TestsFailed"


# The agent retries a refused revision every interval; the same build under the same
# revision snapshot gives the same answer, so it is tested once.
_MEMO_SIZE = 64
_memo: dict[tuple[str, str, str], list[Diagnostic]] = {}


def gate_problems(prepared: PreparedNF, folder: Path, repo_root: Path) -> list[Diagnostic]:
    """Run the NF's cases (chain members found under folder); [] when all pass or there are
    no tests. A tests file that does not load, or a test build that fails, refuses too."""
    tests_path = tests_beside(prepared.manifest.path)
    if tests_path is None:
        return []
    try:
        digest = hashlib.sha256(tests_path.read_bytes()).hexdigest()
    except OSError:
        digest = ""
    key = (prepared.build_hash, str(folder.resolve()), digest)
    if key not in _memo:
        if len(_memo) >= _MEMO_SIZE:
            _memo.pop(next(iter(_memo)))
        try:
            report = run_tests(folder, repo_root=repo_root, only={prepared.nf.name})
            problems = problems_of(report)
        except Exception as exc:  # fail closed: an untested version never goes live
            problems = [
                Diagnostic(
                    file=os.path.relpath(tests_path, repo_root),
                    message=f"cannot run the tests: {exc!r}",
                )
            ]
        _memo[key] = problems
    return list(_memo[key])


def problems_of(report: TestReport) -> list[Diagnostic]:
    problems = list(report.errors)
    for case in report.cases:
        for failure in case.failures:
            diff = f" ({'; '.join(failure.diff)})" if failure.diff else ""
            problems.append(
                Diagnostic(
                    file=case.file,
                    line=failure.line or case.line,
                    message=f"test {case.name!r} failed: {failure.message}{diff}",
                )
            )
    return problems
