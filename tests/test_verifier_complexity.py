"""A program the verifier rejects for complexity is reported with the NF's name, the limit
it hit, how far the verifier got, and the NF's source line (real kernel verifier)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nfctl.compiler.diagnose import complexity_limit
from tests.helpers import write_nf

REPO_ROOT = Path(__file__).resolve().parents[1]

# Every iteration has a different packet range, so the verifier cannot prune: it gives up
# at the 8,192-jump limit of one path.
LOOP_NF = """\
BPF_ARRAY(acc, u64, 1);
int xdp_spin(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    u64 sum = 0;
    for (u32 i = 0; i < 60000; i++) {
        u8 *p = data + i;
        if ((void *)(p + 1) > end)
            break;
        sum += *p;
    }
    u32 zero = 0;
    u64 *v = acc.lookup(&zero);
    if (v)
        *v = sum;
    return XDP_PASS;
}
"""


def test_limits_are_named_from_the_log() -> None:
    too_large = [
        "BPF program is too large. Processed 1000001 insn",
        "processed 1000001 insns (limit 1000000) max_states_per_insn 4 total_states 9",
    ]
    text = complexity_limit(too_large)
    assert text is not None and "too large" in text and "1,000,001 of at most 1,000,000" in text
    assert complexity_limit(["R1 invalid mem access 'scalar'"]) is None


@pytest.mark.kernel
def test_validate_reports_a_too_complex_loop(tmp_path: Path) -> None:
    write_nf(tmp_path / "nfs", "spin", LOOP_NF, "xdp_spin")
    proc = subprocess.run(
        [sys.executable, "-m", "nfctl", "validate", str(tmp_path), "-o", "json"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert proc.returncode != 0
    [nf] = json.loads(proc.stdout)["functions"]
    [error] = nf["errors"]
    assert nf["name"] == "spin" and error["file"] == "nfs/spin/spin.c"
    assert 7 <= error["line"] <= 11  # inside the loop
    # named as the user knows it: the NF, its function and the line, not nfctl's wrapper
    assert error["message"].startswith(
        f"NF 'spin': the kernel verifier rejected xdp_spin (nfs/spin/spin.c:{error['line']}): "
        "too complex for the verifier"
    ), error["message"]
    assert "jumps is too complex" in error["message"] and "of at most 1,000,000" in error["message"]
    assert "nfctl_" not in error["message"]
