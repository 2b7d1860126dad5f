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

# clang's horizontal whitespace (space, tab, form feed, vertical tab); a line ends at LF,
# CR or CR LF; '#' may be spelled with the '%:' digraph (or the '??=' trigraph, handled
# by scanning a trigraph-replaced variant too).
_HSPACE = " \t\f\v"
_DIRECTIVE_RE = re.compile(rf"^[{_HSPACE}]*(?:#|%:)[{_HSPACE}]*([A-Za-z_][A-Za-z0-9_]*)?(.*)$")
_NEWLINE_RE = re.compile(r"\r\n?")
_SPLICE_RE = re.compile(rf"\\[{_HSPACE}]*$")  # clang splices even with spaces before the newline
_TRIGRAPH_RE = re.compile(r"\?\?([=/'()!<>\-])")
_TRIGRAPHS = {
    "=": "#",
    "/": "\\",
    "'": "^",
    "(": "[",
    ")": "]",
    "!": "|",
    "<": "{",
    ">": "}",
    "-": "~",
}
# Directives that cannot read a file; include is checked; anything else is refused
# (include_next, import, embed, __include_macros, and names clang may add later).
_HARMLESS_DIRECTIVES = frozenset(
    [
        "define",
        "undef",
        "if",
        "ifdef",
        "ifndef",
        "elif",
        "elifdef",
        "elifndef",
        "else",
        "endif",
        "line",
        "error",
        "warning",
        "pragma",
        "ident",
        "sccs",
        "assert",
        "unassert",
    ]
)
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
    # repo-relative path clang opens a header by -> its resolved path in local_files
    aliases: dict[str, str] = field(default_factory=dict)
    diagnostics: list[Diagnostic] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(d.severity == "error" for d in self.diagnostics)


def read_source(source_path: Path, repo_root: Path) -> SourceBundle:
    repo_root = repo_root.resolve()
    main_rel = os.path.relpath(source_path, repo_root)
    bundle = SourceBundle(main_rel=main_rel, main_text="")
    text, problem, line = _read_text(source_path)
    if text is None:
        bundle.diagnostics.append(Diagnostic(file=main_rel, line=line, message=problem or ""))
        return bundle
    bundle.main_text = text
    _check_forbidden(text, main_rel, bundle.diagnostics)
    quote_dir = source_path.parent  # passed to clang as -iquote
    _walk_includes(source_path, (), text, repo_root, bundle, 0, {source_path}, quote_dir)
    return bundle


def _read_text(path: Path) -> tuple[str | None, str | None, int | None]:
    """(text, None, None), or (None, what is wrong, line of the problem if any).

    Checked on the opened file itself, so a swap after the check changes nothing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return None, f"cannot read: {exc.strerror}", None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None, "not a regular file", None
        if info.st_nlink > 1:
            return (
                None,
                f"is a hard link ({info.st_nlink} names for one file), which could be a file "
                "from outside the repository: refused",
                None,
            )
        if info.st_size > MAX_SOURCE_BYTES:
            return None, f"file is {info.st_size} bytes; the limit is {MAX_SOURCE_BYTES}", None
        with os.fdopen(os.dup(fd), "rb") as handle:
            raw = handle.read(MAX_SOURCE_BYTES + 1)
    except OSError as exc:
        return None, f"cannot read: {exc.strerror}", None
    finally:
        os.close(fd)
    if len(raw) > MAX_SOURCE_BYTES:
        return None, f"file is over the limit of {MAX_SOURCE_BYTES} bytes", None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not valid UTF-8 (offset {exc.start})", _line_of(raw[: exc.start])
    if "\x00" in text:
        return None, "contains a NUL byte", _line_of(raw[: raw.index(b"\x00")])
    return text, None, None


def _line_of(prefix: bytes) -> int:
    return len(_NEWLINE_RE.sub("\n", prefix.decode("utf-8", "replace")).split("\n"))


def logical_lines(text: str, trigraphs: bool = False) -> list[tuple[int, str]]:
    """clang's view of the lines: CR, LF and CR LF end a line, (trigraphs replaced when
    asked), backslash-newline joins lines, comments blanked; with original line numbers."""
    text = _NEWLINE_RE.sub("\n", text.removeprefix("\ufeff"))
    if trigraphs:
        text = _TRIGRAPH_RE.sub(lambda m: _TRIGRAPHS[m.group(1)], text)
    joined: list[tuple[int, str]] = []
    buf: list[str] = []
    start = 1
    for number, line in enumerate(text.split("\n"), start=1):
        if not buf:
            start = number
        splice = _SPLICE_RE.search(line)
        if splice:
            buf.append(line[: splice.start()])
            continue
        joined.append((start, "".join(buf) + line))
        buf = []
    if buf:
        joined.append((start, "".join(buf)))
    stripped = strip_comments("\n".join(line for _, line in joined)).split("\n")
    return [(number, line) for (number, _), line in zip(joined, stripped, strict=True)]


def scan_lines(text: str) -> list[tuple[int, str]]:
    """Logical lines as clang reads them with trigraphs off and, where the text has any,
    on: the guard checks both, so it never depends on which mode the compiler uses."""
    lines = logical_lines(text)
    if "??" in text:
        seen = set(lines)
        lines += [item for item in logical_lines(text, trigraphs=True) if item not in seen]
    return lines


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
    for number, line in scan_lines(text):
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
        directive = _DIRECTIVE_RE.match(line)
        is_include = directive is not None and directive.group(1) == "include"
        code = "" if is_include else _LITERAL_RE.sub('""', line)
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
    for number, line in scan_lines(text):
        match = _DIRECTIVE_RE.match(line)
        if not match:
            continue
        directive, operand = match.group(1), match.group(2)

        def fail(message: str, number: int = number) -> None:
            bundle.diagnostics.append(Diagnostic(file=rel, line=number, message=message))

        if directive is None or directive in _HARMLESS_DIRECTIVES:
            continue
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
        inc_rel = os.path.relpath(real, repo_root)
        if local != real:
            bundle.aliases[os.path.relpath(local, repo_root)] = inc_rel
        if real in seen:
            continue
        seen.add(real)
        inc_text, problem, problem_line = _read_text(real)
        if inc_text is None:
            if problem_line is not None:  # its content is wrong: point into it
                bundle.diagnostics.append(
                    Diagnostic(file=inc_rel, line=problem_line, message=problem or "")
                )
            else:  # what the include names is not an acceptable file
                fail(f'#include "{target}": {inc_rel} {problem}')
            continue
        bundle.local_files[inc_rel] = inc_text
        _check_forbidden(inc_text, inc_rel, bundle.diagnostics)
        opened_as = (local,) if local != real else ()
        _walk_includes(real, opened_as, inc_text, repo_root, bundle, depth + 1, seen, quote_dir)
