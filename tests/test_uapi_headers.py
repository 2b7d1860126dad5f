"""`nfctl validate` reports compile time per NF and warns about internal kernel headers
where UAPI ones would do; the NF library itself uses only UAPI headers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nfctl.uapi_headers import internal_header_warnings
from tests.helpers import write_nf

REPO_ROOT = Path(__file__).resolve().parents[1]

SLOW_NF = """\
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/if_vlan.h>

int xdp_main(struct xdp_md *ctx)
{
    struct ethhdr *eth = (void *)(long)ctx->data;
    if ((void *)(eth + 1) > (void *)(long)ctx->data_end)
        return XDP_PASS;
    return eth->h_proto == htons(ETH_P_IP) ? XDP_PASS : XDP_PASS;
}
"""


def test_internal_headers_with_a_uapi_twin_are_named_with_their_line() -> None:
    found = internal_header_warnings("nfs/slow/slow.c", SLOW_NF)
    assert [(d.line, d.severity) for d in found] == [(1, "warning"), (2, "warning")]
    assert "<uapi/linux/ip.h>" in found[1].message  # if_vlan.h has no UAPI twin: no warning


def _validate(path: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "nfctl", "validate", str(path), "-o", "json"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


@pytest.mark.kernel
def test_validate_warns_and_reports_compile_time(tmp_path: Path) -> None:
    write_nf(tmp_path / "nfs", "slow", SLOW_NF, "xdp_main")
    report = _validate(tmp_path)
    [nf] = report["functions"]
    assert nf["ok"] and nf["compileSeconds"] > 0
    warnings = report["warnings"]
    assert isinstance(warnings, list)
    assert {(w["file"], w["line"]) for w in warnings} == {
        ("nfs/slow/slow.c", 1),
        ("nfs/slow/slow.c", 2),
    }


@pytest.mark.kernel
def test_library_uses_only_uapi_headers() -> None:
    report = _validate(REPO_ROOT / "bpf")
    assert report["ok"] and report["warnings"] == []
    functions = report["functions"]
    assert isinstance(functions, list) and len(functions) == 4
    assert all(f["compileSeconds"] > 0 for f in functions)
