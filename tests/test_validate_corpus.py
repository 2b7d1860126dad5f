"""`nfctl validate` on a corpus of broken NF repositories (tests/corpus/<case>/).

Each case is a small repository with an `expect.yaml`:

    description: what is wrong
    kernel: true            # optional: the error comes from BCC or the verifier
    setup: huge-source      # optional: a file generated at test time (see _SETUP)
    error:
      file: prog.c          # relative to the case folder (the repository root)
      message: substring of the message
      line: 7               # optional: where a line applies
      field: spec.attach    # optional: the manifest field path

Every case runs the real CLI (`python -m nfctl validate <copy> -o json`) in a subprocess,
on a copy of the case in a temporary folder (so the case is its own repository root and
path escapes are measured from there). The runs happen in parallel in a thread pool,
started once per module; BCC compiles for real (no mocks).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ci import unavailable
from tests.conftest import _kernel_unavailable_reason, require_kernel

REPO_ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).resolve().parent / "corpus"
RUN_TIMEOUT_SECONDS = 180
MIB = 1 << 20


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    error: dict[str, Any]
    kernel: bool
    setup: str | None

    @classmethod
    def load(cls, folder: Path) -> Case:
        spec = yaml.safe_load((folder / "expect.yaml").read_text())
        return cls(
            name=folder.name,
            description=spec["description"],
            error=spec["error"],
            kernel=bool(spec.get("kernel", False)),
            setup=spec.get("setup"),
        )


def _huge_source(root: Path) -> None:
    body = "int xdp_prog(struct xdp_md *ctx)\n{\n    return XDP_PASS;\n}\n"
    padding = "/* " + "x" * 76 + " */\n"
    (root / "prog.c").write_text(body + padding * (MIB // len(padding) + 1000))


def _huge_manifest(root: Path) -> None:
    manifest = (
        (CORPUS / "missing-function" / "nf.yaml").read_text().replace("xdp_missing", "xdp_prog")
    )
    (root / "nf.yaml").write_text(manifest + "# padding\n" * (MIB // 10 + 1000))


_SETUP: dict[str, Callable[[Path], None]] = {
    "huge-source": _huge_source,
    "huge-manifest": _huge_manifest,
}

CASES = [Case.load(p) for p in sorted(CORPUS.iterdir()) if (p / "expect.yaml").is_file()]
SHADOW_CASES = [
    c.name
    for c in CASES
    if any(
        "/etc/shadow" in (p.read_text(errors="replace") if not p.is_symlink() else os.readlink(p))
        for p in (CORPUS / c.name).rglob("*")
        if p.name != "expect.yaml" and (p.is_symlink() or p.is_file())
    )
]


def materialize(case: Case, dest_parent: Path) -> Path:
    """Copy the case (symlinks kept as symlinks) and generate its setup files."""
    dest = dest_parent / case.name
    shutil.copytree(CORPUS / case.name, dest, symlinks=True)
    (dest / "expect.yaml").unlink()
    if case.setup:
        _SETUP[case.setup](dest)
    return dest


def run_validate(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, NO_COLOR="1", COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "nfctl", "validate", str(path), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_SECONDS,
        check=False,
    )


class Runs:
    """Every corpus case (and the library) validated once, in parallel, on first use."""

    def __init__(self, workdir: Path, kernel: bool) -> None:
        self.workdir = workdir
        self.pool = ThreadPoolExecutor(max_workers=max(2, min(8, (os.cpu_count() or 2) * 2)))
        self.futures: dict[str, Future[subprocess.CompletedProcess[str]]] = {}
        if kernel:  # the slowest run first
            self.futures["bpf-library"] = self.pool.submit(run_validate, REPO_ROOT / "bpf")
        for case in sorted(CASES, key=lambda c: not c.kernel):
            if case.kernel and not kernel:
                continue  # its test skips (or fails under CI) before asking for the result
            path = materialize(case, workdir)
            self.futures[case.name] = self.pool.submit(run_validate, path, "-o", "json")

    def result(self, name: str) -> subprocess.CompletedProcess[str]:
        return self.futures[name].result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    kernel = _kernel_unavailable_reason() is None
    all_runs = Runs(tmp_path_factory.mktemp("corpus"), kernel)
    try:
        yield all_runs
    finally:
        all_runs.close()


def all_errors(report: dict[str, Any]) -> list[dict[str, Any]]:
    errors = list(report["errors"])
    for nf in report["functions"]:
        errors.extend(nf["errors"])
    return errors


def matches(expected: dict[str, Any], error: dict[str, Any]) -> bool:
    if error.get("file") != expected["file"]:
        return False
    if expected["message"] not in error.get("message", ""):
        return False
    if "line" in expected and error.get("line") != expected["line"]:
        return False
    return "field" not in expected or error.get("field") == expected["field"]


def assert_no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    for stream in (proc.stdout, proc.stderr):
        assert "Traceback (most recent call last)" not in stream, stream[-4000:]


def test_corpus_is_big_enough() -> None:
    assert len(CASES) >= 24
    for case in CASES:
        assert set(case.error) >= {"file", "message"}, case.name
        assert case.setup is None or case.setup in _SETUP, case.name


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c.name, marks=[pytest.mark.kernel] if c.kernel else []) for c in CASES],
)
def test_corpus_case(case: Case, runs: Runs) -> None:
    proc = runs.result(case.name)
    assert_no_traceback(proc)
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    report = json.loads(proc.stdout)
    assert report["ok"] is False
    errors = all_errors(report)
    shown = [{k: v for k, v in e.items() if k != "detail"} for e in errors]
    assert any(matches(case.error, e) for e in errors), (
        f"{case.name}: {case.description}\nexpected {case.error}\ngot {shown}"
    )
    for error in errors:  # every error is located and readable
        assert error["file"] and error["message"], error
        assert error.get("severity") == "error", error


@pytest.mark.parametrize("name", SHADOW_CASES)
def test_secret_never_reaches_the_output(name: str, runs: Runs) -> None:
    """Cases that try to read /etc/shadow (include, cflags, symlink, .incbin) must not
    print any of it, in the message or in the compiler/verifier log."""
    if not os.access("/etc/shadow", os.R_OK):
        unavailable("/etc/shadow is not readable by this user")
    case = next(c for c in CASES if c.name == name)
    if case.kernel:
        require_kernel()
    secrets = set()
    for line in Path("/etc/shadow").read_text(errors="replace").splitlines():
        if line.strip():
            secrets.add(line.strip())
            fields = line.split(":")
            if len(fields) > 1 and len(fields[1]) > 3:  # a real password hash
                secrets.add(fields[1])
    assert secrets
    proc = runs.result(name)
    output = proc.stdout + proc.stderr
    leaked = [s for s in secrets if s in output]
    assert not leaked, f"{name} printed lines of /etc/shadow"
    assert proc.returncode == 1


def test_shadow_cases_are_covered() -> None:
    assert {
        "include-absolute",
        "include-via-macro",
        "include-digraph",
        "include-symlink-out",
        "cflags-include-file",
        "inline-asm-incbin",
    } <= set(SHADOW_CASES)


def test_text_output_names_file_line_and_field(tmp_path: Path) -> None:
    case = next(c for c in CASES if c.name == "unknown-field")
    proc = run_validate(materialize(case, tmp_path))
    assert_no_traceback(proc)
    assert proc.returncode == 1
    out = proc.stdout
    assert "✗ (unnamed) nf.yaml" in out
    assert "error nf.yaml:13 (spec.attach.interface): unknown field" in out
    assert "1 network function(s), 1 invalid" in out


def test_text_output_prints_names_that_look_like_markup(tmp_path: Path) -> None:
    case = next(c for c in CASES if c.name == "markup-in-names")
    proc = run_validate(materialize(case, tmp_path))
    assert_no_traceback(proc)
    assert proc.returncode == 1
    assert "nfs[/x]/nf.yaml:13 (spec.[/y]): unknown field" in proc.stdout


def test_missing_path_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    proc = run_validate(tmp_path / "nothing-here", "-o", "json")
    assert_no_traceback(proc)
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["errors"][0]["message"] == "no such file or folder"


def test_empty_folder_is_not_valid(tmp_path: Path) -> None:
    proc = run_validate(tmp_path)
    assert_no_traceback(proc)
    assert proc.returncode == 1
    assert "no NetworkFunction manifests" in proc.stdout


@pytest.mark.kernel
def test_library_validates_and_prints_every_nf(runs: Runs) -> None:
    proc = runs.result("bpf-library")
    assert_no_traceback(proc)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifests = sorted((REPO_ROOT / "bpf").glob("*/nf.yaml"))
    assert len(manifests) >= 4
    for manifest in manifests:
        name = yaml.safe_load(manifest.read_text())["metadata"]["name"]
        line = next((ln for ln in proc.stdout.splitlines() if f" {name} " in ln), None)
        assert line is not None and line.startswith("✓"), (name, proc.stdout)
        assert str(manifest.relative_to(REPO_ROOT)) in line and "build " in line, line
    assert f"{len(manifests)} network function(s), 0 invalid" in proc.stdout
