"""Pure parts of the compile confinement: what diagnostics may quote, and how the view
reproduces the host's paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nfctl.compiler import sandbox
from nfctl.compiler.diagnose import (
    WITHHELD,
    clang_diagnostics,
    scrub_clang_output,
    scrub_verifier_log,
    verifier_diagnostic,
)

SECRET = "hunter2_confidential"

CLANG_OUTPUT = f"""In file included from /virtual/main.c:40:
In file included from /repo/nfs/fw/fw.c:2:
/etc/secret.conf:1:5: error: unknown type name '{SECRET}'
password {SECRET}
    ^
/etc/secret.conf:1:5: note: did you mean '{SECRET}x'?
/repo/nfs/fw/fw.c:7:12: error: use of undeclared identifier 'ETH_HLEN_TYPO'
    return ETH_HLEN_TYPO;
           ^
/usr/src/linux-headers-6.1/include/linux/if_ether.h:3:1: warning: kernel header line
#define ETH_ALEN 6
"""


def test_clang_text_located_outside_the_repository_is_withheld() -> None:
    public = ["/repo/nfs/fw/fw.c", "/usr/src/linux-headers-6.1"]
    scrubbed = scrub_clang_output(CLANG_OUTPUT, public)
    assert SECRET not in scrubbed
    assert f"/etc/secret.conf:1:5: error: {WITHHELD}" in scrubbed
    assert "In file included from /repo/nfs/fw/fw.c:2:" in scrubbed
    # repository and kernel-header diagnostics keep their text and the lines they quote
    assert "return ETH_HLEN_TYPO;" in scrubbed and "#define ETH_ALEN 6" in scrubbed


def test_clang_diagnostics_quote_nothing_from_outside() -> None:
    found = clang_diagnostics(CLANG_OUTPUT, "fw.c", "/repo/nfs/fw", ["/repo/nfs/fw/fw.c"])
    assert SECRET not in repr(found)
    assert ("fw.c", 7) in [(d.file, d.line) for d in found]
    assert any(d.file == "/etc/secret.conf" and d.message == WITHHELD for d in found)


def test_verifier_source_lines_of_other_files_are_withheld() -> None:
    log = (
        f"; int x = {SECRET}; @ secret.h:3\n"
        "0: (b7) r0 = 2\n"
        "; return XDP_PASS; @ fw.c:9\n"
        "1: (95) exit\n"
        "R0 !read_ok\n"
    )
    scrubbed = scrub_verifier_log(log, ["fw.c", "lib/parse.h"])
    assert SECRET not in scrubbed and "return XDP_PASS; @ fw.c:9" in scrubbed
    diagnostic = verifier_diagnostic(log, "fw.c", "int x;\n", "fw", ["lib/parse.h"], nf="fw")
    assert SECRET not in repr(diagnostic)


def test_view_reproduces_symlinks_and_binds_real_paths(tmp_path: Path) -> None:
    real = tmp_path / "usr" / "src" / "headers"
    real.mkdir(parents=True)
    (tmp_path / "lib").symlink_to("usr/src")
    build = tmp_path / "modules" / "build"
    build.parent.mkdir()
    build.symlink_to(tmp_path / "lib" / "headers")
    view = sandbox.View(read_only=[str(build), str(real / "inner")], writable=[])
    (real / "inner").mkdir()
    plan = sandbox._gather(view)
    try:
        assert [b[0] for b in plan.binds] == [str(real)]  # inner is inside: bound once
        assert plan.symlinks == {
            str(build): str(tmp_path / "lib" / "headers"),
            str(tmp_path / "lib"): "usr/src",
        }
    finally:
        for fd in plan.fds.values():
            os.close(fd)


def test_a_snapshot_inside_a_host_folder_is_refused(tmp_path: Path) -> None:
    view = sandbox.View(files={str(tmp_path / "repo" / "a.c"): ""}, read_only=[str(tmp_path)])
    with pytest.raises(sandbox.ConfinementError, match="overlaps"):
        sandbox._gather(view)


def test_opt_out_is_explicit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(sandbox.ConfinementError, match="--unconfined-compile"):
        sandbox.worker_prefix()
    sandbox.allow_unconfined(True)
    try:
        assert sandbox.worker_prefix() == []
        assert sandbox.worker_env({})[sandbox.UNCONFINED_ENV] == "1"
    finally:
        sandbox.allow_unconfined(False)
    assert sandbox.UNCONFINED_ENV not in sandbox.worker_env({})
