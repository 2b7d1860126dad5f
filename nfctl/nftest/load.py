"""Load tests.yaml: bytes -> YAML (with line marks) -> TestsFile, every problem at file:line.

Uses the manifest loader's YAML guards (size, depth, alias bombs, duplicate keys)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import ValidationError

from nfctl.diagnostics import Diagnostic
from nfctl.manifest import loader as manifest_loader
from nfctl.manifest.paths import PathEscapeError, resolve_inside
from nfctl.nftest.model import TESTS_NAMES, TestsFile

MAX_TESTS_BYTES = 4 << 20


@dataclass
class LoadedTests:
    path: Path
    rel_path: str
    tests: TestsFile | None
    diagnostics: list[Diagnostic] = field(default_factory=list)
    lines: dict[str, int] = field(default_factory=dict)  # field path -> line

    @property
    def ok(self) -> bool:
        return self.tests is not None and not self.diagnostics

    def line_of(self, field_path: str) -> int | None:
        while field_path:
            if field_path in self.lines:
                return self.lines[field_path]
            field_path = field_path.rpartition(".")[0]
        return None

    def diagnostic(self, field_path: str, message: str) -> Diagnostic:
        return Diagnostic(
            file=self.rel_path, line=self.line_of(field_path), field=field_path, message=message
        )


def tests_beside(manifest_path: Path) -> Path | None:
    for name in TESTS_NAMES:
        candidate = manifest_path.parent / name
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return None


def load_tests(path: Path, repo_root: Path) -> LoadedTests:
    repo_root = repo_root.resolve()
    rel = manifest_loader._relative(path, repo_root)
    result = LoadedTests(path=path, rel_path=rel, tests=None)

    def fail(message: str, line: int | None = None) -> LoadedTests:
        result.diagnostics.append(Diagnostic(file=rel, message=message, line=line))
        return result

    try:
        real = resolve_inside(path, repo_root)
        if not real.is_file():
            return fail("tests file is not a regular file")
        if real.stat().st_size > MAX_TESTS_BYTES:
            return fail(f"tests file is larger than {MAX_TESTS_BYTES} bytes")
        text = real.read_bytes().decode("utf-8")
    except PathEscapeError as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"cannot read tests file: {exc.strerror}")
    except UnicodeDecodeError as exc:
        return fail(f"not valid UTF-8 (offset {exc.start})")
    try:
        shape = manifest_loader._check_yaml_shape(text)
        if shape is not None:
            return fail(shape[0], shape[1])
        root = yaml.compose(text, Loader=manifest_loader.YAML_LOADER)
    except yaml.YAMLError as exc:
        problem, line = manifest_loader._yaml_problem(exc)
        return fail(f"YAML syntax error: {problem}", line)
    if root is None:
        return fail("tests file is empty")
    duplicates = manifest_loader._find_duplicate_keys(root, "")
    for dup_path, line in duplicates:
        result.diagnostics.append(
            Diagnostic(
                file=rel,
                line=line,
                field=dup_path,
                message=f"duplicate key {dup_path.rpartition('.')[2]!r}",
            )
        )
    if duplicates:
        return result
    manifest_loader._collect_lines(root, "", result.lines)
    try:
        data = manifest_loader.YAML_LOADER("").construct_document(root)
    except yaml.YAMLError as exc:
        problem, line = manifest_loader._yaml_problem(exc)
        return fail(f"YAML error: {problem}", line)
    if not isinstance(data, dict):
        return fail("tests.yaml must be a mapping with apiVersion, kind and cases", 1)
    try:
        result.tests = TestsFile.model_validate(data)
        for index in result.tests.duplicate_names():
            name = result.tests.cases[index].name
            result.diagnostics.append(
                result.diagnostic(f"cases.{index}.name", f"duplicate case name {name!r}")
            )
    except ValidationError as exc:
        for err in exc.errors():
            loc = manifest_loader._loc_to_path(err["loc"], data)
            loc = loc.replace("api_version", "apiVersion")
            result.diagnostics.append(
                Diagnostic(
                    file=rel,
                    message=_message(err),
                    line=result.line_of(loc) if loc else None,
                    field=loc or None,
                )
            )
    return result


def _message(err: object) -> str:
    text = manifest_loader._message(err)
    return text.replace("see docs/manifest.md", "see docs/nf-tests.md")
