"""The control channel under faults, on a lab of N real agents (default 3).

K controller restarts (alternately SIGKILL and SIGTERM) at random moments while commits
and interface flaps happen, some of them during the outage (a push whose webhook cannot be
delivered). Afterwards every event each agent recorded (its state dir's event log) is
looked up at the controller: lost, duplicated, and in order per node. Also measured: how
long each agent takes to reconnect once the controller listens again, how long after that
a push made during the outage is applied (baseline: the same push with the controller up,
delivered by its webhook), and whether any connected node was ever shown stale.

    sudo .venv/bin/python -m benchmarks.control_channel --agents 3 --restarts 4 --json
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc

from benchmarks.common import emit, machine, percentile
from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.lab.lab import Lab

NF_C = """
BPF_HASH(allow, u32, u32, 64);
int xdp_allow(struct xdp_md *ctx) { return XDP_PASS; }
"""


def manifest(version: int) -> str:
    return f"""apiVersion: nfctl.io/v1alpha1
kind: NetworkFunction
metadata: {{name: allow}}
spec:
  version: 1.0.{version}
  program: {{source: nf.c, function: xdp_allow}}
  attach: {{hook: xdp, interfaces: ["eth*", "veth*"]}}
  maps:
    allow:
      managed: true
      entries:
        - {{key: {version}, value: 1}}
"""


def seed(work: Path) -> None:
    folder = work / "nfs" / "allow"
    folder.mkdir(parents=True)
    (folder / "nf.c").write_text(NF_C)
    (folder / "nf.yaml").write_text(manifest(0))


class Bench:
    def __init__(self, lab: Lab, agents: int, rng: random.Random) -> None:
        self.lab = lab
        self.names = [f"node{i}" for i in range(1, agents + 1)]
        self.rng = rng
        self.version = 0
        self.false_stale: set[str] = set()
        self.reconnects: list[float] = []
        self.outage_push: list[float] = []
        self.baseline_push: list[float] = []
        self.flaps = 0

    # -- the lab ------------------------------------------------------------------------
    def netns(self, node: str) -> str:
        assert self.lab.topo is not None
        return self.lab.topo.node(node).netns

    def flap(self) -> None:
        """Delete one node's extra interface and recreate it half a second later."""
        netns = self.netns(self.rng.choice(self.names))
        ip = ["ip", "netns", "exec", netns, "ip", "link"]
        subprocess.run([*ip, "del", "vethbench"], check=True, capture_output=True)
        time.sleep(0.5)
        self.add_interface(netns)
        self.flaps += 1

    @staticmethod
    def add_interface(netns: str) -> None:
        ip = ["ip", "netns", "exec", netns, "ip", "link"]
        subprocess.run(
            [*ip, "add", "vethbench", "type", "veth", "peer", "name", "xbench"],
            check=True,
            capture_output=True,
        )
        subprocess.run([*ip, "set", "vethbench", "up"], check=True, capture_output=True)

    def commit(self) -> str:
        self.version += 1
        (self.lab.paths.work / "nfs" / "allow" / "nf.yaml").write_text(manifest(self.version))
        return self.lab.commit(f"allow 1.0.{self.version}")

    def controller_pid(self) -> int:
        return int((self.lab.paths.run / "controller.pid").read_text())

    def stop_controller(self, signum: int) -> None:
        pid = self.controller_pid()
        os.kill(pid, signum)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            try:
                os.kill(pid, 0)
            except OSError:
                return
            time.sleep(0.05)
        raise RuntimeError("the controller did not stop")

    def applied_locally(self, node: str) -> str:
        path = self.lab.paths.state(node) / "status.json"
        with contextlib.suppress(OSError, ValueError):
            return str(json.loads(path.read_text()).get("lastAppliedRevision") or "")
        return ""

    def wait_applied(self, revision: str, since: float, timeout: float = 60) -> float:
        """Seconds from `since` (monotonic) until every agent applied revision."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.applied_locally(n) == revision for n in self.names):
                return time.monotonic() - since
            time.sleep(0.05)
        raise RuntimeError(f"not applied within {timeout}s: {revision[:12]}")

    def watch_connections(self, fleet: Any, since: float, timeout: float = 30) -> None:
        """Per agent, seconds from the controller listening until it is connected; and
        any connected node shown stale."""
        seen: dict[str, float] = {}
        deadline = time.monotonic() + timeout
        while len(seen) < len(self.names) and time.monotonic() < deadline:
            with contextlib.suppress(grpc.RpcError):
                for node in fleet.ListNodes(pb.ListNodesRequest(), timeout=5).nodes:
                    if node.connected and node.status.node not in seen:
                        seen[node.status.node] = time.monotonic() - since
                    self.check_stale(node)
            time.sleep(0.05)
        missing = set(self.names) - set(seen)
        if missing:
            raise RuntimeError(f"not reconnected within {timeout}s: {sorted(missing)}")
        self.reconnects.extend(seen.values())

    def check_stale(self, node: Any) -> None:
        if node.connected and node.stale:
            self.false_stale.add(node.status.node)

    def sample_stale(self, fleet: Any, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(grpc.RpcError):
                for node in fleet.ListNodes(pb.ListNodesRequest(), timeout=5).nodes:
                    self.check_stale(node)
            time.sleep(0.5)

    # -- one restart -------------------------------------------------------------------------
    def restart(self, fleet: Any, signum: int) -> None:
        # activity with the controller up: a push (delivered by webhook: the baseline), a
        # flap; the kill lands at a random moment while agents apply and report
        pushed = time.monotonic()
        revision = self.commit()
        self.flap()
        time.sleep(self.rng.uniform(0.0, 1.5))
        self.stop_controller(signum)
        self.baseline_push.append(self.wait_applied(revision, pushed))
        # the outage: a flap and a push whose webhook has nowhere to go
        self.flap()
        outage_revision = self.commit()
        time.sleep(self.rng.uniform(1.0, 3.0))
        self.lab._start_controller()  # returns once it listens
        back = time.monotonic()
        self.watch_connections(fleet, back)
        self.outage_push.append(self.wait_applied(outage_revision, back))
        self.sample_stale(fleet, self.rng.uniform(1.0, 3.0))

    # -- the audit -----------------------------------------------------------------------------
    def audit(self, fleet: Any) -> dict[str, Any]:
        recorded = stored = lost = duplicated = out_of_order = 0
        for node in self.names:
            path = self.lab.paths.state(node) / "events.jsonl"
            local = [json.loads(line) for line in path.read_text().splitlines()]
            want = [(e["sequence"], e["reason"], e["message"]) for e in local]
            history = fleet.GetHistory(
                pb.GetHistoryRequest(node=node, limit=10_000), timeout=30
            ).events
            got = [(int(e.sequence), e.reason, e.message) for e in history]
            recorded += len(want)
            stored += len(got)
            lost += len(set(want) - set(got))
            duplicated += len(got) - len(set(got))
            sequences = [s for s, _, _ in got]
            out_of_order += sum(1 for a, b in itertools.pairwise(sequences) if b < a)
        return {
            "events_recorded": recorded,
            "events_stored": stored,
            "events_lost": lost,
            "events_duplicated": duplicated,
            "events_out_of_order": out_of_order,
        }


def run(agents: int, restarts: int, tag: str, subnet: int, rng_seed: int) -> dict[str, Any]:
    lab = Lab(tag, say=lambda text: None)
    rng = random.Random(rng_seed)
    bench = Bench(lab, agents, rng)
    setup_start = time.monotonic()
    lab.up(
        agents,
        subnet,
        timeout=600,
        seed=seed,
        agent_args=["--no-compile-standby", "--drift-interval", "2", "--interval", "600"],
    )
    for node in bench.names:
        bench.add_interface(bench.netns(node))
    setup = time.monotonic() - setup_start
    try:
        with lab.fleet() as fleet:
            bench.sample_stale(fleet, 2)
            for number in range(restarts):
                bench.restart(fleet, signal.SIGKILL if number % 2 == 0 else signal.SIGTERM)
            time.sleep(3)  # the last events of the last round reach the controller
            audit = bench.audit(fleet)
    finally:
        lab.down(quiet=True)
    return {
        "benchmark": "control_channel",
        "agents": agents,
        "restarts": restarts,
        "kills": {"SIGKILL": (restarts + 1) // 2, "SIGTERM": restarts // 2},
        "interface_flaps": bench.flaps,
        **audit,
        "reconnect_p50_s": round(percentile(bench.reconnects, 50), 2),
        "reconnect_p99_s": round(percentile(bench.reconnects, 99), 2),
        "reconnect_max_s": round(max(bench.reconnects), 2),
        "false_stale_nodes": len(bench.false_stale),
        "push_during_outage_applied_s": round(max(bench.outage_push), 2),
        "push_during_outage_applied_each_s": [round(s, 2) for s in bench.outage_push],
        "baseline_push_controller_up_applied_s": round(max(bench.baseline_push), 2),
        "baseline_push_controller_up_applied_each_s": [round(s, 2) for s in bench.baseline_push],
        "setup_s": round(setup, 1),
        "stale_after_s": 30,
        "heartbeat_s": 10,
        "machine": machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--restarts", type=int, default=4)
    parser.add_argument("--tag", default="chanbnch")
    parser.add_argument("--subnet", type=int, default=223)
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    emit(run(args.agents, args.restarts, args.tag, args.subnet, args.seed), args.json)


if __name__ == "__main__":
    main()
