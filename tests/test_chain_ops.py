"""Every chain change is hitless under a ping flood (the update_loss chain-ops scenarios
at small N): swap the first / middle / last NF of a 5-NF chain, add, remove, reorder,
with a sentinel NF at the end that must count every packet that crossed the hook. The
detach-then-attach baseline shows the measurement does catch bypasses."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.update_loss import CHAIN_OPS, load_chain, run_chain_ops
from nfctl.datapath.datapath import Datapath
from nfctl.manifest.model import Hook
from nfctl.netns import VethPair

pytestmark = pytest.mark.kernel


@pytest.mark.parametrize("hook", [Hook.TC_INGRESS, Hook.TC_EGRESS, Hook.XDP], ids=lambda h: h.value)
def test_chain_ops_lose_and_bypass_nothing(
    datapath: Datapath, veth: VethPair, tmp_path: Path, hook: Hook
) -> None:
    chain = load_chain(datapath, tmp_path / "repo", hook)
    for op in CHAIN_OPS:
        result = run_chain_ops(datapath, veth, hook, chain, op, 10, detach=False)
        assert result["sent"] > 100, result
        assert (result["lost"], result["bypassed"]) == (0, 0), result
        udp = result["udp"]
        assert udp["sent"] > 0 and (udp["lost"], udp["gaps"]) == (0, 0), result
        assert result["attach"] in ("tcx", "xdp-link (native)")
    baseline = run_chain_ops(datapath, veth, hook, chain, "add", 10, detach=True)
    assert baseline["bypassed"] > 0, baseline
