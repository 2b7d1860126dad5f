"""Verdict counters through a real agent: /metrics and the NF status, and monitor mode
switched to enforce by a commit, hitlessly, with real traffic."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.agent_harness import AgentProcess, metric_samples, nfctl, set_blocked_v4, wait_until
from tests.test_agent_features import Lab
from tests.test_agent_features import lab as lab_fixture
from tests.test_datapath import PingFlood

pytestmark = [pytest.mark.kernel, pytest.mark.e2e]
lab = lab_fixture  # the agent features' lab: a veth pair, a Git daemon, agents


def with_mode(lab: Lab, mode: str) -> None:
    path = "nfs/blocklist/nf.yaml"
    text = lab.repo.read(path).replace("  mode: monitor\n", "").replace("  mode: enforce\n", "")
    lab.repo.write(path, text.replace("  attach:\n", f"  mode: {mode}\n  attach:\n", 1))


def packets(agent: AgentProcess, lab: Lab, verdict: str, mode: str) -> float:
    text = agent.http_get("/metrics")[1]
    wanted = {
        "nf": "blocklist",
        "hook": "xdp",
        "interface": lab.veth.a_if,
        "verdict": verdict,
        "mode": mode,
    }
    found = [v for labels, v in metric_samples(text, "nfctl_nf_packets_total") if labels == wanted]
    assert len(found) == 1, text
    return found[0]


def verdicts(agent: AgentProcess) -> dict[str, Any]:
    return dict(agent.nf("blocklist").get("verdicts") or {})


def test_monitor_counts_then_enforce_drops_hitlessly(lab: Lab) -> None:
    blocked = lab.blocked_source()
    lab.repo.add_library_nf("blocklist")
    set_blocked_v4(lab.repo, ["203.0.113.7", blocked])  # the first kept: tests.yaml uses it
    with_mode(lab, "monitor")
    c1 = lab.repo.commit("blocklist in monitor mode")
    agent = lab.agent()
    agent.wait_ready(c1)
    assert agent.nf("blocklist")["mode"] == "monitor"

    assert lab.ping_from(blocked, 5) == 5  # would be dropped, goes on
    assert packets(agent, lab, "drop", "monitor") == 5
    assert packets(agent, lab, "drop", "enforce") == 0
    wait_until(
        lambda: verdicts(agent).get("monitor", {}).get("dropped") == 5, 15, what="status counts"
    )
    assert verdicts(agent)["enforce"]["dropped"] == 0
    assert verdicts(agent)["chainErrors"] == 0
    table = nfctl("status", "--state-dir", str(lab.state_dir))
    row = next(line for line in table.stdout.splitlines() if line.strip().startswith("blocklist"))
    assert re.search(r"\d+/5/0/0 \(monitor\)", row), table.stdout

    with_mode(lab, "enforce")
    c2 = lab.repo.commit("blocklist enforced")
    with PingFlood(lab.veth, count=1500) as flood:  # allowed traffic across the swap
        agent.wait_ready(c2)
    sent, received = flood.result()
    assert sent == received == 1500
    assert agent.nf("blocklist")["mode"] == "enforce"
    assert lab.ping_from(blocked, 4) == 0
    assert packets(agent, lab, "drop", "enforce") == 4
    assert packets(agent, lab, "drop", "monitor") == 5  # kept across the version swap
    assert packets(agent, lab, "pass", "enforce") + packets(agent, lab, "pass", "monitor") >= 1500
    errors = metric_samples(agent.http_get("/metrics")[1], "nfctl_nf_chain_errors_total")
    assert [v for labels, v in errors if labels["nf"] == "blocklist"] == [0.0]
    wait_until(
        lambda: verdicts(agent).get("enforce", {}).get("dropped") == 4, 15, what="status counts"
    )
