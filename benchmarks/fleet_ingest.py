"""What the controller's in-memory fleet costs per agent report, this tree against a
baseline revision of the same repository in the same run (a module split must not slow the
hot path of 10,000 agents: ~2,000 reports a second).

For each tree, a child process builds a Fleet of N connected nodes (5 NFs each, on an
in-memory SQLite store that is never written) and measures, per round over every node:
- report_us: Fleet.report_status of one status (one in ten rounds a significant change,
  the others heartbeats), per report;
- take_ms: one take_dirty of the whole round's batch;
- list_nodes_ms: the ListNodes answer for every node (selected by a label, as bytes);
- events_us: add_events of one new event with one watcher, per event.
The children alternate (baseline, this tree, baseline, ...) so that load on a shared
machine falls on both alike; medians over the rounds of all runs are compared.

    python -m benchmarks.fleet_ingest --nodes 2000 --rounds 5 --runs 3 --baseline 2dab7f1 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import emit, machine

ROOT = Path(__file__).resolve().parent.parent


def measure(nodes: int, rounds: int) -> dict[str, list[float]]:
    """One child's figures (runs with whichever nfctl is first on sys.path)."""
    import asyncio

    from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
    from nfctl.controller.fleet import Fleet
    from nfctl.controller.store import ControllerStore

    try:
        from nfctl.controller.pbwire import repeated_field
    except ImportError:  # a tree from before the split: the same function, in fleet.py
        from nfctl.controller.fleet import repeated_field  # type: ignore[attr-defined,no-redef]
    try:
        from nfctl.controller.watchers import Watcher
    except ImportError:
        from nfctl.controller.fleet import Watcher  # type: ignore[attr-defined]

    async def run() -> dict[str, list[float]]:
        fleet = Fleet(ControllerStore(Path(":memory:")), persist_interval=0.0)
        fleet.watchers.add(Watcher(pb.WatchEventsRequest(node="nobody")))
        entries = []
        for i in range(nodes):
            register = pb.Register(node=f"node{i:05d}", event_epoch="e", kernel="6.18")
            register.labels.update({"role": "edge" if i % 2 else "core", "zone": f"z{i % 7}"})
            entry, _, _ = fleet.connect(register, "ipv4:127.0.0.1:1")
            entries.append(entry)
        fleet.take_dirty(everything=True)

        def status(name: str, revision: str, round_: int) -> pb.NodeStatus:
            out = pb.NodeStatus(node=name, last_applied_revision=revision)
            out.labels.update({"role": "edge", "zone": "z1"})
            for n in range(5):
                fn = out.functions.add(name=f"nf{n}", state="Applied", revision=revision)
                fn.maps.add(name="counters", entries=round_ * 100 + n)
            return out

        figures: dict[str, list[float]] = {
            "report_us": [],
            "take_ms": [],
            "list_nodes_ms": [],
            "events_us": [],
        }
        selector = pb.NodeSelector(labels={"role": "edge"})
        for round_ in range(rounds):
            revision = f"rev{round_ // 10}"
            statuses = [status(e.name, revision, round_) for e in entries]
            start = time.perf_counter()
            for entry, message in zip(entries, statuses, strict=True):
                fleet.report_status(entry, message)
            figures["report_us"].append((time.perf_counter() - start) / nodes * 1e6)
            start = time.perf_counter()
            fleet.take_dirty(everything=True)
            figures["take_ms"].append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            now = time.time()
            blob = repeated_field(
                1, (e.to_bytes(fleet.stale_after, now) for e in fleet.select(selector))
            )
            figures["list_nodes_ms"].append((time.perf_counter() - start) * 1000)
            assert len(pb.ListNodesResponse.FromString(blob).nodes) == nodes
            events = [
                [pb.Event(sequence=round_ + 1, reason="Applied", type="Normal")] for _ in entries
            ]
            start = time.perf_counter()
            for entry, batch in zip(entries, events, strict=True):
                fleet.add_events(entry, batch)
            figures["events_us"].append((time.perf_counter() - start) / nodes * 1e6)
            fleet.take_dirty(everything=True)
        return figures

    return asyncio.run(run())


def baseline_tree(revision: str, into: Path) -> Path:
    """The nfctl package of `revision`, extracted from Git."""
    tar = into / "tree.tar"
    git = ["git", "-C", str(ROOT), "archive", f"--output={tar}", revision, "nfctl"]
    subprocess.run(git, check=True)
    subprocess.run(["tar", "-xf", str(tar), "-C", str(into)], check=True)
    return into


def child(tree: Path, nodes: int, rounds: int) -> dict[str, list[float]]:
    options = ["--nodes", str(nodes), "--rounds", str(rounds)]
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{ROOT}"}
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.fleet_ingest", "--child", *options],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=tree,
    ).stdout
    figures: dict[str, list[float]] = json.loads(out)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline", help="Git revision to compare with (required)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.nodes, args.rounds)))
        return
    if not args.baseline:
        parser.error("--baseline REVISION is required")
    with tempfile.TemporaryDirectory(prefix="nfctl-fleet-ingest-") as tmp:
        base = baseline_tree(args.baseline, Path(tmp))
        runs: dict[str, dict[str, list[float]]] = {"baseline": {}, "this_tree": {}}
        for _ in range(args.runs):
            for label, tree in (("baseline", base), ("this_tree", ROOT)):
                for key, values in child(tree, args.nodes, args.rounds).items():
                    runs[label].setdefault(key, []).extend(values)
    result: dict[str, Any] = {
        "machine": machine(),
        "nodes": args.nodes,
        "rounds": args.rounds,
        "runs": args.runs,
        "baseline": args.baseline,
    }
    for key in runs["baseline"]:
        before = statistics.median(runs["baseline"][key])
        after = statistics.median(runs["this_tree"][key])
        result[key] = {
            "baseline": round(before, 3),
            "this_tree": round(after, 3),
            "ratio": round(after / before, 3),
        }
    emit(result, args.json)


if __name__ == "__main__":
    main()
