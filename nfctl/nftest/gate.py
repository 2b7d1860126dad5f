"""The agent's gate: a new build of an NF goes live only when its tests.yaml passes."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from nfctl.bpf.mapinfo import MapInfo
from nfctl.compiler.client import PreparedNF
from nfctl.diagnostics import Diagnostic
from nfctl.nftest.build import load_private_copy
from nfctl.nftest.cases import Packets, Suite, build_packets, run_suites
from nfctl.nftest.load import LoadedTests, load_tests, tests_beside
from nfctl.nftest.results import TestReport
from nfctl.nftest.runner import run_tests

TESTS_FAILED = "TestsFailed"

log = logging.getLogger(__name__)


# The agent retries a refused revision every interval; the same build under the same
# revision snapshot gives the same answer, so it is tested once.
_MEMO_SIZE = 64
_memo: dict[tuple[str, str, str], list[Diagnostic]] = {}


@dataclass(frozen=True)
class ReadyCases:
    tests: LoadedTests
    packets: Packets


# Cases parsed and packets built ahead, by (build hash, tests file digest): see prepare_cases.
_ready: dict[tuple[str, str], ReadyCases] = {}


def _digest(tests_path: Path) -> str:
    try:
        return hashlib.sha256(tests_path.read_bytes()).hexdigest()
    except OSError:
        return ""


def prepare_cases(prepared: PreparedNF, repo_root: Path) -> None:
    """Parse the NF's tests file and build its packets ahead of the gate: the agent does
    this while the live build compiles in its worker process, so it adds nothing to
    commit -> attached. Any problem is left for the gate to find again and report."""
    tests_path = tests_beside(prepared.manifest.path)
    if tests_path is None:
        return
    key = (prepared.build_hash, _digest(tests_path))
    try:
        loaded = load_tests(tests_path, repo_root)
        if not loaded.ok:
            return
        packets = build_packets([Suite(prepared=prepared, tests=loaded)], repo_root)
    except Exception:  # the gate repeats the work and reports the error
        return
    if len(_ready) >= _MEMO_SIZE:
        _ready.pop(next(iter(_ready)))
    _ready[key] = ReadyCases(loaded, packets)


def gate_problems(
    prepared: PreparedNF,
    folder: Path,
    repo_root: Path,
    copy: Path | None = None,
    maps: list[MapInfo] | None = None,
) -> list[Diagnostic]:
    """Run the NF's cases (chain members found under folder); [] when all pass or there are
    no tests. A tests file that does not load, or a test build that fails, refuses too.

    copy: where the compile worker pinned the private copy of the live build (its maps
    described by maps); the cases run on it, with no compile. Without it, or when a case
    needs chain members, a test build of its own is compiled."""
    tests_path = tests_beside(prepared.manifest.path)
    if tests_path is None:
        return []
    digest = _digest(tests_path)
    key = (prepared.build_hash, str(folder.resolve()), digest)
    if key not in _memo:
        if len(_memo) >= _MEMO_SIZE:
            _memo.pop(next(iter(_memo)))
        try:
            started = time.monotonic()
            ready = _ready.pop((prepared.build_hash, digest), None)
            report = run_on_copy(prepared, tests_path, repo_root, copy, maps or [], ready)
            how = "on the live build's private copy"
            if report is None:
                report = run_tests(folder, repo_root=repo_root, only={prepared.nf.name})
                how = "on a test build of their own"
            log.info(
                "tests of %s ran %s: %d case(s), %d failed, %.1f ms",
                prepared.nf.name,
                how,
                len(report.cases),
                sum(not c.ok for c in report.cases),
                (time.monotonic() - started) * 1000,
            )
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


def run_on_copy(
    prepared: PreparedNF,
    tests_path: Path,
    repo_root: Path,
    copy: Path | None,
    maps: list[MapInfo],
    ready: ReadyCases | None = None,
) -> TestReport | None:
    """The cases on the live build's private copy; None when they need a test build."""
    if copy is None:
        return None
    report = TestReport(path=str(tests_path.parent))
    loaded = ready.tests if ready else load_tests(tests_path, repo_root)
    if not loaded.ok:
        report.errors.extend(loaded.diagnostics)
        return report
    assert loaded.tests is not None
    if any(case.chain for case in loaded.tests.cases):
        return None  # the other members have no copy here
    suites = [Suite(prepared=prepared, tests=loaded)]
    packets = ready.packets if ready else build_packets(suites, repo_root)
    builds = load_private_copy(prepared, copy, maps)
    try:
        for diags in builds.errors.values():
            report.errors.extend(diags)
        run_suites(suites, builds, packets, report)
    finally:
        # closing the last fds frees the copy's maps in the kernel (~1 ms each): the
        # verdict does not wait for it
        threading.Thread(target=builds.close, daemon=True).start()
    return report


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
