"""What nfctl's chaining and verdict counters cost per packet, measured in the kernel with
BPF_PROG_TEST_RUN (the kernel reports the average duration over `repeat` runs).

Five NF bodies (parse Ethernet + IPv4, look the source up in the NF's own hash map, pass),
six ways, on the same 64-byte IPv4/UDP packet, in one run:
  direct          one XDP program calling the five bodies in sequence (the floor)
  bare_tail_calls each body in its own program, tail-calling the next by a constant slot:
                  what any tail-call chain costs on this machine, nothing of nfctl's
  bare_indirect_tail_calls  the same, the slot read from a map (not a constant)
  chain           nfctl's dispatcher + five generated wrappers tail-calling each other,
                  built without the counting code (a codegen option only this uses)
  chain_counters  the same chain as the agent builds it, counting verdicts per NF
and three design probes, not what the agent runs (where a faster chain would come from):
  chain_constant_slots  chain_counters with each wrapper's slot a constant (one program
                  per slot), so its tail call can be patched into a direct jump
  wrappers_constant_slots  the same wrappers entered at the first NF: no dispatcher
  wrappers_constant_slots_no_counters  and without the counting code
  wrappers_constant_slots_and_counter_ids  with the counting code, each wrapper's
                  counter entry a constant too (no lookup of the slot's label)
Each run measures all in turn; medians over --runs. The packet passes every NF, so
every wrapper runs: the counters are read back to prove it.

What a constant slot costs a chain update, after the runs: --writes prog-array writes
into slot 2 (alternately NF 2's and NF 3's program, as a version swap writes it) of the
agent's chain and of the constant-slot chain, where NF 1's tail call to slot 2 is a
direct jump the kernel patches on every write (slot_write_us).

sudo .venv/bin/python -m benchmarks.chain_overhead --json
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import struct
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.common import emit, machine, percentile
from nfctl.bpf import syscall
from nfctl.bpf.abi import dispatcher_name, entry_name
from nfctl.bpf.syscall import BpfMap
from nfctl.compiler.codegen import (
    BuildPins,
    ChainNames,
    dispatcher_program,
    nf_program,
)
from nfctl.datapath.chain import ChainTable
from nfctl.datapath.counters import CounterKey, CounterTable, ensure_maps
from nfctl.datapath.pins import BpffsPaths, remove_tree
from nfctl.manifest.model import Hook
from nfctl.nftest.kernel import BPF_PROG_TEST_RUN, _TestRunAttr

NFS = 5
VARIANTS_PROBED = (
    "chain_constant_slots",
    "wrappers_constant_slots",
    "wrappers_constant_slots_no_counters",
    "wrappers_constant_slots_and_counter_ids",
)
LOOPBACK_IFINDEX = 1  # an unattached XDP test run sees the loopback device as ingress

BODY = r"""
#include <linux/if_ether.h>
#include <linux/ip.h>
BPF_HASH(MAP, u32, u32, 1024);
static __always_inline int FN(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end || eth->h_proto != htons(ETH_P_IP))
        return XDP_PASS;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end)
        return XDP_PASS;
    u32 src = ip->saddr;
    if (MAP.lookup(&src))
        return XDP_DROP;
    return XDP_PASS;
}
"""


def body(index: int) -> str:
    return BODY.replace("MAP", f"blocked{index}").replace("FN", f"body{index}")


def direct_source() -> str:
    calls = "".join(f"    if ((v = body{i}(ctx)) != XDP_PASS) return v;\n" for i in range(NFS))
    bodies = "".join(body(i) for i in range(NFS))
    return bodies + "int direct(struct xdp_md *ctx)\n{\n    int v;\n" + calls + "    return v;\n}\n"


def packet() -> bytes:
    eth = b"\x02" * 6 + b"\x04" * 6 + struct.pack("!H", 0x0800)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 50, 0, 0, 64, 17, 0, bytes([10, 0, 0, 2]),
                     bytes([10, 0, 0, 1]))  # fmt: skip
    udp = struct.pack("!HHHH", 4000, 53, 30, 0)
    return eth + ip + udp + b"\0" * 22


def run_ns(prog_fd: int, data: bytes, repeat: int) -> float:
    data_in = ctypes.create_string_buffer(data, len(data))
    data_out = ctypes.create_string_buffer(len(data) + 256)
    attr = _TestRunAttr(
        prog_fd=prog_fd,
        data_size_in=len(data),
        data_size_out=len(data) + 256,
        data_in=ctypes.addressof(data_in),
        data_out=ctypes.addressof(data_out),
        repeat=repeat,
    )
    syscall._bpf(BPF_PROG_TEST_RUN, attr, "BPF_PROG_TEST_RUN")
    if attr.retval != 2:
        raise RuntimeError(f"the packet did not pass (retval {attr.retval})")
    return float(attr.duration)


class BareChain:
    """The floor of any chaining: each body then a tail call to a constant next slot (no
    dispatcher, no cursor, no counters); program 0 is run."""

    def __init__(self, root: Path, indirect: bool = False) -> None:
        from bcc import BPF

        root.mkdir(parents=True, exist_ok=True)
        pin = root / "bare_chain"
        next_pin = root / "bare_next"
        self.modules = []
        fds = []
        for index in range(NFS):
            # indirect: the slot comes from a map, so the kernel cannot patch the tail call
            # into a direct jump (nfctl's wrappers read theirs from the cursor)
            slot = f"{index + 1}"
            if indirect:
                slot = f"(nx = bare_next.lookup(&k)) ? *nx + {index} : {index + 1}"
            tail = f"    u32 k = 0, *nx; bare_chain.call(ctx, {slot});\n" if index + 1 < NFS else ""
            text = (
                f'BPF_TABLE_PINNED("prog", u32, u32, bare_chain, 8, "{pin}");\n'
                + f'BPF_TABLE_PINNED("array", u32, u32, bare_next, 1, "{next_pin}");\n'
                + body(index)
                + f"int bare{index}(struct xdp_md *ctx)\n{{\n"
                + f"    int v = body{index}(ctx);\n    if (v != XDP_PASS) return v;\n"
                + tail
                + "    return XDP_PASS;\n}\n"
            )
            self.modules.append(BPF(text=text))
            fds.append(self.modules[-1].load_func(f"bare{index}", BPF.XDP).fd)
        with BpfMap.from_pin(str(pin)) as chain:
            for position, fd in enumerate(fds[1:], start=1):
                chain.update(struct.pack("<I", position), struct.pack("<I", fd))
        with BpfMap.from_pin(str(next_pin)) as nxt:
            nxt.update(struct.pack("<I", 0), struct.pack("<I", 1))
        self.entry_fd = fds[0]

    def close(self) -> None:
        for module in self.modules:
            module.cleanup()


class Chain:
    """nfctl's dispatcher and NFS wrapped NFs, chained in slots 0..NFS-1 of a fresh root."""

    def __init__(
        self, root: Path, counters: bool, fixed_slots: bool = False, fixed_ids: bool = False
    ) -> None:
        from bcc import BPF

        paths = BpffsPaths(root)
        self.chain_pin = paths.chain("xdp")
        cpins = paths.counter_pins("xdp")
        pins = BuildPins(
            chain_path=str(paths.chain("xdp")),
            cursor_path=str(paths.cursor("xdp")),
            heads_path=str(paths.heads("xdp")),
            heads_index_path=str(paths.heads_index("xdp")),
            counters_path=str(cpins.counters),
            slots_path=str(cpins.slots),
        )
        ensure_maps(cpins)
        self.table = CounterTable(cpins)
        self.keys = [CounterKey(f"nf{i}", LOOPBACK_IFINDEX, Hook.XDP) for i in range(NFS)]
        ids = [self.table.counter_id(k) for k in self.keys]
        self.modules = [BPF(text=dispatcher_program(Hook.XDP, pins))]
        self.dispatcher_fd = self.modules[0].load_func(dispatcher_name(Hook.XDP), BPF.XDP).fd
        fds = []
        for index in range(NFS):
            build = f"{index + 1:064x}"
            text = nf_program(
                source_rel=f"nf{index}.c",
                source_text=body(index),
                function=f"body{index}",
                hook=Hook.XDP,
                build_hash=build,
                pins=pins,
                names=ChainNames.fresh(),
                counters=counters,
                fixed_slot=index if fixed_slots else None,
                fixed_counter_id=ids[index] if fixed_ids else None,
            )
            self.modules.append(BPF(text=text))
            fds.append(self.modules[-1].load_func(entry_name(build), BPF.XDP).fd)
        self.first_nf_fd = fds[0]
        self.nf_fds = fds
        self.table.label_slots(0, ids)
        with BpfMap.from_pin(pins.chain_path or "") as chain:
            for slot, fd in enumerate(fds):
                chain.update(struct.pack("<I", slot), struct.pack("<I", fd))
        table = ChainTable.open(paths.chain("xdp"), paths.heads("xdp"), paths.heads_index("xdp"))
        table.switch_head(LOOPBACK_IFINDEX, Hook.XDP, 0)
        table.close()

    def slot_write_us(self, writes: int) -> dict[str, float]:
        """p50 / p99 of prog-array writes into slot 2, alternately NF 3's and NF 2's
        program (the chain is left as it was)."""
        with BpfMap.from_pin(str(self.chain_pin)) as chain:
            writer = syscall.U32Writer(chain)
            spent = []
            for i in range(writes):
                start = time.perf_counter_ns()
                writer.write(2, self.nf_fds[3 if i % 2 == 0 else 2])
                spent.append((time.perf_counter_ns() - start) / 1000)
            writer.write(2, self.nf_fds[2])
        return {"p50": round(percentile(spent, 50), 1), "p99": round(percentile(spent, 99), 1)}

    def passed(self) -> list[int]:
        counts = self.table.read()
        return [counts[k].enforce["pass"] for k in self.keys]

    def close(self) -> None:
        self.table.close()
        for module in self.modules:
            module.cleanup()


def mitigations() -> dict[str, str]:
    """The CPU's Spectre v2 and return-stack mitigations: what an indirect jump (a tail
    call through a map) and a return (a subprogram call) cost depends on them."""
    base = Path("/sys/devices/system/cpu/vulnerabilities")
    return {
        name: (base / name).read_text().strip() if (base / name).exists() else "unknown"
        for name in ("spectre_v2", "spec_rstack_overflow", "retbleed")
    }


def paired(values: list[float], baseline: list[float]) -> float:
    return round(statistics.median(v - b for v, b in zip(values, baseline, strict=True)) / NFS, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=2_000_000)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--writes", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.repeat < 1_000_000:
        parser.error("--repeat must be at least 1e6")

    from bcc import BPF

    root = Path("/sys/fs/bpf") / f"nfctl-bench-chain-{uuid.uuid4().hex[:8]}"
    direct = BPF(text=direct_source())
    chains: dict[str, Chain] = {}
    bares: dict[str, BareChain] = {}
    try:
        direct_fd = direct.load_func("direct", BPF.XDP).fd
        bares["bare_tail_calls"] = BareChain(root / "bare")
        bares["bare_indirect_tail_calls"] = BareChain(root / "indirect", indirect=True)
        chains["chain"] = Chain(root / "plain", counters=False)
        chains["chain_counters"] = Chain(root / "counted", counters=True)
        chains["chain_constant_slots"] = Chain(root / "fixed", counters=True, fixed_slots=True)
        chains["fixed_plain"] = Chain(root / "fixed-plain", counters=False, fixed_slots=True)
        chains["fixed_ids"] = Chain(
            root / "fixed-ids", counters=True, fixed_slots=True, fixed_ids=True
        )
        # entered at the first NF (no dispatcher)
        probes = {
            "wrappers_constant_slots": chains["chain_constant_slots"],
            "wrappers_constant_slots_no_counters": chains["fixed_plain"],
            "wrappers_constant_slots_and_counter_ids": chains["fixed_ids"],
        }
        data = packet()
        samples: dict[str, list[float]] = {
            name: []
            for name in (
                "direct",
                "bare_tail_calls",
                "bare_indirect_tail_calls",
                "chain",
                "chain_counters",
                *VARIANTS_PROBED,
            )
        }
        for _ in range(args.runs):
            samples["direct"].append(run_ns(direct_fd, data, args.repeat))
            for name, bare in bares.items():
                samples[name].append(run_ns(bare.entry_fd, data, args.repeat))
            for name in ("chain", "chain_counters", "chain_constant_slots"):
                samples[name].append(run_ns(chains[name].dispatcher_fd, data, args.repeat))
            for name, chain in probes.items():
                samples[name].append(run_ns(chain.first_nf_fd, data, args.repeat))
        runs_total = args.runs * args.repeat
        passed = chains["chain_counters"].passed()
        if passed != [runs_total] * NFS:
            raise RuntimeError(f"not every NF counted every packet: {passed}")
        # run through the dispatcher and entered at the first NF: twice per run
        fixed_passed = chains["chain_constant_slots"].passed()
        if fixed_passed != [2 * runs_total] * NFS:
            raise RuntimeError(f"not every constant-slot NF counted every packet: {fixed_passed}")
        if chains["fixed_ids"].passed() != [runs_total] * NFS:
            raise RuntimeError("not every NF with a constant counter entry counted every packet")
        slot_writes = {
            name: chains[name].slot_write_us(args.writes)
            for name in ("chain_counters", "chain_constant_slots")
        }
    finally:
        for chain in chains.values():
            chain.close()
        for bare in bares.values():
            bare.close()
        direct.cleanup()
        remove_tree(root)

    med = {name: statistics.median(values) for name, values in samples.items()}
    result: dict[str, Any] = {
        "nfs": NFS,
        "repeat": args.repeat,
        "runs": args.runs,
        "direct_ns": med["direct"],
        "bare_tail_calls_ns": med["bare_tail_calls"],
        "bare_indirect_tail_calls_ns": med["bare_indirect_tail_calls"],
        "chain_ns": med["chain"],
        "chain_counters_ns": med["chain_counters"],
        # per NF: what the chain adds over the bodies run directly, what counting adds on
        # top, and both together (the issue's target: < 3 ns per NF)
        "bare_tail_calls_per_nf_ns": round((med["bare_tail_calls"] - med["direct"]) / NFS, 2),
        "chain_per_nf_ns": round((med["chain"] - med["direct"]) / NFS, 2),
        "counters_per_nf_ns": round((med["chain_counters"] - med["chain"]) / NFS, 2),
        "chain_counters_per_nf_ns": round((med["chain_counters"] - med["direct"]) / NFS, 2),
        "probes_ns": {name: med[name] for name in VARIANTS_PROBED},
        # the same deltas from each run's own measurements (paired), then the median: the
        # shared machine's load drifts between runs more than within one
        "paired_per_nf_ns": {
            "bare_tail_calls": paired(samples["bare_tail_calls"], samples["direct"]),
            "bare_indirect_tail_calls": paired(
                samples["bare_indirect_tail_calls"], samples["direct"]
            ),
            "chain": paired(samples["chain"], samples["direct"]),
            "counters": paired(samples["chain_counters"], samples["chain"]),
            "chain_counters": paired(samples["chain_counters"], samples["direct"]),
            **{name: paired(samples[name], samples["direct"]) for name in VARIANTS_PROBED},
        },
        "counted_packets_per_nf": passed[0],
        "slot_write_us": slot_writes,
        "mitigations": mitigations(),
        "samples_ns": samples,
        "machine": machine(),
    }
    emit(result, args.json)


if __name__ == "__main__":
    main()
