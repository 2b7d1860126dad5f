"""Progressive rollouts on a lab of N real agents with steady legitimate traffic through
every node (issue #12):

- bad: a harmful-but-valid commit (the ratelimit's rate written as 20 instead of 20000:
  compiles, verifies, drops most legitimate traffic). How many nodes ever ran it (read
  from the audit trail), detect_s = the harmful rate is in the first canary's kernel map
  -> the controller records the failed gate, rollback_s = that -> every canary node's
  kernel map holds the previous rate again. Lost: UDP sequence gaps on streams into nodes
  that never ran the bad revision (streams into the canary carry the bad NF's own drops).
  Bypassed: replies to pings from a source the blocklist drops, on every node, all along.
- good: a good commit goes through every wave; total_s = push -> the controller records
  the rollout completed (the last wave's bake included); every_kernel_s = push -> every
  node's kernel map holds the new rate; overhead_s = total_s - the policy's bake times;
  lost = gaps on every stream (all swaps are hitless or they are not).

    sudo .venv/bin/python -m benchmarks.rollout --nodes 10 --json
"""

from __future__ import annotations

import argparse
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import emit, machine
from benchmarks.udp_stream import UdpStream
from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.bpf.syscall import BpfMap
from nfctl.datapath.pins import BpffsPaths
from nfctl.lab.lab import Lab, LabError
from nfctl.lab.process import REPO_ROOT
from nfctl.lab.topology import nsenter
from nfctl.netns import ping_summary

FINISHED = ("Completed", "RolledBack", "Halted", "Aborted")
GOOD_RATE, BAD_RATE, FIXED_RATE = 20000, 20, 30000
GATE_INTERVAL = 1.0


def rate_line(rate: int) -> str:
    return f"rate_pps: {rate}, burst: {rate * 2}"


def policy(bake: float) -> str:
    return f"""apiVersion: nfctl.io/v1alpha1
kind: RolloutPolicy
metadata:
  name: bench
spec:
  onFailure: rollback
  progressDeadline: 60s
  interval: {GATE_INTERVAL}s
  waves:
    - name: canary
      selector: {{role: canary}}
      bake: {bake}s
    - name: half
      count: 50%
      bake: {bake}s
    - name: rest
      bake: {bake}s
  gates:
    - kind: ready
    - kind: verdict
      nf: ratelimit
      maxIncrease: 0.05
"""


def seeder(bake: float, blocked: str) -> Any:
    def seed(work: Path) -> None:
        import shutil

        for name in ("blocklist", "ratelimit"):
            shutil.copytree(REPO_ROOT / "bpf" / name, work / "nfs" / name)
        ratelimit = work / "nfs" / "ratelimit" / "nf.yaml"
        ratelimit.write_text(
            ratelimit.read_text().replace("rate_pps: 1000, burst: 2000", rate_line(GOOD_RATE))
        )
        blocklist = work / "nfs" / "blocklist" / "nf.yaml"
        entry = "        - {key: 203.0.113.7, value: 1}"
        text = blocklist.read_text()
        assert entry in text
        blocklist.write_text(
            text.replace(entry, f"{entry}\n        - {{key: {blocked}, value: 1}}")
        )
        (work / "nfs" / "rollout.yaml").write_text(policy(bake))

    return seed


class RateWatch:
    """Polls each node's pinned ratelimit config map (the kernel's view): when did each
    node first hold each rate after `since`."""

    def __init__(self, lab: Lab, nodes: list[str]) -> None:
        self.pins = {n: BpffsPaths(lab.bpffs(n)).map_pin("ratelimit", "config") for n in nodes}
        self.seen: dict[str, list[tuple[float, int]]] = {n: [] for n in nodes}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RateWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)

    def _run(self) -> None:
        maps = {n: BpfMap.from_pin(str(p)) for n, p in self.pins.items()}
        try:
            while not self.stop.is_set():
                for node, bpf_map in maps.items():
                    value = bpf_map.lookup(b"\0\0\0\0")
                    rate = struct.unpack_from("<I", value)[0] if value else -1
                    history = self.seen[node]
                    if not history or history[-1][1] != rate:
                        history.append((time.time(), rate))
                time.sleep(0.005)
        finally:
            for bpf_map in maps.values():
                bpf_map.close()

    def first(self, node: str, rate: int, after: float = 0.0) -> float | None:
        return next((t for t, r in self.seen[node] if r == rate and t >= after), None)

    def ever(self, node: str, rate: int) -> bool:
        return any(r == rate for _, r in self.seen[node])

    def wait(self, nodes: list[str], rate: int, after: float, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            times = [self.first(n, rate, after) for n in nodes]
            if all(t is not None for t in times):
                return max(t for t in times if t is not None)
            time.sleep(0.05)
        raise LabError(f"rate {rate} not in the kernel of {nodes} within {timeout:.0f}s")


class Pinger:
    """ping from the hub with a source the blocklist drops: every reply is a bypass."""

    def __init__(self, netns: str, source: str, target: str) -> None:
        self.proc = subprocess.Popen(
            [*nsenter(netns), "ping", "-n", "-q", "-i", "0.05", "-W", "1", "-I", source, target],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def stop(self) -> tuple[int, int]:
        self.proc.send_signal(signal.SIGINT)
        return ping_summary(self.proc.communicate(timeout=30)[0])


def wait_rollout(lab: Lab, revision: str, timeout: float) -> pb.Rollout:
    deadline = time.monotonic() + timeout
    last: pb.Rollout | None = None
    while time.monotonic() < deadline:
        with lab.fleet() as stub:
            reply = stub.ListRollouts(pb.ListRolloutsRequest(limit=20), timeout=10)
        last = next((r for r in reply.rollouts if r.revision == revision), last)
        if last is not None and last.state in FINISHED:
            return last
        time.sleep(0.1)
    raise LabError(f"rollout of {revision[:12]} not finished: {last}")


def history(lab: Lab, revision: str) -> list[pb.Event]:
    with lab.fleet() as stub:
        request = pb.GetHistoryRequest(revision=revision, limit=5000)
        return list(stub.GetHistory(request, timeout=10).events)


def streams(lab: Lab, names: list[str], rate: int) -> dict[str, UdpStream]:
    """One fixed-rate UDP stream into each node, from the next node of the ring."""
    assert lab.topo is not None
    out = {}
    for i, name in enumerate(names):
        sender = lab.topo.node(names[(i + 1) % len(names)])
        receiver = lab.topo.node(name)
        out[name] = UdpStream(sender.netns, receiver.netns, receiver.ip, rate)
    return out


def set_rate(lab: Lab, old: int, new: int, message: str) -> str:
    lab.edit("nfs/ratelimit/nf.yaml", lambda t: t.replace(rate_line(old), rate_line(new)))
    return lab.commit(message)


def run(nodes: int, tag: str, subnet: int, bake: float, rate: int) -> dict[str, Any]:
    lab = Lab(tag, say=lambda text: print(f"[lab] {text}", file=sys.stderr))
    blocked = f"10.{subnet}.0.250"
    try:
        lab.up(nodes, subnet, timeout=900, seed=seeder(bake, blocked))
        assert lab.topo is not None
        hub = lab.topo.hub
        subprocess.run(
            [*nsenter(hub), "ip", "addr", "add", f"{blocked}/24", "dev", "br0"], check=True
        )
        names = [n.name for n in lab.topo.nodes]
        canary = [n for n in names if lab.role(n) == "canary"]
        others = [n for n in names if n not in canary]
        probes = [Pinger(hub, blocked, lab.topo.node(n).ip) for n in names]
        with RateWatch(lab, names) as watch:
            # -- bad ------------------------------------------------------------------------
            flows = streams(lab, names, rate)
            time.sleep(3)  # a baseline for the verdict gate
            bad = set_rate(lab, GOOD_RATE, BAD_RATE, "ratelimit: 20k per source")
            done = wait_rollout(lab, bad, 180)
            halted_at = min(
                (e.time for e in history(lab, bad) if e.reason == "GateFailed"),
                default=done.updated_at,
            )
            bad_at = min(
                (t for n in canary if (t := watch.first(n, BAD_RATE)) is not None), default=None
            )
            back_at = None
            if done.state == "RolledBack":
                back_at = watch.wait(canary, GOOD_RATE, bad_at or halted_at, 30)
            time.sleep(1)
            bad_flows = {n: s.stop() for n, s in flows.items()}
            ran_bad = sorted(
                {e.node for e in history(lab, bad) if e.reason == "Applied"}
                | {n for n in names if watch.ever(n, BAD_RATE)}
            )
            # -- good -----------------------------------------------------------------------
            flows = streams(lab, names, rate)
            time.sleep(1)
            started = time.time()
            fixed = set_rate(lab, BAD_RATE, FIXED_RATE, "ratelimit: 30k per source")
            everywhere = watch.wait(names, FIXED_RATE, started, 300)
            good = wait_rollout(lab, fixed, 120)
            completed_at = min(
                (e.time for e in history(lab, fixed) if e.reason == "RolloutCompleted"),
                default=good.updated_at,
            )
            time.sleep(1)
            good_flows = {n: s.stop() for n, s in flows.items()}
        bypassed = sum(p.stop()[1] for p in probes)
        total = completed_at - started  # the last wave's bake comes after its apply
        sum_bake = bake * len(good.waves)
        return {
            "nodes": nodes,
            "machine": machine(),
            "gate_interval_s": GATE_INTERVAL,
            "stream_pps_per_node": rate,
            "bad": {
                "revision": bad,
                "state": done.state,
                "nodes_ever_on_bad": len(ran_bad),
                "nodes_on_bad": ran_bad,
                "canary_size": len(done.waves[0].nodes) if done.waves else 0,
                "halted": done.state in ("RolledBack", "Halted"),
                "rolled_back": done.state == "RolledBack" and back_at is not None,
                "detect_s": round(halted_at - bad_at, 3) if bad_at else None,
                "rollback_s": round(back_at - halted_at, 3) if back_at else None,
                "failed_gates": [
                    f"{g.name or g.kind}: {g.message}" for g in done.waves[0].gates if not g.ok
                ],
                "lost": sum(bad_flows[n]["lost"] for n in others),
                "sent": sum(bad_flows[n]["sent"] for n in others),
                "canary_streams_lost_incl_bad_verdicts": sum(bad_flows[n]["lost"] for n in canary),
                "bypassed": bypassed,
            },
            "good": {
                "revision": fixed,
                "completed": good.state == "Completed",
                "waves": len(good.waves),
                "total_s": round(total, 3),
                "every_kernel_s": round(everywhere - started, 3),
                "sum_bake_s": sum_bake,
                "overhead_s": round(total - sum_bake, 3),
                "overhead_per_wave_s": round((total - sum_bake) / max(1, len(good.waves)), 3),
                "lost": sum(f["lost"] for f in good_flows.values()),
                "sent": sum(f["sent"] for f in good_flows.values()),
            },
        }
    finally:
        lab.down(quiet=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--tag", default="rollbnch")
    parser.add_argument("--subnet", type=int, default=174)
    parser.add_argument("--bake", type=float, default=3.0, help="bake time of each wave (s)")
    parser.add_argument("--rate", type=int, default=200, help="UDP packets/s into each node")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    emit(run(args.nodes, args.tag, args.subnet, args.bake, args.rate), args.json)


if __name__ == "__main__":
    main()
