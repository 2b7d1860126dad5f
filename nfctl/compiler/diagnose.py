"""Turn clang's and the verifier's output into located Diagnostics."""

from __future__ import annotations

import os
import re

from nfctl.compiler.codegen import WRAPPER_FILE
from nfctl.compiler.source_guard import logical_lines
from nfctl.diagnostics import Diagnostic

_CLANG_RE = re.compile(
    r"^(?P<file>[^:\n]+):(?P<line>\d+):(?P<col>\d+): (?P<sev>fatal error|error|warning): "
    r"(?P<msg>.*)$"
)
_VERIFIER_LINE_RE = re.compile(r"^;.*@ (?P<file>[^:\s]+):(?P<line>\d+)\s*$")
_TABLE_DECL_RE = re.compile(r"^\s*BPF_[A-Z0-9_]+\s*\(")
_VERIFIER_NOISE = ("processed ", "HINT:", "bpf: Failed to load program", "verification time")
MAX_DETAIL_CHARS = 16_000


def clang_diagnostics(output: str, main_rel: str, repo_root: str | None) -> list[Diagnostic]:
    """Errors from clang's stderr, with files made repository-relative."""
    found: list[Diagnostic] = []
    lines = output.splitlines()
    for index, raw in enumerate(lines):
        match = _CLANG_RE.match(raw)
        if not match or match.group("sev") == "warning":
            continue
        file = match.group("file")
        message = match.group("msg")
        line: int | None = int(match.group("line"))
        column: int | None = int(match.group("col"))
        if file == WRAPPER_FILE:
            file = main_rel
            line = column = None
            message = (
                f"{message} (in the wrapper nfctl generates around the NF's function: "
                "check that it takes the hook's context pointer and returns an int verdict)"
            )
        elif repo_root and os.path.isabs(file) and file.startswith(repo_root.rstrip("/") + "/"):
            file = os.path.relpath(file, repo_root)
        elif file.startswith("/virtual/"):
            file = main_rel
            line = column = None
        snippet = "\n".join(lines[index + 1 : index + 3]).rstrip()
        found.append(
            Diagnostic(
                file=file,
                line=line,
                column=column,
                message=message,
                detail=snippet or None,
            )
        )
    if not found and output.strip():
        found.append(
            Diagnostic(file=main_rel, message="compilation failed", detail=_tail(output))
        )
    return found


def verifier_diagnostic(log: str, main_rel: str, main_text: str, program: str) -> Diagnostic:
    """The kernel verifier's reason, located at the last source line it annotated."""
    lines = [line for line in log.splitlines() if line.strip()]
    reason = _verifier_reason(lines)
    source_line: int | None = None
    base = os.path.basename(main_rel)
    for line in lines:
        match = _VERIFIER_LINE_RE.match(line)
        if match and match.group("file") == base and int(match.group("line")) > 0:
            source_line = int(match.group("line"))
    if source_line is not None:
        source_line = _undo_table_shift(main_text, source_line)
    return Diagnostic(
        file=main_rel,
        line=source_line,
        message=f"the kernel verifier rejected program {program}: {reason}",
        detail=_tail(log),
    )


def _verifier_reason(lines: list[str]) -> str:
    meaningful = [
        line
        for line in lines
        if not line.startswith(_VERIFIER_NOISE)
        and not line.startswith(";")
        and not re.match(r"^\d+: \(", line)
        and not re.match(r"^\d+: R\d", line)
    ]
    if not meaningful:
        return lines[-1] if lines else "no verifier log"
    return meaningful[-1] if len(meaningful) == 1 else "; ".join(meaningful[-2:])


def _undo_table_shift(main_text: str, reported: int) -> int:
    """BCC's rewriter adds one line per map declaration to the text it compiles, so line
    info after N declarations is N lines late. Find the author's line that maps to it."""
    decl_lines = [n for n, text in logical_lines(main_text) if _TABLE_DECL_RE.match(text)]
    for actual in range(1, reported + 1):
        shift = sum(1 for d in decl_lines if d < actual)
        if actual + shift == reported:
            return actual
    return reported


def _tail(text: str) -> str:
    text = text.strip()
    if len(text) <= MAX_DETAIL_CHARS:
        return text
    return "...\n" + text[-MAX_DETAIL_CHARS:]
