"""Push -> every node applied, on a lab of N real agents (default 100) with webhooks.

A map-only change (no compile) is committed and pushed; the repository's post-receive
hook sends a signed GitHub webhook; the controller fans "reconcile now" out to every
agent; each fetches, applies and reports. Measured from the push to each node reporting
the new revision through the controller. All N agents share this machine's CPUs, so the
spread mostly shows N Python processes waking at once on 2 cores.

    sudo .venv/bin/python -m benchmarks.webhook_fanout --nodes 100 --rounds 5 --json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from benchmarks.common import emit, machine, percentile
from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.lab.lab import Lab

NF_C = """
BPF_HASH(allow, u32, u32, 4096);
int xdp_allow(struct xdp_md *ctx) { return XDP_PASS; }
"""


def manifest(entries: int) -> str:
    listed = "\n".join(f"        - {{key: {k}, value: 1}}" for k in range(1, entries + 1))
    return f"""apiVersion: nfctl.io/v1alpha1
kind: NetworkFunction
metadata: {{name: allow}}
spec:
  version: 1.0.0
  program: {{source: nf.c, function: xdp_allow}}
  attach: {{hook: xdp, interfaces: ["eth*"]}}
  maps:
    allow:
      managed: true
      entries:
{listed or "        []"}
"""


def seed(work: Path) -> None:
    folder = work / "nfs" / "allow"
    folder.mkdir(parents=True)
    (folder / "nf.c").write_text(NF_C)
    (folder / "nf.yaml").write_text(manifest(0))


def measure_round(lab: Lab, fleet: Any, nodes: int, message: str) -> dict[str, Any]:
    """Commit and push (the hook fires), then poll the controller until every node has
    reported the commit as applied. Per node, the time applied is the end of the agent's
    reconcile pass (lastReconcile, same clock as here): the 0.25 s polling, kept light so
    as not to slow down the agents it measures, does not blur it."""
    pushed = time.time()
    sha = lab.commit(message)
    applied: dict[str, float] = {}
    reported: dict[str, float] = {}
    while len(applied) < nodes and time.time() - pushed < 300:
        time.sleep(0.25)
        listed = fleet.ListNodes(pb.ListNodesRequest(), timeout=10).nodes
        for node in listed:
            status = node.status
            name, timings = status.node, status.last_reconcile
            if (
                name not in applied
                and status.last_applied_revision == sha
                and timings.revision == sha
            ):
                applied[name] = timings.started_at + timings.total_seconds - pushed
                reported[name] = time.time() - pushed
    times = sorted(applied.values())
    return {
        "applied_nodes": len(times),
        "first_s": round(times[0], 3) if times else None,
        "p50_s": round(percentile(times, 50), 3) if times else None,
        "p95_s": round(percentile(times, 95), 3) if times else None,
        "all_s": round(times[-1], 3) if len(times) == nodes else None,
        "all_seen_by_operator_s": round(max(reported.values()), 2)
        if len(reported) == nodes
        else None,
    }


def run(nodes: int, rounds: int, tag: str, subnet: int) -> dict[str, Any]:
    lab = Lab(tag, say=lambda text: None)
    setup_start = time.monotonic()
    lab.up(
        nodes,
        subnet,
        timeout=1800,
        seed=seed,
        agent_args=["--no-compile-standby", "--drift-interval", "30", "--interval", "600"],
    )
    setup = time.monotonic() - setup_start
    rounds_out: list[dict[str, Any]] = []
    try:
        with lab.fleet() as fleet:  # one operator channel: a TLS handshake per poll is load
            for entries in range(1, rounds + 1):
                (lab.paths.work / "nfs" / "allow" / "nf.yaml").write_text(manifest(entries))
                rounds_out.append(measure_round(lab, fleet, nodes, f"allow {entries} keys"))
                time.sleep(2)
    finally:
        lab.down(quiet=True)
    complete = [r["all_s"] for r in rounds_out if r["all_s"] is not None]
    return {
        "nodes": nodes,
        "agents": "real nfctl agents, one per network namespace, all on this machine",
        "change": "map entries only (no compile); webhook from the repository's post-receive hook",
        "setup_s": round(setup, 1),
        "rounds": rounds_out,
        "push_to_all_applied_s_median": round(percentile(complete, 50), 3) if complete else None,
        "push_to_node_applied_s_p50_median": round(
            percentile([r["p50_s"] for r in rounds_out if r["p50_s"] is not None], 50), 3
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tag", default="fan")
    parser.add_argument("--subnet", type=int, default=96)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    data = run(args.nodes, args.rounds, args.tag, args.subnet)
    data["target"] = "every agent attached within 2 s of the push (excluding compile)"
    data["machine"] = machine()
    emit(data, args.json)


if __name__ == "__main__":
    main()
