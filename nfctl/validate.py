"""`nfctl validate`: schema-check every manifest, compile and verifier-check every program,
and check managed map entries against the C types. Loads nothing permanently."""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nfctl import progress
from nfctl.bpf.mapinfo import map_codecs
from nfctl.builder.check import check_entries
from nfctl.compiler.build import BuildResult
from nfctl.compiler.client import PreparedNF, build_request, prepare, run_parallel
from nfctl.diagnostics import Diagnostic
from nfctl.manifest.repo import scan_repo
from nfctl.manifest.rollout import policy_problems
from nfctl.uapi_headers import internal_header_warnings


@dataclass
class NFReport:
    name: str | None
    manifest: str
    hook: str | None = None
    version: str | None = None
    build_hash: str | None = None
    program_name: str | None = None
    compile_seconds: float = 0.0
    load_seconds: float = 0.0
    maps: list[dict[str, Any]] = field(default_factory=list)
    errors: list[Diagnostic] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "manifest": self.manifest,
            "ok": self.ok,
            "hook": self.hook,
            "version": self.version,
            "buildHash": self.build_hash,
            "program": self.program_name,
            "compileSeconds": round(self.compile_seconds, 4),
            "loadSeconds": round(self.load_seconds, 4),
            "maps": self.maps,
            "errors": [e.to_dict() for e in self.errors],
        }


@dataclass
class ValidationReport:
    path: str
    nfs: list[NFReport] = field(default_factory=list)
    errors: list[Diagnostic] = field(default_factory=list)
    warnings: list[Diagnostic] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors and all(nf.ok for nf in self.nfs) and bool(self.nfs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "functions": [nf.to_dict() for nf in self.nfs],
            "errors": [e.to_dict() for e in self.errors],
            "warnings": [w.to_dict() for w in self.warnings],
        }


def _tests_file_problems(prepared: PreparedNF, repo_root: Path) -> list[Diagnostic]:
    """A tests.yaml beside the manifest must parse (its cases run in `nfctl test`)."""
    from nfctl.nftest.load import load_tests, tests_beside

    tests_path = tests_beside(prepared.manifest.path)
    return [] if tests_path is None else load_tests(tests_path, repo_root).diagnostics


def validate_path(path: Path, compile_programs: bool = True) -> ValidationReport:
    start = time.monotonic()
    scan = scan_repo(path)
    report = ValidationReport(path=str(path))
    for diag in scan.diagnostics:
        (report.warnings if diag.severity == "warning" else report.errors).append(diag)
    report.errors.extend(policy_problems(path, scan.root))  # rollout.yaml (issue #12)
    prepared_list = [prepare(m, scan.root) for m in scan.manifests]
    progress.note(f"found {len(prepared_list)} manifest(s) under {path}")
    to_build = [p for p in prepared_list if p.ok]
    results: dict[int, BuildResult] = {}
    if compile_programs and to_build and os.geteuid() != 0:
        report.warnings.append(
            Diagnostic(
                file=str(path),
                severity="warning",
                message=(
                    "not running as root: compiling is confined (user namespace), but BCC "
                    "creates a program's maps while compiling and the kernel verifier runs "
                    "at load, both need CAP_BPF; programs with maps fail here with "
                    "'Operation not permitted' and nothing is verifier-checked"
                ),
            )
        )
    if compile_programs and to_build:
        built = run_parallel([build_request(p) for p in to_build])
        for prepared, built_one in zip(to_build, built, strict=True):
            results[id(prepared)] = built_one
    for position, prepared in enumerate(prepared_list, start=1):
        nf = prepared.manifest.nf
        if prepared.bundle is not None:
            report.warnings.extend(
                internal_header_warnings(prepared.bundle.main_rel, prepared.bundle.main_text)
            )
        nf_report = NFReport(
            name=nf.name if nf else None,
            manifest=prepared.manifest.rel_path,
            hook=nf.spec.attach.hook.value if nf else None,
            version=nf.spec.version if nf else None,
            build_hash=prepared.build_hash or None,
            errors=list(prepared.diagnostics) + _tests_file_problems(prepared, scan.root),
        )
        result: BuildResult | None = results.get(id(prepared))
        if result is not None:
            nf_report.compile_seconds = result.compile_seconds
            nf_report.load_seconds = result.load_seconds
            nf_report.errors.extend(result.diagnostics)
            if result.program:
                nf_report.program_name = result.program.name
            nf_report.maps = [
                {
                    "name": m.name,
                    "type": m.map_type,
                    "keySize": m.key_size,
                    "valueSize": m.value_size,
                    "maxEntries": m.max_entries,
                }
                for m in result.maps
            ]
            if result.ok:
                try:
                    source = prepared.bundle.main_text if prepared.bundle else ""
                    nf_report.errors.extend(
                        check_entries(
                            prepared, result.maps, functools.partial(map_codecs, source=source)
                        )
                    )
                except Exception as exc:  # report, never a traceback in a user's CI
                    nf_report.errors.append(
                        Diagnostic(
                            file=prepared.manifest.rel_path,
                            message=f"internal error while checking map entries: {exc!r}",
                        )
                    )
        report.nfs.append(nf_report)
        verdict = "valid" if nf_report.ok else f"invalid ({len(nf_report.errors)} error(s))"
        label = nf_report.name or nf_report.manifest
        progress.note(f"[{position}/{len(prepared_list)}] {label}: {verdict}")
    report.seconds = time.monotonic() - start
    return report
