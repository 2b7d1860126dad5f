"""What the rollout engine costs the controller's event loop at fleet scale.

A controller with N nodes (5 NFs each with verdict counters, as agents report them) and a
real Git repository runs a real rollout engine on an in-memory SQLite store; a rollout is
started and its first wave (the canary, 1% of the fleet) kept in progress. Measured:
- tick_progressing_ms: one engine step while the wave progresses (wall time, including the
  store read and write it makes in a thread);
- evaluate_ms: one gate evaluation (verdict figures of the judged NF on every node, the
  wave's drop ratio against every node not yet updated);
- baseline_all_views_ms (same run): a view with every verdict of every node, what a step
  cost before steps were narrowed to the wave's nodes.

    python -m benchmarks.rollout_engine --nodes 10000 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import machine, summary_ms
from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller.fleet import Fleet
from nfctl.controller.node import NodeEntry
from nfctl.controller.rollout import gates as gate_eval
from nfctl.controller.rollout.engine import RolloutEngine
from nfctl.controller.rollout.gitrepo import RepoMirror
from nfctl.controller.rollout.plan import node_view
from nfctl.controller.rollout.state import Detail
from nfctl.controller.store import ControllerStore
from nfctl.manifest.rollout import VerdictGate

POLICY = """apiVersion: nfctl.io/v1alpha1
kind: RolloutPolicy
metadata: {name: fleet}
spec:
  interval: 1s
  waves:
    - {name: canary, count: 1%, bake: 60s}
    - {name: rest}
  gates:
    - {kind: verdict, nf: nf1, maxIncrease: 0.01}
"""


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def commit(repo: Path, name: str, text: str) -> str:
    (repo / name).write_text(text)
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-q", "-m", name)
    return git(repo, "rev-parse", "HEAD")


def status(index: int, revision: str) -> pb.NodeStatus:
    return pb.NodeStatus(
        node=f"node-{index:05d}",
        labels={"role": "worker", "zone": f"z{index % 8}"},
        last_applied_revision=revision,
        conditions=[pb.Condition(type="Ready", status=True)],
        functions=[
            pb.FunctionStatus(
                name=f"nf{k}",
                state="Applied",
                revision=revision,
                verdicts=pb.VerdictTotals(
                    enforce=pb.Verdicts(passed=1_000_000 + index, dropped=1000 + k)
                ),
            )
            for k in range(5)
        ],
    )


async def measure(nodes: int, repeats: int, folder: Path) -> dict[str, Any]:
    repo = folder / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    c1 = commit(repo, "rollout.yaml", POLICY)
    store = ControllerStore(Path(":memory:"))
    fleet = Fleet(store)
    for i in range(nodes):
        entry = NodeEntry(f"node-{i:05d}", status(i, c1), 0.0, time.time())
        entry.holder = "elsewhere"  # connected, through some replica
        fleet.nodes[entry.name] = entry

    async def send(entries: list[NodeEntry], command: pb.Command) -> tuple[list[str], list[str]]:
        return [e.name for e in entries], []

    mirror = RepoMirror(str(repo), "main", folder / "mirror")
    engine = RolloutEngine(fleet, mirror, send, fetch_interval=3600.0)
    await engine.tick()  # the first policy: completed at once
    c2 = commit(repo, "nf.txt", "v2\n")
    engine.poke()
    await engine.tick()  # starts the rollout: waves chosen, the canary approved
    active = await engine.observer.active()
    assert active is not None and active[0].revision == c2, active
    ticks = []
    for _ in range(repeats):
        start = time.perf_counter()
        await engine.tick()
        ticks.append(time.perf_counter() - start)
    rollout, detail = active
    wave = list(rollout.waves[0].nodes)
    gate = VerdictGate.model_validate({"kind": "verdict", "nf": "nf1", "maxIncrease": 0.01})
    evaluations = []
    for _ in range(repeats):
        start = time.perf_counter()
        figures = await engine.observer.figures(engine.observer.fleet_view(), {"nf1"})
        others = [n for n in fleet.nodes if n not in set(wave)]
        gate_eval.verdict_gate(gate, wave, others, figures, figures, {}, figures, time.time())
        evaluations.append(time.perf_counter() - start)
    baseline = []
    for _ in range(repeats):
        start = time.perf_counter()
        {n: node_view(n, e.status, e.connected) for n, e in fleet.nodes.items()}
        baseline.append(time.perf_counter() - start)
    assert isinstance(detail, Detail)
    return {
        "nodes": nodes,
        "wave_nodes": len(wave),
        "tick_progressing_ms": summary_ms(ticks),
        "evaluate_ms": summary_ms(evaluations),
        "baseline_all_views_ms": summary_ms(baseline),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nfctl-rollout-bench-") as tmp:
        result = asyncio.run(measure(args.nodes, args.repeats, Path(tmp)))
    result["machine"] = machine()
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    sys.exit(0)


if __name__ == "__main__":
    main()
