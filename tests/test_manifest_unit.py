"""Unit tests (no kernel, no BCC) of the manifest model and loader, the path checks, the
C source guard and the verifier line correction."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from nfctl.compiler.codegen import WRAPPER_FILE
from nfctl.compiler.diagnose import (
    _undo_rewriter_shift,
    clang_diagnostics,
    function_start_lines,
    verifier_diagnostic,
)
from nfctl.compiler.source_guard import (
    MAX_INCLUDE_DEPTH,
    MAX_SOURCE_BYTES,
    SourceBundle,
    logical_lines,
    read_source,
    strip_comments,
)
from nfctl.manifest.loader import MAX_MANIFEST_BYTES, LoadedManifest, load_manifest
from nfctl.manifest.model import (
    Hook,
    IncompatibleMapPolicy,
    MapEntry,
    NetworkFunction,
    XdpMode,
    validate_cflag,
    validate_interface_glob,
)
from nfctl.manifest.paths import PathEscapeError, resolve_inside
from nfctl.manifest.repo import scan_repo

PROG = "int xdp_prog(struct xdp_md *ctx)\n{\n    return XDP_PASS;\n}\n"

# Line numbers of the fields in MANIFEST (the tests below rely on them)
MANIFEST = """\
apiVersion: nfctl.io/v1alpha1
kind: NetworkFunction
metadata:
  name: {name}
spec:
  version: 1.0.0
  program:
    source: prog.c
    function: xdp_prog
  attach:
    hook: xdp
    interfaces: ["eth*"]
"""


def write_repo(root: Path, files: Mapping[str, str | bytes]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return root


def load(tmp_path: Path, manifest: str | bytes, extra: dict[str, str | bytes] | None = None) -> Any:
    files: dict[str, str | bytes] = {"nf.yaml": manifest, "prog.c": PROG, **(extra or {})}
    write_repo(tmp_path, files)
    return load_manifest(tmp_path / "nf.yaml", tmp_path)


def base(name: str = "test-nf", tail: str = "") -> str:
    return MANIFEST.format(name=name) + tail


def errors(loaded: LoadedManifest) -> list[tuple[str | None, int | None, str]]:
    return [(d.field, d.line, d.message) for d in loaded.diagnostics]


def only_error(loaded: LoadedManifest) -> tuple[str | None, int | None, str]:
    assert len(loaded.diagnostics) == 1, errors(loaded)
    return errors(loaded)[0]


# ---- loader: a valid manifest and the defaults ---------------------------------------------


def test_valid_manifest_loads_with_defaults(tmp_path: Path) -> None:
    loaded = load(tmp_path, base(tail="  maps:\n    stats: {}\n"))
    assert loaded.ok, errors(loaded)
    nf = loaded.nf
    assert nf is not None and nf.name == "test-nf"
    assert loaded.rel_path == "nf.yaml"
    assert loaded.source_path == (tmp_path / "prog.c").resolve()
    assert nf.spec.attach.hook is Hook.XDP
    assert nf.spec.attach.priority == 1000
    assert nf.spec.attach.xdp_mode is XdpMode.AUTO
    assert nf.spec.attach.exclude_interfaces == []
    assert nf.spec.program.cflags == []
    assert nf.spec.suspend is False
    assert nf.spec.node_selector == {}
    stats = nf.spec.maps["stats"]
    assert stats.managed is False and stats.entries == [] and stats.export == []
    assert stats.on_incompatible is IncompatibleMapPolicy.MIGRATE
    assert loaded.line_of("spec.attach.hook") == 11
    assert loaded.line_of("spec.attach.interfaces.0") == 12
    assert loaded.line_of("spec.attach.nothere.deeper") == 10  # falls back to the parent


def test_library_manifests_are_valid() -> None:
    root = Path(__file__).resolve().parents[1]
    scan = scan_repo(root / "bpf", repo_root=root)
    assert len(scan.manifests) >= 4
    for manifest in scan.manifests:
        assert manifest.ok, (manifest.rel_path, manifest.diagnostics)


# ---- loader: error field paths and lines ---------------------------------------------------


@pytest.mark.parametrize(
    ("tail", "field", "line", "message"),
    [
        ("    priority: high\n", "spec.attach.priority", 13, "valid integer"),
        ("    priority: -1\n", "spec.attach.priority", 13, "greater than or equal to 0"),
        ("    priority: 65536\n", "spec.attach.priority", 13, "less than or equal to 65535"),
        ("    xdpMode: turbo\n", "spec.attach.xdpMode", 13, "'auto', 'native' or 'generic'"),
        ("    excludeInterfaces: [lo, 'a b']\n", "spec.attach.excludeInterfaces.1", 13, "glob"),
        ("    bogus: 1\n", "spec.attach.bogus", 13, "unknown field"),
        (
            "  maps:\n    m:\n      managed: true\n      entries:\n        - key: 1\n"
            "          value: 2\n          extra: 3\n",
            "spec.maps.m.entries.0.extra",
            19,
            "unknown field",
        ),
        (
            "  maps:\n    m:\n      managed: true\n      entries:\n        - {key: 1}\n",
            "spec.maps.m.entries.0.value",
            17,
            "required field is missing",
        ),
        (
            "  maps:\n    m:\n      onIncompatible: keep\n",
            "spec.maps.m.onIncompatible",
            15,
            "'migrate', 'recreate' or 'fail'",
        ),
        ("  maps:\n    bad-name: {}\n", "spec.maps", 13, "not a C identifier"),
        ("  nodeSelector: {role: 'a b'}\n", "spec.nodeSelector", 13, "invalid label value"),
    ],
)
def test_schema_errors_name_field_and_line(
    tmp_path: Path, tail: str, field: str, line: int, message: str
) -> None:
    got_field, got_line, got_message = only_error(load(tmp_path, base(tail=tail)))
    assert (got_field, got_line) == (field, line)
    assert message in got_message


@pytest.mark.parametrize(
    ("old", "new", "field", "line", "message"),
    [
        ("name: test-nf", "name: Test_NF", "metadata.name", 4, "invalid name"),
        ("version: 1.0.0", "version: v1", "spec.version", 6, "semantic version"),
        ("version: 1.0.0", "version: 1.0", "spec.version", 6, "valid string"),
        ("source: prog.c", "source: prog.h", "spec.program.source", 8, "ending in .c"),
        ("source: prog.c", "source: /abs/prog.c", "spec.program.source", 8, "not absolute"),
        ("source: prog.c", "source: 'a\\\\b.c'", "spec.program.source", 8, "plain relative"),
        ("function: xdp_prog", "function: nf_prog", "spec.program.function", 9, "reserved"),
        ("function: xdp_prog", "function: 2fast", "spec.program.function", 9, "C identifier"),
        ("hook: xdp", "hook: XDP", "spec.attach.hook", 11, "'xdp', 'tc-ingress' or"),
        ('interfaces: ["eth*"]', "interfaces: []", "spec.attach.interfaces", 12, "at least 1"),
        ("apiVersion: nfctl.io/v1alpha1", "apiVersion: v1", "apiVersion", 1, "nfctl.io/v1alpha1"),
        ("kind: NetworkFunction", "kind: Pod", "kind", 2, "'NetworkFunction'"),
    ],
)
def test_field_errors(
    tmp_path: Path, old: str, new: str, field: str, line: int, message: str
) -> None:
    manifest = base()
    assert old in manifest
    got_field, got_line, got_message = only_error(load(tmp_path, manifest.replace(old, new)))
    assert (got_field, got_line) == (field, line)
    assert message in got_message


def test_missing_field_points_at_its_parent(tmp_path: Path) -> None:
    loaded = load(tmp_path, base().replace("    function: xdp_prog\n", ""))
    assert only_error(loaded) == ("spec.program.function", 7, "required field is missing")


def test_several_errors_are_all_reported(tmp_path: Path) -> None:
    manifest = base().replace("hook: xdp", "hook: tc").replace("name: test-nf", "name: A")
    loaded = load(tmp_path, manifest)
    assert {d.field for d in loaded.diagnostics} == {"metadata.name", "spec.attach.hook"}
    assert loaded.nf is None and not loaded.ok


# ---- loader: YAML-level problems -----------------------------------------------------------


@pytest.mark.parametrize(
    ("manifest", "line", "message"),
    [
        (base().replace('["eth*"]', '["eth*"'), 13, "YAML syntax error"),
        (base(tail="  version: 2.0.0\n"), 13, "duplicate key 'version'"),
        (base() + "---\n" + base(), 14, "several YAML documents"),
        ("", None, "manifest is empty"),
        ("# only a comment\n", None, "manifest is empty"),
        ("- a\n- b\n", 1, "must be a YAML mapping"),
        ("just a string\n", 1, "must be a YAML mapping"),
        (base(tail="  description: !custom x\n"), 13, "YAML error"),
        (base(tail="  description: &d [*d]\n"), 13, "refers to itself"),
        (base(tail="  description: *nothing\n"), 13, "refers to itself or to no anchor"),
        (base(tail="  description: " + "[" * 100 + "]" * 100 + "\n"), 13, "deeper than 64"),
    ],
)
def test_yaml_problems(tmp_path: Path, manifest: str, line: int | None, message: str) -> None:
    _, got_line, got_message = only_error(load(tmp_path, manifest))
    assert message in got_message
    assert got_line == line


def test_duplicate_key_names_its_path(tmp_path: Path) -> None:
    loaded = load(tmp_path, base().replace("    hook: xdp\n", "    hook: xdp\n    hook: xdp\n"))
    assert only_error(loaded) == ("spec.attach.hook", 12, "duplicate key 'hook'")


def test_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    lol = "x:\n  a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lol += f"  {name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]\n"
    _, _, message = only_error(load(tmp_path, base() + lol))
    assert "expands to more than" in message


def test_small_aliases_are_fine(tmp_path: Path) -> None:
    loaded = load(tmp_path, base(tail="  maps:\n    a: &m {onIncompatible: fail}\n    b: *m\n"))
    assert loaded.ok, errors(loaded)
    assert loaded.nf is not None
    assert loaded.nf.spec.maps["b"].on_incompatible is IncompatibleMapPolicy.FAIL


def test_non_utf8_manifest_names_the_line(tmp_path: Path) -> None:
    raw = base().replace("version: 1.0.0", "version: 1.0.0 # caf\xe9").encode("latin-1")
    _, line, message = only_error(load(tmp_path, raw))
    assert line == 6 and "not valid UTF-8" in message and "0xe9" in message


def test_huge_manifest_is_refused_before_parsing(tmp_path: Path) -> None:
    _, _, message = only_error(load(tmp_path, base() + "#\n" * (MAX_MANIFEST_BYTES // 2 + 1)))
    assert f"the limit is {MAX_MANIFEST_BYTES} bytes" in message


# ---- map entries ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        1,
        True,
        "10.0.0.1",
        "2001:db8::1",
        "10.0.0.0/8",
        "aa:bb:cc:dd:ee:ff",
        [1, 2],
        {"a": {"b": 1}},
    ],
)
def test_entry_shapes_accepted(value: Any) -> None:
    assert MapEntry.model_validate({"key": value, "value": value}).key == value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (1.5, "floating point"),
        (None, "must not be empty (null)"),
        ([1, None], "must not be empty (null)"),
        ({"a": 0.5}, "floating point"),
        ({"not-c": 1}, "is not a C identifier"),
        ({1: 1}, "is not a C identifier"),
        (b"\x00", "unsupported value"),
        ({1, 2}, "unsupported value"),
        ([[[[[[[[[[1]]]]]]]]]], "nested too deeply"),
    ],
)
def test_entry_shapes_refused(value: Any, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        MapEntry.model_validate({"key": 0, "value": value})
    assert message in str(info.value)


def test_entries_need_a_managed_map(tmp_path: Path) -> None:
    tail = "  maps:\n    m:\n      entries:\n        - {key: 1, value: 1}\n"
    assert only_error(load(tmp_path, base(tail=tail)))[:2] == ("spec.maps.m", 14)


def test_entry_error_points_at_the_entry_line(tmp_path: Path) -> None:
    tail = (
        "  maps:\n    m:\n      managed: true\n      entries:\n"
        "        - {key: 1, value: 1}\n        - {key: 2, value: 2.5}\n"
    )
    assert only_error(load(tmp_path, base(tail=tail)))[:2] == ("spec.maps.m.entries.1.value", 18)


def test_metric_export_rules() -> None:
    data = {
        "apiVersion": "nfctl.io/v1alpha1",
        "kind": "NetworkFunction",
        "metadata": {"name": "m"},
        "spec": {
            "version": "1.0.0",
            "program": {"source": "p.c", "function": "f"},
            "attach": {"hook": "tc-egress", "interfaces": ["eth0"]},
            "maps": {"stats": {"export": [{"metric": "nfctl_nf_x_total", "type": "gauge"}]}},
        },
    }
    nf = NetworkFunction.model_validate(data)
    export = nf.spec.maps["stats"].export[0]
    assert (export.type, export.field, export.help) == ("gauge", None, "")
    data["spec"]["maps"]["stats"]["export"][0]["metric"] = "packets_total"  # type: ignore[index]
    with pytest.raises(ValidationError, match="nfctl_nf_"):
        NetworkFunction.model_validate(data)


def test_xdp_mode_only_on_xdp(tmp_path: Path) -> None:
    manifest = base().replace("hook: xdp", "hook: tc-ingress") + "    xdpMode: native\n"
    field, line, message = only_error(load(tmp_path, manifest))
    assert (field, line) == ("spec.attach", 10) and "xdpMode applies only" in message


# ---- interface globs and cflags ------------------------------------------------------------


@pytest.mark.parametrize(
    "glob", ["eth0", "eth*", "veth?", "en[0-9]*", "eth[!0]", "bond0.100", "br-lan", "wg_0", "*"]
)
def test_valid_globs(glob: str) -> None:
    assert validate_interface_glob(glob) == glob


@pytest.mark.parametrize(
    ("glob", "message"),
    [
        ("", "invalid interface glob"),
        ("eth/0", "invalid interface glob"),
        ("eth 0", "invalid interface glob"),
        ("eth:1", "invalid interface glob"),
        ("../x", "invalid interface glob"),
        ("e" * 65, "invalid interface glob"),
        ("eth[0-9", "unclosed '['"),
        ("eth[[0]]", "nested '['"),
    ],
)
def test_invalid_globs(glob: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        validate_interface_glob(glob)


@pytest.mark.parametrize(
    "flag",
    ["-DMAX_RULES=65536", "-DDEBUG", '-DNAME="x"', "-DX=(1<<4)", "-UDEBUG", "-Wno-unused-value"],
)
def test_allowed_cflags(flag: str) -> None:
    assert validate_cflag(flag) == flag


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("-I/etc", "is not allowed"),
        ("-I", "is not allowed"),
        ("-include", "is not allowed"),
        ("/etc/shadow", "is not allowed"),
        ("-isystem/etc", "is not allowed"),
        ("-iquote/etc", "is not allowed"),
        ("-idirafter/etc", "is not allowed"),
        ("--sysroot=/", "is not allowed"),
        ("-fplugin=/tmp/x.so", "is not allowed"),
        ("-Xclang", "is not allowed"),
        ("-Werror", "is not allowed"),
        ("-D X", "is not allowed"),
        ("-D1X", "is not allowed"),
        ("-DX=a b", "is not allowed"),
        ("-DX=$(cat /etc/shadow)", "is not allowed"),
        ("-DNFCTL_MAPS_DIR=x", "reserved for nfctl"),
        ("-UNFCTL_MAPS_DIR", "reserved for nfctl"),
        ("-DX=__asm__", "inline assembly"),
        ("-DX=asm_inline", "inline assembly"),
    ],
)
def test_refused_cflags(flag: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_cflag(flag)


def test_cflag_error_names_the_item(tmp_path: Path) -> None:
    manifest = base().replace(
        "    function: xdp_prog\n", '    function: xdp_prog\n    cflags: ["-DA=1", "-I/etc"]\n'
    )
    field, line, _ = only_error(load(tmp_path, manifest))
    assert (field, line) == ("spec.program.cflags.1", 10)


# ---- paths ---------------------------------------------------------------------------------


def test_resolve_inside(tmp_path: Path) -> None:
    repo = write_repo(tmp_path / "repo", {"a/b.c": "", "c.c": ""})
    outside = write_repo(tmp_path / "outside", {"secret.c": "x"})
    assert resolve_inside(repo / "a" / "b.c", repo) == (repo / "a" / "b.c").resolve()
    assert resolve_inside(repo / "a" / ".." / "c.c", repo) == (repo / "c.c").resolve()
    assert resolve_inside(repo, repo) == repo.resolve()
    with pytest.raises(PathEscapeError, match="points outside the repository"):
        resolve_inside(repo / ".." / "outside" / "secret.c", repo)
    with pytest.raises(PathEscapeError, match="points outside the repository"):
        resolve_inside(Path("/etc/passwd"), repo)
    os.symlink(outside / "secret.c", repo / "link.c")
    with pytest.raises(PathEscapeError, match="symlink leading outside"):
        resolve_inside(repo / "link.c", repo)
    os.symlink(outside, repo / "linkdir")
    with pytest.raises(PathEscapeError, match="symlink leading outside"):
        resolve_inside(repo / "linkdir" / "secret.c", repo)
    os.symlink("a/b.c", repo / "inner.c")  # a symlink that stays inside is fine
    assert resolve_inside(repo / "inner.c", repo) == (repo / "a" / "b.c").resolve()


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("../../etc/passwd.c", "points outside the repository"),
        ("sub/../../outside.c", "points outside the repository"),
        ("nothere.c", "not found next to the manifest"),
        ("/etc/passwd.c", "not absolute"),
    ],
)
def test_source_path_checks(tmp_path: Path, source: str, message: str) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (tmp_path / "outside.c").write_text(PROG)
    loaded = load(repo, base().replace("source: prog.c", f"source: {source}"))
    field, line, got = only_error(loaded)
    assert (field, line) == ("spec.program.source", 8)
    assert message in got


def test_source_symlink_out(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_repo(repo, {"nf.yaml": base()})
    os.symlink("/etc/passwd", repo / "prog.c")
    loaded = load_manifest(repo / "nf.yaml", repo)
    assert only_error(loaded)[2] == "'prog.c' is a symlink leading outside the repository"


def test_manifest_symlink_out(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (tmp_path / "real.yaml").write_text(base())
    os.symlink(tmp_path / "real.yaml", repo / "nf.yaml")
    scan = scan_repo(repo, repo_root=repo)
    assert "symlink leading outside" in only_error(scan.manifests[0])[2]


def test_scan_repo(tmp_path: Path) -> None:
    repo = write_repo(
        tmp_path / "repo",
        {
            "a/nf.yaml": base("same"),
            "a/prog.c": PROG,
            "b/nf.yml": base("same"),
            "b/prog.c": PROG,
            "c/nf.yaml": base("other"),
            "c/prog.c": PROG,
            ".git/nf.yaml": "not: scanned",
            "node_modules/x/nf.yaml": "not: scanned",
        },
    )
    outside = write_repo(tmp_path / "outside", {"nf.yaml": base("outside"), "prog.c": PROG})
    os.symlink(outside, repo / "linked")  # never walked into
    scan = scan_repo(repo, repo_root=repo)
    assert [m.rel_path for m in scan.manifests] == ["a/nf.yaml", "b/nf.yml", "c/nf.yaml"]
    dup = [d for m in scan.manifests for d in m.diagnostics]
    assert {d.file for d in dup} == {"a/nf.yaml", "b/nf.yml"}
    assert all(d.field == "metadata.name" and d.line == 4 for d in dup)
    assert "duplicate NetworkFunction name 'same'" in dup[0].message
    assert [m.nf.name for m in scan.valid if m.nf] == ["other"]


def test_scan_repo_empty_and_missing(tmp_path: Path) -> None:
    scan = scan_repo(tmp_path, repo_root=tmp_path)
    assert scan.manifests == [] and scan.diagnostics[0].severity == "warning"
    scan = scan_repo(tmp_path / "nope")
    assert scan.diagnostics[0].message == "no such file or folder"


# ---- source guard --------------------------------------------------------------------------


def guard(
    tmp_path: Path, source: str | bytes, extra: Mapping[str, str | bytes] | None = None
) -> SourceBundle:
    repo = write_repo(tmp_path / "repo", {"prog.c": source, **(extra or {})})
    return read_source((repo / "prog.c").resolve(), repo)


def problems(bundle: SourceBundle) -> list[tuple[str, int | None, str]]:
    return [(d.file, d.line, d.message) for d in bundle.diagnostics]


def test_strip_comments_keeps_lines_and_strings() -> None:
    text = 'a /* x\n y */ b // c\n"/* s */" \'"\'\n'
    stripped = strip_comments(text)
    assert stripped.count("\n") == text.count("\n")
    assert "x" not in stripped and " c" not in stripped
    assert '"/* s */"' in stripped and "'\"'" in stripped


def test_logical_lines_join_continuations() -> None:
    text = '#inc\\\nlude "a.h"\nint x; /* multi\nline */ int y;\n'
    assert logical_lines(text) == [(1, '#include "a.h"'), (3, "int x;  "), (4, " int y;"), (5, "")]


@pytest.mark.parametrize(
    "source",
    [
        '// #include "/etc/shadow"\n',
        '/* #include "/etc/shadow" */\n',
        '/*\n#include "/etc/shadow"\n*/\n',
        'const char *s = "#include \\"/etc/shadow\\"";\n',
        "#include <linux/if_ether.h>\n#include <asm/byteorder.h>\n",
        '#include "linux/if_ether.h"  /* not in the repo: a kernel header */\n',
    ],
)
def test_guard_accepts(tmp_path: Path, source: str) -> None:
    bundle = guard(tmp_path, source + PROG)
    assert bundle.ok, problems(bundle)


@pytest.mark.parametrize(
    ("source", "line", "message"),
    [
        ('#include "/etc/shadow"\n', 1, "absolute paths are not allowed"),
        ('  #  include "/etc/shadow"\n', 1, "absolute paths are not allowed"),
        ('/* c */ #include "/etc/shadow"\n', 1, "absolute paths are not allowed"),
        ("#include </etc/shadow>\n", 1, "absolute paths are not allowed"),
        ('%:include "/etc/shadow"\n', 1, "absolute paths are not allowed"),
        ('%: include "/etc/shadow"\n', 1, "absolute paths are not allowed"),
        ('\n#inc\\\nlude "/etc/shadow"\n', 2, "absolute paths are not allowed"),
        ('#include \\\n  "/etc/shadow"\n', 1, "absolute paths are not allowed"),
        ('/* a */\n#define F "/etc/shadow"\n#include F\n', 3, "no macros"),
        ("#include <../../etc/shadow>\n", 1, "'..' is not allowed"),
        ('#include "../../../../../../../../../../../../../../../../etc/passwd"\n', 1, "outside"),
        ('#include "../nothere.h"\n', 1, "not found inside the repository"),
        ('#include_next "a.h"\n', 1, "#include_next is not allowed"),
        ('#import "a.h"\n', 1, "#import is not allowed"),
        ('#embed "/etc/shadow"\n', 1, "#embed is not allowed"),
        ('\nBPF_TABLE_PINNED("hash", u32, u32, m, 8, "/sys/fs/bpf/m");\n', 2, "pinned by nfctl"),
        ('BPF_TABLE_SHARED("hash", u32, u32, m, 8);\n', 1, "not supported"),
        ('BPF_TABLE("extern", u32, u32, m, 8);\n', 1, "extern tables"),
        ('void f(void) { asm volatile(".incbin \\"/etc/shadow\\""); }\n', 1, "inline assembly"),
        ("#define A __asm__\n", 1, "inline assembly"),
        ('void f(void) { asm_inline("nop"); }\n', 1, "inline assembly"),
    ],
)
def test_guard_refuses(tmp_path: Path, source: str, line: int, message: str) -> None:
    bundle = guard(tmp_path, source + PROG)
    assert not bundle.ok
    assert any(f == "prog.c" and n == line and message in m for f, n, m in problems(bundle)), (
        problems(bundle)
    )


def test_guard_ignores_asm_in_strings_and_names(tmp_path: Path) -> None:
    source = 'const char *s = "asm volatile";\nint plasma, spasm, asmx, xasm; // asm\n'
    bundle = guard(tmp_path, source + PROG)
    assert bundle.ok, problems(bundle)


def test_quoted_includes_are_read_from_the_repo(tmp_path: Path) -> None:
    bundle = guard(
        tmp_path,
        '#include "lib/a.h"\n#include "lib/a.h"\n' + PROG,
        {
            "lib/a.h": '#pragma once\n#include "b.h"\n#include "../common.h"\n',
            "lib/b.h": "#define B 1\n",
            "common.h": '#include "lib/a.h"\n',  # a cycle: read once
        },
    )
    assert bundle.ok, problems(bundle)
    assert set(bundle.local_files) == {"lib/a.h", "lib/b.h", "common.h"}
    assert bundle.local_files["lib/b.h"] == "#define B 1\n"


def test_problems_in_headers_name_the_header(tmp_path: Path) -> None:
    bundle = guard(
        tmp_path,
        '#include "lib/a.h"\n' + PROG,
        {"lib/a.h": '\n\n#include "../../../../../../../../../../../../../../../etc/passwd"\n'},
    )
    assert ("lib/a.h", 3) in [(f, n) for f, n, _ in problems(bundle)]


def test_header_symlink_out_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t")
    repo = write_repo(tmp_path / "repo", {"prog.c": '#include "s.h"\n' + PROG})
    os.symlink(secret, repo / "s.h")
    bundle = read_source((repo / "prog.c").resolve(), repo)
    assert any("symlink leading outside" in m for _, _, m in problems(bundle))
    assert "s3cr3t" not in str(problems(bundle)) and bundle.local_files == {}


def test_header_opened_through_a_symlink_checks_both_folders(tmp_path: Path) -> None:
    """clang looks next to the path it opened (the symlink), the guard must too."""
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t")
    repo = write_repo(
        tmp_path / "repo",
        {"prog.c": '#include "sub/alias.h"\n' + PROG, "real/real.h": '#include "evil.h"\n'},
    )
    (repo / "sub").mkdir()
    os.symlink("../real/real.h", repo / "sub" / "alias.h")
    os.symlink(secret, repo / "sub" / "evil.h")
    bundle = read_source((repo / "prog.c").resolve(), repo)
    assert any("evil.h" in m and "outside" in m for _, _, m in problems(bundle)), problems(bundle)


def test_unreadable_sources(tmp_path: Path) -> None:
    bundle = guard(tmp_path, b"int x;\n/* caf\xe9 */\n")
    assert problems(bundle) == [("prog.c", 2, "not valid UTF-8 (offset 13)")]
    bundle = guard(tmp_path / "nul", "int x;\n\x00\n")
    assert problems(bundle) == [("prog.c", 2, "contains a NUL byte")]
    bundle = guard(tmp_path / "big", "//" + "x" * MAX_SOURCE_BYTES + "\n")
    assert "the limit is" in problems(bundle)[0][2]
    bundle = guard(tmp_path / "dir", '#include "lib"\n', {"lib/x.h": ""})
    assert problems(bundle) == [("prog.c", 1, '#include "lib": lib not a regular file')]


def test_include_depth_is_bounded(tmp_path: Path) -> None:
    chain = {f"h{i}.h": f'#include "h{i + 1}.h"\n' for i in range(MAX_INCLUDE_DEPTH + 3)}
    bundle = guard(tmp_path, '#include "h0.h"\n' + PROG, chain)
    assert any("nested too deeply" in m for _, _, m in problems(bundle))


# ---- verifier and clang diagnostics --------------------------------------------------------


SHIFT_SOURCE = textwrap.dedent(
    """\
    /* 1 */
    #define CHECK(p, e) do { if ((p) > (e)) return 1; } while (0)
    struct pair { u32 a; u32 b; };
    BPF_ARRAY(counts, struct pair, 4);
    static __always_inline int helper(void *d, void *e);
    extern int undefined_elsewhere(int x);

    static __always_inline
    int other(void *d,
              void *e)
    {
        const char *s = "{ } {";
        return 0;
    }

    static __always_inline int helper(void *d, void *e)
    {
        CHECK(d, e);
        return 0;
    }

    struct pair table_init = { .a = 1 };

    int xdp_prog(struct xdp_md *ctx) __attribute__((unused))
    {
        return helper((void *)(long)ctx->data, (void *)(long)ctx->data_end);
    }
    """
)


def test_function_start_lines() -> None:
    # the prototype of helper (5) counts, the extern prototype (6) and the map do not
    assert function_start_lines(SHIFT_SOURCE) == [5, 8, 16, 24]


@pytest.mark.parametrize(
    ("reported", "actual"),
    [
        (3, 3),  # before any function: no shift
        (6, 5),  # the prototype's own line
        (7, 6),
        (10, 8),  # the first line of other's signature
        (13, 11),
        (20, 17),  # inside helper: shifted by its prototype, other and itself
        (21, 18),
        (28, 24),
        (30, 26),
        (9, 8),  # the attribute line BCC inserted before 'other' maps to its first line
    ],
)
def test_verifier_lines_are_shifted_back(reported: int, actual: int) -> None:
    assert _undo_rewriter_shift(SHIFT_SOURCE, reported) == actual


def test_no_functions_no_shift() -> None:
    assert _undo_rewriter_shift("BPF_ARRAY(a, u32, 1);\n", 5) == 5


def test_verifier_diagnostic() -> None:
    source = "BPF_ARRAY(a, u64, 1);\n\nint xdp_prog(struct xdp_md *ctx)\n{\n    return 0;\n}\n"
    log = textwrap.dedent(
        f"""\
        bpf: Failed to load program: Permission denied
        0: R1=ctx() R10=fp0
        ;  @ {WRAPPER_FILE}:2
        0: (bf) r6 = r1
        ;  @ prog.c:5
        1: (61) r2 = *(u32 *)(r6 +0)
        ;  @ other.h:9
        ;  @ prog.c:6
        2: (71) r1 = *(u8 *)(r7 +14)
        invalid access to packet, off=14 size=1, R7(id=0,off=14,r=1)
        R7 offset is outside of the packet
        processed 3 insns (limit 1000000) max_states_per_insn 0 total_states 0
        """
    )
    diag = verifier_diagnostic(log, "nfs/fw/prog.c", source, "xdp_prog", nf="fw")
    assert diag.file == "nfs/fw/prog.c"
    assert diag.line == 5  # prog.c:6 in the log, one function definition before it
    assert diag.message.startswith(
        "NF 'fw': the kernel verifier rejected xdp_prog (nfs/fw/prog.c:5): invalid access"
    )
    assert "R7 offset is outside of the packet" in diag.message
    assert diag.detail is not None and "processed 3 insns" in diag.detail


def test_verifier_diagnostic_without_line_info() -> None:
    diag = verifier_diagnostic(
        "bpf: Failed to load program: Invalid argument\nbad\n", "p.c", "", "f", nf="p"
    )
    assert diag.line is None and diag.message == "NF 'p': the kernel verifier rejected f (p.c): bad"


def test_clang_diagnostics() -> None:
    output = textwrap.dedent(
        f"""\
        nfs/fw/prog.c:6:27: error: expected ';' at end of declaration
            int verdict = XDP_PASS
                                  ^
        /repo/nfs/fw/lib/parse.h:4:12: error: use of undeclared identifier 'X'
        prog.c:2:1: warning: unused
        {WRAPPER_FILE}:2:17: error: too many arguments to function call
        /virtual/main.c:9:1: error: something in the preamble
        1 error generated.
        """
    )
    diags = clang_diagnostics(output, "nfs/fw/prog.c", "/repo")
    assert [(d.file, d.line, d.column) for d in diags] == [
        ("nfs/fw/prog.c", 6, 27),
        ("nfs/fw/lib/parse.h", 4, 12),
        ("nfs/fw/prog.c", None, None),
        ("nfs/fw/prog.c", None, None),
    ]
    assert diags[0].detail is not None and "XDP_PASS" in diags[0].detail
    assert "wrapper nfctl generates" in diags[2].message
    fallback = clang_diagnostics("LLVM ERROR: out of memory\n", "p.c", None)
    assert [(d.file, d.message) for d in fallback] == [("p.c", "compilation failed")]
