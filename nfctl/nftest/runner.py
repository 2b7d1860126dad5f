"""`nfctl test`: find the NFs and their tests.yaml, build them for tests, run the cases."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nfctl import progress
from nfctl.compiler.client import PreparedNF, prepare
from nfctl.diagnostics import Diagnostic
from nfctl.manifest.repo import scan_repo
from nfctl.nftest.build import load_for_tests
from nfctl.nftest.cases import Suite, build_packets, case_path, run_suites
from nfctl.nftest.load import load_tests, tests_beside
from nfctl.nftest.results import TestReport


def find_suites(
    path: Path, repo_root: Path | None = None
) -> tuple[list[PreparedNF], list[Suite], list[Diagnostic], list[str]]:
    """Every NF under path, and the tests files beside their manifests."""
    scan = scan_repo(path, repo_root)
    errors = [d for d in scan.diagnostics if d.severity == "error"]
    prepared_all: list[PreparedNF] = []
    suites: list[Suite] = []
    untested: list[str] = []
    for manifest in scan.manifests:
        if manifest.nf is None:
            errors.extend(manifest.diagnostics)
            continue
        prepared = prepare(manifest, scan.root)
        if not prepared.ok:
            errors.extend(prepared.diagnostics)
            continue
        prepared_all.append(prepared)
        tests_path = tests_beside(manifest.path)
        if tests_path is None:
            untested.append(prepared.nf.name)
            continue
        loaded = load_tests(tests_path, scan.root)
        if not loaded.ok:
            errors.extend(loaded.diagnostics)
            continue
        suites.append(Suite(prepared=prepared, tests=loaded))
    return prepared_all, suites, errors, untested


def chain_problems(suite: Suite, known: dict[str, PreparedNF]) -> list[Diagnostic]:
    problems = []
    assert suite.tests.tests is not None
    hook = suite.prepared.nf.spec.attach.hook
    for index, case in enumerate(suite.tests.tests.cases):
        for member_index, member in enumerate(case.chain):
            other = known.get(member)
            field_path = f"{case_path(index)}.chain.{member_index}"
            if other is None:
                problems.append(
                    suite.tests.diagnostic(field_path, f"no NF named {member!r} in this repository")
                )
            elif other.nf.spec.attach.hook is not hook:
                problems.append(
                    suite.tests.diagnostic(
                        field_path,
                        f"{member} attaches at {other.nf.spec.attach.hook.value}, "
                        f"not {hook.value} like {suite.prepared.nf.name}",
                    )
                )
    return problems


def run_tests(
    path: Path, repo_root: Path | None = None, only: set[str] | None = None
) -> TestReport:
    """`nfctl test PATH`: compile (confined, like validate), load unattached, run all cases."""
    started = time.monotonic()
    report = TestReport(path=str(path))
    prepared_all, suites, errors, untested = find_suites(path, repo_root)
    report.errors.extend(errors)
    report.untested = [] if only is not None else untested
    if only is not None:
        suites = [s for s in suites if s.prepared.nf.name in only]
    known = {p.nf.name: p for p in prepared_all}
    for suite in suites:
        report.errors.extend(chain_problems(suite, known))
    needed = {s.prepared.nf.name for s in suites}
    for suite in suites:
        assert suite.tests.tests is not None
        for case in suite.tests.tests.cases:
            needed.update(m for m in case.chain if m in known)
    to_build = [p for p in prepared_all if p.nf.name in needed]
    progress.note(f"found {len(suites)} NF(s) with tests.yaml under {path}")
    root = (repo_root or scan_root(path)).resolve()
    if to_build:
        with ThreadPoolExecutor(max_workers=1) as pool:
            # scapy builds the packets while the (sub-process) compile runs
            packets_future = pool.submit(build_packets, suites, root)
            builds = load_for_tests(to_build)
            report.compile_seconds = time.monotonic() - started
            packets = packets_future.result()
        try:
            for diags in builds.errors.values():
                report.errors.extend(diags)
            run_suites(suites, builds, packets, report)
        finally:
            builds.close()
    report.seconds = time.monotonic() - started
    return report


def scan_root(path: Path) -> Path:
    from nfctl.manifest.repo import find_repo_root

    return find_repo_root(path)
