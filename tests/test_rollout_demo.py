"""The lab's rollout demo step end to end: real agents in namespaces, the real controller
driving the rollout, the lab's real Prometheus answering the PromQL gate, real traffic."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.lab.demo import Demo
from nfctl.lab.lab import REPO_ROOT, Lab
from nfctl.lab.prometheus import PrometheusClient
from tests.ci import unavailable
from tests.conftest import require_kernel

pytestmark = pytest.mark.kernel


def seed_ratelimit(work: Path) -> None:
    """Only the NF the rollout step judges (a smaller lab compiles faster)."""
    shutil.copytree(REPO_ROOT / "bpf" / "ratelimit", work / "nfs" / "ratelimit")
    manifest = work / "nfs" / "ratelimit" / "nf.yaml"
    manifest.write_text(
        manifest.read_text().replace("rate_pps: 1000, burst: 2000", "rate_pps: 20000, burst: 40000")
    )


@pytest.fixture
def lab() -> Iterator[Lab]:
    require_kernel()
    if shutil.which("prometheus") is None:
        unavailable("prometheus is not installed (sudo make setup installs it)")
    the_lab = Lab(f"rag{uuid.uuid4().hex[:5]}", say=lambda _: None)
    try:
        the_lab.up(3, subnet=180 + int(uuid.uuid4().hex[:2], 16) % 60, seed=seed_ratelimit)
        yield the_lab
    finally:
        the_lab.down(quiet=True)


def test_harmful_commit_stops_at_the_canary_and_good_one_completes(lab: Lab) -> None:
    assert lab.topo is not None
    names = [n.name for n in lab.topo.nodes]
    # the lab's Prometheus scrapes every agent (by node name) and the controller
    prometheus = PrometheusClient(lab.prometheus_url)
    assert prometheus.ready()
    scraped: dict[str, bool] = {}
    for _ in range(100):
        scraped = prometheus.targets_up("nfctl-agent")
        if scraped == {n: True for n in names}:
            break
        time.sleep(0.2)
    assert scraped == {n: True for n in names}
    controller: list[bool] = []
    for _ in range(100):  # scraped on its own schedule: the first scrape may still be due
        controller = list(prometheus.targets_up("nfctl-controller").values())
        if controller == [True]:
            break
        time.sleep(0.2)
    assert controller == [True]

    with open("/dev/null", "w") as quiet:
        demo = Demo(lab, Console(file=quiet))
        assert demo.step(1, "rollout", demo.rollout), demo.results[-1].detail

    with lab.fleet() as stub:
        rollouts = list(stub.ListRollouts(pb.ListRolloutsRequest(limit=10), timeout=10).rollouts)
    finished = sorted(rollouts, key=lambda r: r.started_at)
    first, bad, good = finished[-3:]
    assert first.state == "Completed" and "first RolloutPolicy" in first.message
    assert bad.state == "RolledBack"
    assert list(bad.waves[0].nodes) == [names[0]]  # the canary
    assert all(w.state == "Pending" for w in bad.waves[1:])
    verdict = next(g for g in bad.waves[0].gates if g.kind == "verdict")
    assert not verdict.ok and verdict.value > verdict.baseline + 0.05, verdict
    assert good.state == "Completed" and [w.state for w in good.waves] == ["Passed", "Passed"]
    promql = [g for w in good.waves for g in w.gates if g.kind == "promql"]
    assert promql and all(g.ok and g.value == len(names) for g in promql), promql
    # every node runs the good revision; only the canary ever ran the bad one
    assert {n.status.last_applied_revision for n in lab.nodes()} == {good.revision}
    with lab.fleet() as stub:
        events = stub.GetHistory(pb.GetHistoryRequest(revision=bad.revision, limit=500)).events
    assert {e.node for e in events if e.reason == "Applied"} == {names[0]}
