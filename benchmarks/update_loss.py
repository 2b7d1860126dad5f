"""Live NF updates under traffic: nfctl's atomic chain switch vs detach-then-attach.

Two versions of an NF that count ICMP echo packets into one pinned map are swapped N
times on a veth in throwaway namespaces while `ping -f` runs through the hook.
  lost      = echo requests sent - replies received (the sender namespace's ICMP counters,
              read after replies in flight at the end arrived; see Flood)
  bypassed  = replies received - requests the NF counted (not clamped: a negative value
              means requests were counted and then lost, never hidden by a bypass)
The baseline does what tools without atomic replace do: detach, then attach the other
version (same programs, same maps, same traffic).

    sudo .venv/bin/python benchmarks/update_loss.py --hook xdp --updates 1000 --json

--scenario chain-ops works on a chain of five NFs plus a sentinel NF at its end, which
must see every packet that crossed the hook: each update is one chain change (version
swap of the first / middle / last NF, add an NF, remove one, reverse the order, or a mix
of these) and the next undoes it. The flood is `ping -f -l 64`. Then bypassed = replies
received - echo requests the sentinel counted (not clamped): a packet that skipped the
end of the chain. Methods: nfctl (one chain switch) and detach, then attach; the link /
netlink atomic-replace baselines of --scenario swap hold one program, not a chain.

Every run also sends a fixed-rate UDP stream (UDP_RATE datagrams/s, sequence-numbered)
through the hook; its receiver counts what arrived and the sequence gaps, reported per
stream under "udp" (lost = sent - received). The NFs count ICMP only, so bypass is measured
on the ping stream by the sentinel; UDP measures loss with a sender that never slows down.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.common import Flood, emit, machine, percentile
from benchmarks.udp_stream import UdpStream
from nfctl.builder.builder import Builder
from nfctl.datapath.datapath import ChainMember, Datapath, LoadedBuild
from nfctl.datapath.pins import remove_tree
from nfctl.manifest.model import Hook
from nfctl.netns import VethPair, unique_name


def _load_versions(dp: Datapath, folder: Path, hook: Hook) -> tuple[LoadedBuild, LoadedBuild]:
    from tests.helpers import prepare_nf, write_nf
    from tests.nfsources import counting_nf

    builds = []
    for version in (1, 2):
        source, function, cflags = counting_nf(hook.value, version)
        write_nf(folder, "bench", source, function, hook=hook.value, cflags=cflags)
        builds.append(Builder(dp).build(prepare_nf(folder, "bench")))
    return builds[0], builds[1]


def _counted(dp: Datapath, build: LoadedBuild, hook: Hook) -> int:
    counts = dict(dp.map_entries(build, "seen"))
    return int(counts[1] if hook is Hook.TC_EGRESS else counts[0])


def _attach_kind(dp: Datapath, pair: VethPair, hook: Hook, mode: str) -> str:
    """tcx | tc | xdp-link (native|generic) | netlink (native|generic)."""
    point = next(p for p in dp.observe() if p.ifname == pair.a_if and p.hook is hook)
    return f"{point.attach} ({mode})" if hook is Hook.XDP else str(point.attach)


def _udp(pair: VethPair, hook: Hook) -> UdpStream:
    """A fixed-rate UDP stream through the hook: into a for XDP / TC ingress, out of a for
    TC egress."""
    if hook is Hook.TC_EGRESS:
        return UdpStream(pair.ns_a, pair.ns_b, pair.b_ip, UDP_RATE)
    return UdpStream(pair.ns_b, pair.ns_a, pair.a_ip, UDP_RATE)


UDP_RATE = 2000  # datagrams per second


def update_times(timings: list[float]) -> dict[str, Any]:
    """p50 and p99 of the update times (given in seconds) in ms, and their tail in µs:
    a preempted update takes tens of µs, so the share of them (where the tail starts,
    p98 to p99.5) is what the p99 of a µs update depends on."""
    return {
        "update_ms_p50": round(percentile(timings, 50) * 1000, 3),
        "update_ms_p99": round(percentile(timings, 99) * 1000, 3),
        "update_us_tail": {
            f"p{pct:g}": round(percentile(timings, pct) * 1e6, 1) for pct in (90, 98, 99, 99.5)
        },
    }


def run_mode(
    dp: Datapath,
    pair: VethPair,
    hook: Hook,
    builds: tuple[LoadedBuild, LoadedBuild],
    updates: int,
    detach_first: bool,
) -> dict[str, Any]:
    members = [ChainMember(b.nf, b.build_hash, b.prog_pin) for b in builds]
    attach = _attach_kind(dp, pair, hook, dp.set_chain(pair.a_if, hook, [members[0]]))
    time.sleep(0.1)
    counted_before = _counted(dp, builds[0], hook)
    udp = _udp(pair, hook)
    flood = Flood(pair.ns_b, pair.a_ip)
    timings = []
    try:
        for i in range(updates):
            target = members[(i + 1) % 2]
            start = time.perf_counter()
            if detach_first:
                dp.clear_chain(pair.a_if, hook)
            dp.set_chain(pair.a_if, hook, [target])
            timings.append(time.perf_counter() - start)
            dp.reap()
    finally:
        sent, received = flood.stop()
        udp_result = udp.stop()
    counted = _counted(dp, builds[0], hook) - counted_before
    # Every packet the NF counts also gets its reply unless dropped elsewhere; a reply
    # without a count went through the hook with no NF on it.
    return {
        "hook": hook.value,
        "updates": updates,
        "sent": sent,
        "received": received,
        "counted": counted,
        "lost": sent - received,
        "bypassed": received - counted,
        "udp": udp_result,
        "attach": attach,
        **update_times(timings),
    }


def _standalone(hook: Hook, pin: Path) -> tuple[list[Any], list[int]]:
    """The same counting NF in two versions, loaded by BCC on its own (no dispatcher,
    no chain), sharing one pinned counter map: what the atomic-replace baselines swap."""
    from bcc import BPF

    from tests.nfsources import counting_nf

    objs, fds = [], []
    for version in (1, 2):
        source, function, cflags = counting_nf(hook.value, version)
        source = source.replace(
            "BPF_ARRAY(seen, u64, 2);", f'BPF_TABLE_PINNED("array", u32, u64, seen, 2, "{pin}");'
        )
        # nfctl's generated preamble brings pkt_cls.h; standalone, include it here
        bpf_obj = BPF(text="#include <linux/pkt_cls.h>\n" + source, cflags=cflags)
        kind = BPF.XDP if hook is Hook.XDP else BPF.SCHED_CLS
        objs.append(bpf_obj)
        fds.append(bpf_obj.load_func(function, kind).fd)
    return objs, fds


def _pinned_count(pin: Path, hook: Hook) -> int:
    from nfctl.bpf.syscall import BpfMap

    with BpfMap.from_pin(str(pin)) as counts:
        raw = counts.lookup((1 if hook is Hook.TC_EGRESS else 0).to_bytes(4, "little"))
    return int.from_bytes(raw or b"", "little")


def run_atomic_baseline(
    pair: VethPair, hook: Hook, pin: Path, fds: list[int], updates: int, method: str
) -> dict[str, Any]:
    """link_update: a TCX / XDP link swapped with BPF_LINK_UPDATE (expected old program);
    netlink_replace: tc replace-filter at a fixed prio/handle, or XDP_FLAGS_REPLACE."""
    from pyroute2 import IPRoute

    from nfctl.datapath import links, tc, xdp

    direction = "egress" if hook is Hook.TC_EGRESS else "ingress"
    with IPRoute(netns=pair.ns_a) as ipr:
        index = int(ipr.link_lookup(ifname=pair.a_if)[0])
        link = -1
        if method == "link_update":
            attach_type = links.BPF_XDP if hook is Hook.XDP else links.TCX_ATTACH_TYPE[direction]
            with links.in_netns(pair.ns_a):
                link = links.link_create(fds[0], index, attach_type)
            attach = "xdp-link" if hook is Hook.XDP else "tcx"
        elif hook is Hook.XDP:
            attach = f"netlink ({xdp.attach(ipr, index, fds[0])})"
        else:
            tc.ensure_clsact(ipr, index)
            tc.replace_filter(ipr, index, direction, fds[0], "bench", 10, 1)
            attach = "tc"
        time.sleep(0.1)
        before = _pinned_count(pin, hook)
        udp = _udp(pair, hook)
        flood = Flood(pair.ns_b, pair.a_ip)
        timings = []
        try:
            for i in range(updates):
                new, old = fds[(i + 1) % 2], fds[i % 2]
                start = time.perf_counter()
                if link >= 0:
                    links.link_update(link, new, old)
                elif hook is Hook.XDP:
                    xdp.attach(ipr, index, new, expected_fd=old)
                else:
                    tc.replace_filter(ipr, index, direction, new, "bench", 10, 1)
                timings.append(time.perf_counter() - start)
        finally:
            sent, received = flood.stop()
            udp_result = udp.stop()
        counted = _pinned_count(pin, hook) - before
        if link >= 0:
            links.link_detach(link)
            os.close(link)
        elif hook is Hook.XDP:
            xdp.detach(ipr, index)
        else:
            tc.delete_filter(ipr, index, direction, 10, 1)
    return {
        "method": method,
        "updates": updates,
        "sent": sent,
        "received": received,
        "counted": counted,
        "lost": sent - received,
        "bypassed": received - counted,
        "udp": udp_result,
        "attach": attach,
        **update_times(timings),
    }


ChainBuilds = tuple[list[tuple[LoadedBuild, LoadedBuild]], LoadedBuild, LoadedBuild]
SWAP_METHODS = ("nfctl", "detach_attach", "netlink_replace", "link_update")
CHAIN_OPS = ("swap-first", "swap-middle", "swap-last", "add", "remove", "reorder", "mixed")


def load_chain(dp: Datapath, folder: Path, hook: Hook) -> ChainBuilds:
    """Five NFs in two versions each, a sixth to add, and the sentinel: compiled once per
    run and shared by every operation and method (each counts from its own start)."""
    from tests.helpers import prepare_nf, write_nf
    from tests.nfsources import counting_nf

    def build(name: str, version: int) -> LoadedBuild:
        source, function, cflags = counting_nf(hook.value, version)
        write_nf(folder, name, source, function, hook=hook.value, cflags=cflags)
        return Builder(dp).build(prepare_nf(folder, name))

    pairs = [(build(f"c{i}", 1), build(f"c{i}", 2)) for i in range(5)]
    return pairs, build("extra", 1), build("sentinel", 1)


def _chain_for(
    op: str,
    step: int,
    pairs: list[tuple[LoadedBuild, LoadedBuild]],
    extra: LoadedBuild,
    sentinel: LoadedBuild,
) -> list[LoadedBuild]:
    """The chain after update number step of scenario op (even steps: the start)."""
    flip = step % 2 == 1
    nfs = [v1 for v1, _ in pairs]
    if op == "mixed":
        op = CHAIN_OPS[(step // 2) % (len(CHAIN_OPS) - 1)]
    if flip:
        index = {"swap-first": 0, "swap-middle": 2, "swap-last": 4}.get(op)
        if index is not None:
            nfs[index] = pairs[index][1]
        elif op == "add":
            nfs.insert(2, extra)
        elif op == "remove":
            del nfs[2]
        elif op == "reorder":
            nfs.reverse()
    return [*nfs, sentinel]


def run_chain_ops(
    dp: Datapath,
    pair: VethPair,
    hook: Hook,
    chain: ChainBuilds,
    op: str,
    updates: int,
    detach: bool,
) -> dict[str, Any]:
    pairs, extra, sentinel = chain
    wall = time.monotonic()

    def members(step: int) -> list[ChainMember]:
        chain = _chain_for(op, step, pairs, extra, sentinel)
        return [ChainMember(b.nf, b.build_hash, b.prog_pin) for b in chain]

    attach = _attach_kind(dp, pair, hook, dp.set_chain(pair.a_if, hook, members(0)))
    time.sleep(0.1)
    before = _counted(dp, sentinel, hook)
    udp = _udp(pair, hook)
    flood = Flood(pair.ns_b, pair.a_ip, preload=64)
    timings = []
    try:
        for step in range(1, updates + 1):
            start = time.perf_counter()
            if detach:
                dp.clear_chain(pair.a_if, hook)
            dp.set_chain(pair.a_if, hook, members(step))
            timings.append(time.perf_counter() - start)
            dp.reap()
    finally:
        sent, received = flood.stop()
        udp_result = udp.stop()
    counted = _counted(dp, sentinel, hook) - before
    dp.clear_chain(pair.a_if, hook)
    return {
        "scenario": op,
        "wall_s": round(time.monotonic() - wall, 1),
        "updates": updates,
        "sent": sent,
        "received": received,
        "lost": sent - received,
        "bypassed": received - counted,
        "udp": udp_result,
        "attach": attach,
        **update_times(timings),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hook", choices=[h.value for h in Hook], default="xdp")
    parser.add_argument("--updates", type=int, default=1000)
    parser.add_argument("--scenario", choices=["swap", "chain-ops"], default="swap")
    parser.add_argument(
        "--ops", default=",".join(CHAIN_OPS), help="chain-ops only: which operations"
    )
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated; chain-ops: nfctl, detach_attach (default both); swap: also "
        "netlink_replace, link_update (default all four)",
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--attach",
        choices=["auto", "link", "netlink"],
        default="auto",
        help="how the dispatcher is attached: bpf_link (TCX / XDP link) or netlink",
    )
    args = parser.parse_args()
    hook = Hook(args.hook)
    methods = (args.methods or ",".join(SWAP_METHODS)).split(",")
    started = time.monotonic()
    root = Path("/sys/fs/bpf") / f"nfctl-bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp, VethPair.create(unique_name("ul")) as pair:
        dp = Datapath(root, Path(tmp) / "state", netns=pair.ns_a, attach=args.attach)
        try:
            if args.scenario == "chain-ops":
                chain = load_chain(dp, Path(tmp) / "repo", hook)
                results = {
                    method: [
                        run_chain_ops(dp, pair, hook, chain, op, args.updates, detach)
                        for op in args.ops.split(",")
                    ]
                    for method, detach in (("nfctl", False), ("detach_attach", True))
                    if method in methods
                }
                wall = round(time.monotonic() - started, 1)
                emit(
                    {"hook": hook.value, **results, "wall_s": wall, "machine": machine()}, args.json
                )
                return
            builds = _load_versions(dp, Path(tmp) / "repo", hook)
            ours: dict[str, Any] = {}
            if "nfctl" in methods:
                ours = run_mode(dp, pair, hook, builds, args.updates, detach_first=False)
                dp.clear_chain(pair.a_if, hook)
            if "detach_attach" in methods:
                baseline = run_mode(dp, pair, hook, builds, args.updates, detach_first=True)
                ours["baseline"] = {**baseline, "method": "detach then attach (naive tools)"}
                dp.clear_chain(pair.a_if, hook)
            pin = root / "bench-seen"
            _objs, fds = _standalone(hook, pin)
            atomic = [
                run_atomic_baseline(pair, hook, pin, fds, args.updates, method)
                for method in ("netlink_replace", "link_update")
                if method in methods
            ]
        finally:
            dp.teardown()
            remove_tree(root)
    if "nfctl" in methods:
        ours["method"] = "nfctl: the one-NF swap written into its live slot (one map update)"
    ours["atomic_baselines"] = atomic
    ours["wall_s"] = round(time.monotonic() - started, 1)
    ours["machine"] = machine()
    emit(ours, args.json)


if __name__ == "__main__":
    main()
