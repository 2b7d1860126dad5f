"""`nfctl validate`: schema-check every manifest, compile and verifier-check every program,
and check managed map entries against the C types. Loads nothing permanently."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nfctl import progress
from nfctl.compiler.build import BuildResult, MapInfo
from nfctl.compiler.client import PreparedNF, build_request, prepare, run_parallel
from nfctl.datapath.layout import LayoutError, TypeLayout, declared_types, network_order_fields
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


MANAGEABLE_MAP_TYPES = frozenset(
    {"hash", "array", "lru_hash", "lpm_trie", "percpu_hash", "percpu_array", "lru_percpu_hash"}
)


def map_layouts(info: MapInfo, source: str) -> tuple[TypeLayout, TypeLayout]:
    key_type, value_type = declared_types(source).get(info.name, (None, None))
    return (
        TypeLayout(info.key_desc, network_order_fields(source, info.key_desc, key_type)),
        TypeLayout(info.value_desc, network_order_fields(source, info.value_desc, value_type)),
    )


LayoutsOf = Callable[[MapInfo], tuple[TypeLayout, TypeLayout]]


def check_entries(
    prepared: PreparedNF, maps: list[MapInfo], layouts_of: LayoutsOf
) -> list[Diagnostic]:
    """Every map the manifest names exists; every managed entry encodes into the map's C key
    and value types, once per key, within array bounds; exported fields exist. Used by
    `nfctl validate` and by the agent before a new version goes live."""
    manifest, nf, source_rel = prepared.manifest, prepared.nf, prepared.source_name
    problems: list[Diagnostic] = []
    declared = {m.name: m for m in maps}
    for map_name, spec in nf.spec.maps.items():
        field_base = f"spec.maps.{map_name}"
        info = declared.get(map_name)
        if info is None:
            problems.append(
                manifest.diagnostic(
                    field_base,
                    (
                        f"map {map_name!r} is not declared in {source_rel}"
                        f" (declared: {', '.join(sorted(declared)) or 'none'})"
                    ),
                )
            )
            continue
        if spec.managed and info.map_type not in MANAGEABLE_MAP_TYPES:
            problems.append(
                manifest.diagnostic(field_base, f"a {info.map_type} map cannot be managed from Git")
            )
            continue
        key_layout, value_layout = layouts_of(info)
        seen_keys: dict[bytes, int] = {}
        for index, entry in enumerate(spec.entries):
            for part, layout, value in (
                ("key", key_layout, entry.key),
                ("value", value_layout, entry.value),
            ):
                field_path = f"{field_base}.entries.{index}.{part}"
                try:
                    encoded = layout.encode(value)
                except LayoutError as exc:
                    problems.append(manifest.diagnostic(field_path, str(exc)))
                    continue
                if part == "key":
                    if encoded in seen_keys:
                        problems.append(
                            manifest.diagnostic(
                                field_path, f"duplicate key (same as entry {seen_keys[encoded]})"
                            )
                        )
                    seen_keys[encoded] = index
                    if info.map_type in ("array", "percpu_array"):
                        index_value = int.from_bytes(encoded[:4], "little")
                        if index_value >= info.max_entries:
                            problems.append(
                                manifest.diagnostic(
                                    field_path,
                                    (
                                        f"array index {index_value} is out of range "
                                        f"(max_entries {info.max_entries})"
                                    ),
                                )
                            )
        if len(spec.entries) > info.max_entries:
            problems.append(
                manifest.diagnostic(
                    f"{field_base}.entries",
                    f"{len(spec.entries)} entries exceed max_entries {info.max_entries}",
                )
            )
        for export_index, export in enumerate(spec.export):
            if export.field and not _has_field(info.value_desc, export.field):
                export_path = f"{field_base}.export.{export_index}.field"
                problems.append(
                    manifest.diagnostic(export_path, f"value type has no field {export.field!r}")
                )
    return problems


def _has_field(desc: Any, name: str) -> bool:
    if isinstance(desc, str):
        return False
    return any(f[0] == name for f in desc[1])


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
                            prepared, result.maps, functools.partial(map_layouts, source=source)
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
