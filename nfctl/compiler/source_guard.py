"""Read an NF's C source and every local header it includes, refusing anything that could
make the compiler read files outside the repository (absolute or escaping includes,
includes through macros, symlinks leading out) or that fights nfctl's own map pinning.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from nfctl.diagnostics import Diagnostic
from nfctl.manifest.paths import PathEscapeError, resolve_inside

MAX_SOURCE_BYTES = 1 << 20
MAX_INCLUDE_DEPTH = 16

# '#' or the '%:' digraph, optional spaces, then the directive name.
_DIRECTIVE_RE = re.compile(r"^[ \t]*(?:#|%:)[ \t]*(include_next|include|import|embed)\b(.*)$")
_QUOTED_RE = re.compile(r'^\s*"([^"\n]*)"\s*$')
_ANGLED_RE = re.compile(r"^\s*<([^>\n]*)>\s*$")
_FORBIDDEN_MACROS = {
    "BPF_TABLE_PINNED": "maps are pinned by nfctl; declare them with BPF_HASH, BPF_ARRAY, ...",
    "BPF_QUEUESTACK_PINNED": "maps are pinned by nfctl; declare them without a pin path",
    "BPF_TABLE_SHARED": "maps shared between programs are not supported; pin per NF is automatic",
    "BPF_TABLE_PUBLIC": "maps shared between programs are not supported; pin per NF is automatic",
}
_FORBIDDEN_RE = re.compile(r"\b(" + "|".join(_FORBIDDEN_MACROS) + r")\b")
_EXTERN_TABLE_RE = re.compile(r"\bBPF_TABLE\s*\(\s*\"extern\"")
# Inline assembly can pull any file into the program (`.incbin "/etc/shadow"`), out of
# reach of the include checks: NF sources may not use it (kernel headers still may).
_INLINE_ASM_RE = re.compile(r"\b(asm|__asm|__asm__|asm_[A-Za-z0-9_]+)\b")
_LITERAL_RE = re.compile(r"\"(?:[^\"\\\n]|\\.)*\"|'(?:[^'\\\n]|\\.)*'")


@dataclass
class SourceBundle:
    """The NF's main source and the repo-local headers it pulls in, as read once."""

    main_rel: str
    main_text: str
    local_files: dict[str, str] = field(default_factory=dict)  # repo-relative path -> text
    diagnostics: list[Diagnostic] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(d.severity == "error" for d in self.diagnostics)


def read_source(source_path: Path, repo_root: Path) -> SourceBundle:
    repo_root = repo_root.resolve()
    main_rel = os.path.relpath(source_path, repo_root)
    bundle = SourceBundle(main_rel=main_rel, main_text="")
    text = _read_text(source_path, main_rel, bundle.diagnostics)
    if text is None:
        return bundle
    bundle.main_text = text
    _check_forbidden(text, main_rel, bundle.diagnostics)
    quote_dir = source_path.parent  # passed to clang as -iquote
    _walk_includes(source_path, (), text, repo_root, bundle, 0, {source_path}, quote_dir)
    return bundle


def _read_text(path: Path, rel: str, diags: list[Diagnostic]) -> str | None:
    try:
        size = path.stat().st_size
    except OSError as exc:
        diags.append(Diagnostic(file=rel, message=f"cannot read: {exc.strerror}"))
        return None
    if size > MAX_SOURCE_BYTES:
        diags.append(
            Diagnostic(file=rel, message=f"file is {size} bytes; the limit is {MAX_SOURCE_BYTES}")
        )
        return None
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            diags.append(Diagnostic(file=rel, message="not a regular file"))
            return None
        raw = path.read_bytes()
    except OSError as exc:
        diags.append(Diagnostic(file=rel, message=f"cannot read: {exc.strerror}"))
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        diags.append(
            Diagnostic(file=rel, line=line, message=f"not valid UTF-8 (offset {exc.start})")
        )
        return None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        diags.append(Diagnostic(file=rel, line=line, message="contains a NUL byte"))
        return None
    return text


def logical_lines(text: str) -> list[tuple[int, str]]:
    """Join backslash continuations and blank out comments, keeping original line numbers."""
    stripped = strip_comments(text)
    out: list[tuple[int, str]] = []
    buf = ""
    start = 0
    for number, line in enumerate(stripped.split("\n"), start=1):
        if not buf:
            start = number
        if line.endswith("\\"):
            buf += line[:-1]
            continue
        out.append((start, buf + line))
        buf = ""
    if buf:
        out.append((start, buf))
    return out


def strip_comments(text: str) -> str:
    result: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in "\"'":
            j = i + 1
            while j < n and text[j] != ch and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            result.append(text[i : j + 1])
            i = j + 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            result.append(" ")
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            result.append(" " + "\n" * text.count("\n", i, j))
            i = j
        else:
            result.append(ch)
            i += 1
    return "".join(result)


def _check_forbidden(text: str, rel: str, diags: list[Diagnostic]) -> None:
    for number, line in logical_lines(text):
        match = _FORBIDDEN_RE.search(line)
        if match:
            diags.append(
                Diagnostic(file=rel, line=number, message=_FORBIDDEN_MACROS[match.group(1)])
            )
        if _EXTERN_TABLE_RE.search(line):
            diags.append(
                Diagnostic(file=rel, line=number, message="extern tables are not supported")
            )
        # (#include <asm/...> names a header folder, not inline assembly)
        code = "" if _DIRECTIVE_RE.match(line) else _LITERAL_RE.sub('""', line)
        asm = _INLINE_ASM_RE.search(code)
        if asm:
            diags.append(
                Diagnostic(
                    file=rel,
                    line=number,
                    message=(
                        f"inline assembly is not allowed in NF sources ({asm.group(1)!r}): "
                        "it can read files into the program"
                    ),
                )
            )


def _walk_includes(
    path: Path,
    aliases: tuple[Path, ...],
    text: str,
    repo_root: Path,
    bundle: SourceBundle,
    depth: int,
    seen: set[Path],
    quote_dir: Path,
) -> None:
    rel = os.path.relpath(path, repo_root)
    if depth > MAX_INCLUDE_DEPTH:
        bundle.diagnostics.append(Diagnostic(file=rel, message="includes nested too deeply"))
        return
    for number, line in logical_lines(text):
        match = _DIRECTIVE_RE.match(line)
        if not match:
            continue
        directive, operand = match.group(1), match.group(2)

        def fail(message: str, number: int = number) -> None:
            bundle.diagnostics.append(Diagnostic(file=rel, line=number, message=message))

        if directive != "include":
            fail(f"#{directive} is not allowed in NF sources (only #include)")
            continue
        quoted = _QUOTED_RE.match(operand)
        angled = _ANGLED_RE.match(operand)
        if not quoted and not angled:
            fail('#include must name a literal "file.h" or <file.h> (no macros)')
            continue
        target = (quoted or angled).group(1)  # type: ignore[union-attr]
        if not target or target.startswith("/") or "\\" in target:
            fail(f"#include of {target!r}: absolute paths are not allowed")
            continue
        parts = Path(target).parts
        if angled:
            if ".." in parts:
                fail(f"#include <{target}>: '..' is not allowed in system includes")
            continue  # resolved against the kernel headers only
        # clang looks next to the including file (by the path it opened it with, which
        # may differ from the resolved one), then in the -iquote folder: check them all
        folders = [p.parent for p in (*aliases, path)] + [quote_dir]
        found = [f / target for f in dict.fromkeys(folders) if os.path.lexists(f / target)]
        if not found:
            if ".." in parts:
                fail(f'#include "{target}": not found inside the repository')
            continue  # falls through to the kernel headers, like <...>
        try:
            real = resolve_inside(found[0], repo_root)
            for other in found[1:]:
                resolve_inside(other, repo_root)
        except PathEscapeError as exc:
            fail(f'#include "{target}": {exc}')
            continue
        local = found[0]
        if real in seen:
            continue
        seen.add(real)
        inc_rel = os.path.relpath(real, repo_root)
        inc_text = _read_text(real, inc_rel, bundle.diagnostics)
        if inc_text is None:
            continue
        bundle.local_files[inc_rel] = inc_text
        _check_forbidden(inc_text, inc_rel, bundle.diagnostics)
        opened_as = (local,) if local != real else ()
        _walk_includes(real, opened_as, inc_text, repo_root, bundle, depth + 1, seen, quote_dir)
