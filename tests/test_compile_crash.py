"""When LLVM's BPF backend aborts (it kills the compile worker), the user gets the
compiler's own message with the NF's name, not "the compile worker failed (exit N)";
other NFs of the same worker batch are still built (real BCC, real worker)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nfctl.compiler.client import build_request, run_worker
from nfctl.compiler.diagnose import WITHHELD, crash_diagnostic
from tests.helpers import prepare_nf, write_nf

REPO_ROOT = Path(__file__).resolve().parents[1]

# A variable-length array: clang accepts it, the BPF backend aborts the process with
# "LLVM ERROR: Unsupported dynamic stack allocation" (BCC 0.26, LLVM of Debian 12).
VLA_NF = """\
BPF_ARRAY(hits, u64, 1);
int xdp_vla(struct xdp_md *ctx)
{
    u32 n = ctx->ingress_ifindex & 15;
    char buf[n + 1];
    buf[0] = 1;
    return buf[n / 2] ? XDP_PASS : XDP_DROP;
}
"""

GOOD_NF = """\
int xdp_ok(struct xdp_md *ctx)
{
    return XDP_PASS;
}
"""


@pytest.mark.kernel
def test_validate_reports_the_backend_crash_with_the_nf_name(tmp_path: Path) -> None:
    write_nf(tmp_path / "nfs", "vla", VLA_NF, "xdp_vla")
    proc = subprocess.run(
        [sys.executable, "-m", "nfctl", "validate", str(tmp_path), "-o", "json"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    [nf] = json.loads(proc.stdout)["functions"]
    [error] = nf["errors"]
    assert error["file"] == "nfs/vla/vla.c"
    assert error["message"].startswith("NF 'vla': the compiler crashed ("), error
    assert "LLVM ERROR: Unsupported dynamic stack allocation" in error["message"], error
    assert "worker failed" not in error["message"]


@pytest.mark.kernel
def test_a_crash_does_not_fail_the_rest_of_the_batch(tmp_path: Path) -> None:
    for name, source, function in (
        ("first", GOOD_NF, "xdp_ok"),
        ("vla", VLA_NF, "xdp_vla"),
        ("last", GOOD_NF, "xdp_ok"),
    ):
        write_nf(tmp_path, name, source, function)
    requests = [build_request(prepare_nf(tmp_path, n)) for n in ("first", "vla", "last")]
    results = run_worker(requests)  # one worker, one batch: the crash kills it mid-way
    assert [(r.nf, r.ok) for r in results] == [("first", True), ("vla", False), ("last", True)]
    [diagnostic] = results[1].diagnostics
    assert "NF 'vla': the compiler crashed" in diagnostic.message
    assert "Unsupported dynamic stack allocation" in diagnostic.message


def test_crash_text_from_outside_the_repository_is_withheld() -> None:
    output = (
        "/etc/secret.h:3:1: error: api_key = 12345\n"
        "    api_key = 12345\n"
        "nfs/fw/fw.c:4:5: error: something the NF did\n"
        "LLVM ERROR: Cannot select: sdiv\n"
    )
    diagnostic = crash_diagnostic("fw", "nfs/fw/fw.c", "killed by SIGABRT", output, [])
    text = f"{diagnostic.message}\n{diagnostic.detail}"
    assert "12345" not in text and WITHHELD in text
    assert (
        diagnostic.message
        == "NF 'fw': the compiler crashed (killed by SIGABRT): LLVM ERROR: Cannot select: sdiv"
    )
    assert "nfs/fw/fw.c:4:5: error: something the NF did" in text
    empty = crash_diagnostic("fw", "nfs/fw/fw.c", "killed by SIGSEGV", "", [])
    assert (
        empty.message.endswith("(killed by SIGSEGV): it printed nothing") and empty.detail is None
    )
