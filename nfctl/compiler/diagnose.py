"""Turn clang's and the verifier's output into located Diagnostics."""

from __future__ import annotations

import os
import re

from nfctl.compiler.codegen import WRAPPER_FILE
from nfctl.compiler.source_guard import strip_comments
from nfctl.diagnostics import Diagnostic

_CLANG_RE = re.compile(
    r"^(?P<file>[^:\n]+):(?P<line>\d+):(?P<col>\d+): (?P<sev>fatal error|error|warning): "
    r"(?P<msg>.*)$"
)
_VERIFIER_LINE_RE = re.compile(r"^;.*@ (?P<file>[^:\s]+):(?P<line>\d+)\s*$")
# Any line of clang's output that names a location (errors, notes, "In file included from")
_LOCATION_RE = re.compile(
    r"^(?:(?P<file>[^:\n]+):(?P<line>\d+):(?P<col>\d+): "
    r"(?P<sev>fatal error|error|warning|note|remark): "
    r"|(?:In file included from |\s+from )(?P<ifile>[^:\n]+):(?P<iline>\d+)[:,])"
)
WITHHELD = "(text from a file outside the repository withheld)"
_DIRECTIVE_START_RE = re.compile(r"^[ \t]*(#|%:)")
_VERIFIER_NOISE = ("processed ", "HINT:", "bpf: Failed to load program", "verification time")
MAX_DETAIL_CHARS = 16_000


def scrub_clang_output(output: str, public: list[str]) -> str:
    """clang's output without text quoted from files outside public (the repository
    snapshot and the kernel headers): a message located in another file keeps its
    location and severity, loses its text, and the source lines it quotes are dropped."""
    kept: list[str] = []
    showing = True
    for raw in output.splitlines():
        location = _LOCATION_RE.match(raw)
        if location is None:
            if showing:
                kept.append(raw)
            continue
        if location.group("ifile"):
            kept.append(raw)  # names a file and line, quotes nothing
            continue
        showing = _is_public(location.group("file"), public)
        if showing:
            kept.append(raw)
            continue
        file, line, column = location.group("file", "line", "col")
        kept.append(f"{file}:{line}:{column}: {location.group('sev')}: {WITHHELD}")
    return "\n".join(kept)


def _is_public(file: str, public: list[str]) -> bool:
    if file in ("<stdin>", "<built-in>", "<command line>", "<scratch space>", WRAPPER_FILE):
        return True
    if file.startswith("/virtual/"):
        return True  # BCC's own in-memory headers and the generated program
    path = os.path.normpath(file)
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in public)


def clang_diagnostics(
    output: str, main_rel: str, repo_root: str | None, public: list[str] | None = None
) -> list[Diagnostic]:
    """Errors from clang's stderr, with files made repository-relative; with public given,
    nothing is quoted from other files (scrub_clang_output)."""
    found: list[Diagnostic] = []
    if public is not None:
        output = scrub_clang_output(output, [*public, main_rel])
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
        found.append(Diagnostic(file=main_rel, message="compilation failed", detail=_tail(output)))
    return found


def scrub_verifier_log(log: str, repo_files: list[str]) -> str:
    """The verifier log without source lines (`; text @ file:line`, from BTF line info)
    of files that are not in the repository snapshot."""
    names = {os.path.basename(f) for f in repo_files} | set(repo_files)
    kept = []
    for raw in log.splitlines():
        match = _VERIFIER_LINE_RE.match(raw)
        if match and match.group("file") not in names | {WRAPPER_FILE}:
            kept.append(f"; {WITHHELD} @ {match.group('file')}:{match.group('line')}")
        else:
            kept.append(raw)
    return "\n".join(kept)


def verifier_diagnostic(
    log: str,
    main_rel: str,
    main_text: str,
    function: str,
    repo_files: list[str] | None = None,
    *,
    nf: str,
) -> Diagnostic:
    """The kernel verifier's reason, located at the last source line it annotated, named
    by the NF (and the author's function), never by the program name nfctl generates."""
    if repo_files is not None:
        log = scrub_verifier_log(log, [*repo_files, main_rel])
    lines = [line for line in log.splitlines() if line.strip()]
    reason = _verifier_reason(lines)
    source_line: int | None = None
    base = os.path.basename(main_rel)
    for line in lines:
        match = _VERIFIER_LINE_RE.match(line)
        if match and match.group("file") == base and int(match.group("line")) > 0:
            source_line = int(match.group("line"))
    if source_line is not None:
        source_line = _undo_rewriter_shift(main_text, source_line)
    complexity = complexity_limit(lines)
    if complexity is not None:
        reason = f"too complex for the verifier: {complexity}"
    where = f"{main_rel}:{source_line}" if source_line is not None else main_rel
    return Diagnostic(
        file=main_rel,
        line=source_line,
        message=f"NF {nf!r}: the kernel verifier rejected {function} ({where}): {reason}",
        detail=_tail(log),
    )


_CRASH_HEADLINE_RE = re.compile(r"LLVM ERROR: |error in backend|fatal error|Cannot select")
MAX_CRASH_LINES = 30
MAX_CRASH_LINE_CHARS = 400


def crash_diagnostic(
    nf: str, main_rel: str, how: str, output: str, public: list[str]
) -> Diagnostic:
    """The compiler's own last words when it killed the worker (an LLVM backend abort):
    its message in the headline and the last lines as detail, with text quoted from files
    outside public removed as for clang's errors."""
    lines = [
        line if len(line) <= MAX_CRASH_LINE_CHARS else line[:MAX_CRASH_LINE_CHARS] + " ..."
        for line in scrub_clang_output(output, [*public, main_rel]).splitlines()
        if line.strip()
    ]
    headline = next((line for line in lines if line.startswith("LLVM ERROR: ")), None)
    headline = headline or next((line for line in lines if _CRASH_HEADLINE_RE.search(line)), None)
    headline = headline or (lines[-1] if lines else "it printed nothing")
    tail = lines[-MAX_CRASH_LINES:]
    return Diagnostic(
        file=main_rel,
        message=f"NF {nf!r}: the compiler crashed ({how}): {headline.strip()}",
        detail="\n".join(tail) or None,
    )


_COMPLEXITY_RE = re.compile(
    r"(The sequence of \d+ jumps is too complex|BPF program is too large|"
    r"infinite loop detected|back-edge from insn|too many states|"
    r"combined stack size|loop is not bounded)",
    re.IGNORECASE,
)
_PROCESSED_RE = re.compile(r"^processed (\d+) insns \(limit (\d+)\)")


def complexity_limit(lines: list[str]) -> str | None:
    """For a rejection by the verifier's complexity limits (E2BIG, "Argument list too
    long"): which limit was hit and how far it got; None for other rejections."""
    hit = next((m.group(0) for line in lines if (m := _COMPLEXITY_RE.search(line))), None)
    if hit is None:
        return None
    processed = next((m for line in lines if (m := _PROCESSED_RE.match(line))), None)
    progress = (
        f"; it processed {int(processed.group(1)):,} of at most {int(processed.group(2)):,} "
        "instructions"
        if processed
        else ""
    )
    return (
        f"{hit}{progress} (bound loops by a small constant, or split the work across "
        "NFs or packets)"
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


def _undo_rewriter_shift(main_text: str, reported: int) -> int:
    """BCC's rewriter inserts one line before every declaration of a function that has a
    body, in the main file (a section attribute before programs, ``always_inline`` before
    static helpers; prototypes of such functions count too), so the line info of a line
    is late by the number of those declarations starting at or before it. Map a line
    from the verifier log back to the author's line."""
    starts = function_start_lines(main_text)
    for actual in range(1, reported + 1):
        shifted = actual + sum(1 for start in starts if start <= actual)
        if shifted >= reported:
            # '>' only when the log names an inserted line: it belongs to the next function
            return actual
    return reported


def function_start_lines(text: str) -> list[int]:
    """Lines where top-level declarations of functions defined in text begin: every
    definition, and every prototype of a function the text defines.

    A lexical scan: comments, strings and preprocessor lines are ignored; a top-level
    declaration is a function when it ends in a parameter list (optionally followed by
    __attribute__((...))) and holds no '=' before it; '{' after it opens the body."""
    code = _blank_directives(strip_comments(text))
    definitions: list[tuple[int, str]] = []
    prototypes: list[tuple[int, str]] = []
    depth = 0
    decl_start: int | None = None
    line = 1
    decl_line = 1
    i, n = 0, len(code)
    while i < n:
        ch = code[i]
        if ch == "\n":
            line += 1
        elif ch in "\"'":
            j = i + 1
            while j < n and code[j] != ch and code[j] != "\n":
                j += 2 if code[j] == "\\" else 1
            if decl_start is None and depth == 0:
                decl_start, decl_line = i, line
            line += code.count("\n", i, j)  # escaped newlines inside the literal
            i = j if j < n and code[j] == "\n" else j + 1
            continue
        elif depth == 0 and not ch.isspace():
            if ch in ";{":
                name = _function_name(code[decl_start:i]) if decl_start is not None else None
                if name is not None:
                    (prototypes if ch == ";" else definitions).append((decl_line, name))
                decl_start = None
                depth = 1 if ch == "{" else 0
            elif decl_start is None:
                decl_start, decl_line = i, line
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        i += 1
    defined = {name for _, name in definitions}
    return sorted(
        [start for start, _ in definitions]
        + [start for start, name in prototypes if name in defined]
    )


_ATTRIBUTE_TAIL_RE = re.compile(r"(__attribute__|__attribute)\s*$")
_NAME_TAIL_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*$")


def _function_name(header: str) -> str | None:
    """The declared name when header (a top-level declaration up to its ';' or '{')
    declares a function, else None."""
    header = header.strip()
    while header.endswith(")"):
        opening = _matching_open_paren(header)
        if opening is None:
            return None
        before = header[:opening]
        if _ATTRIBUTE_TAIL_RE.search(before):
            header = _ATTRIBUTE_TAIL_RE.sub("", before).strip()
            continue
        match = _NAME_TAIL_RE.search(before)
        if "=" in before or match is None or match.group(1) in _NOT_FUNCTION_NAMES:
            return None
        return match.group(1)
    return None


# "BPF_HASH(name, ...);" and friends look like prototypes but are macro calls
_NOT_FUNCTION_NAMES = frozenset({"sizeof", "typeof", "__typeof__", "_Static_assert"})


def _matching_open_paren(text: str) -> int | None:
    depth = 0
    for index in range(len(text) - 1, -1, -1):
        if text[index] == ")":
            depth += 1
        elif text[index] == "(":
            depth -= 1
            if depth == 0:
                return index
    return None


def _blank_directives(text: str) -> str:
    """Replace preprocessor lines (with their continuations) by empty lines."""
    out: list[str] = []
    continued = False
    for raw in text.split("\n"):
        is_directive = continued or _DIRECTIVE_START_RE.match(raw) is not None
        out.append("" if is_directive else raw)
        continued = is_directive and raw.endswith("\\")
    return "\n".join(out)


def _tail(text: str) -> str:
    text = text.strip()
    if len(text) <= MAX_DETAIL_CHARS:
        return text
    return "...\n" + text[-MAX_DETAIL_CHARS:]
