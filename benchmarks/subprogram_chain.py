"""A design probe for issue #12: five NFs compiled separately and linked at load time into
one program as BPF-to-BPF subprograms, called in turn by a main that counts each verdict
(the shape of a chain with no tail calls: one program per attach point, replaced whole by a
link update). Measured with BPF_PROG_TEST_RUN against the same five bodies inlined into one
program (chain_overhead's floor), paired per run.

Each NF is compiled by BCC on its own (its source shares no translation unit with another
NF's); the main is compiled with a stub per NF that is never inlined, and the stubs' calls
are pointed at the NFs' instructions appended after it. Not what the agent runs.

    sudo .venv/bin/python -m benchmarks.subprogram_chain --json
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
from collections.abc import Iterator
from typing import Any

from benchmarks.chain_overhead import NFS, body, direct_source, mitigations, packet, run_ns
from benchmarks.common import emit, machine
from nfctl.bpf import syscall

INSN_SIZE = syscall.BPF_INSN_SIZE
CALL = 0x85  # BPF_JMP | BPF_CALL
PSEUDO_CALL = 1  # src_reg of a call to a subprogram (imm: offset from the next insn)


def main_source(counters: bool) -> str:
    """The main program: calls nf0..nf4 in turn, stops at the first verdict that is not a
    pass. The stubs use ctx through an asm statement so that the compiler keeps passing the
    context pointer (the NF bodies need it) and cannot fold their results."""
    stubs = "".join(
        f"static __attribute__((__noinline__)) int nf{i}(struct xdp_md *ctx) {{\n"
        '    asm volatile("" :: "r"(ctx) : "memory");\n'
        f"    return ctx->ingress_ifindex == 0x7ffffff ? {100 + i} : XDP_PASS;\n}}\n"
        for i in range(NFS)
    )
    table = "struct sub_v { u64 v[4]; };\nBPF_PERCPU_ARRAY(sub_counters, struct sub_v, 8);\n"
    calls = ""
    for i in range(NFS):
        calls += f"    v = nf{i}(ctx);\n"
        if counters:
            calls += (
                f"    {{ u32 id = {i}; struct sub_v *c = sub_counters.lookup(&id);\n"
                "      if (c) c->v[v == XDP_PASS ? 0 : v == XDP_DROP ? 1 : "
                "v == XDP_TX || v == XDP_REDIRECT ? 2 : 3] += 1; }\n"
            )
        calls += "    if (v != XDP_PASS) return v;\n"
    entry = "int sub_main(struct xdp_md *ctx)\n{\n    int v;\n"
    return table + stubs + entry + calls + "    return v;\n}\n"


def instructions(raw: bytes) -> Iterator[tuple[int, int, int]]:
    """(index, opcode, src_reg) of each instruction."""
    for index in range(len(raw) // INSN_SIZE):
        code, regs = struct.unpack_from("<BB", raw, index * INSN_SIZE)
        yield index, code, regs >> 4


def link(main: bytes, nfs: list[bytes]) -> bytes:
    """main's subprogram calls (in order) pointed at the NFs' instructions, appended."""
    calls = [i for i, code, src in instructions(main) if code == CALL and src == PSEUDO_CALL]
    if len(calls) != len(nfs):
        raise RuntimeError(f"{len(calls)} subprogram calls in the main, {len(nfs)} NFs")
    out = bytearray(main)
    start = len(main) // INSN_SIZE
    for call, nf in zip(calls, nfs, strict=True):
        struct.pack_into("<i", out, call * INSN_SIZE + 4, start - (call + 1))
        start += len(nf) // INSN_SIZE
    for nf in nfs:
        out += nf
    return bytes(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=2_000_000)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from bcc import BPF

    modules = [BPF(text=body(i) + f"int nf{i}(struct xdp_md *ctx) {{ return body{i}(ctx); }}\n")
               for i in range(NFS)]  # fmt: skip
    nfs = [m.dump_func(f"nf{i}") for i, m in enumerate(modules)]
    fds: dict[str, int] = {}
    direct = BPF(text=direct_source())
    try:
        for name, counters in (("subprograms", False), ("subprograms_counters", True)):
            module = BPF(text=main_source(counters))
            modules.append(module)
            linked = link(module.dump_func("sub_main"), nfs)
            fds[name] = syscall.prog_load(
                syscall.PROG_TYPE_XDP, linked, "sub_main", "load the linked program"
            )
        fds["direct"] = direct.load_func("direct", BPF.XDP).fd
        data = packet()
        samples: dict[str, list[float]] = {name: [] for name in fds}
        for _ in range(args.runs):
            for name, fd in fds.items():
                samples[name].append(run_ns(fd, data, args.repeat))
    finally:
        for name, fd in fds.items():
            if name != "direct":
                os.close(fd)
        for module in [*modules, direct]:
            module.cleanup()
    paired = {
        name: round(
            statistics.median(
                v - d for v, d in zip(samples[name], samples["direct"], strict=True)
            ) / NFS,
            2,
        )
        for name in ("subprograms", "subprograms_counters")
    }  # fmt: skip
    result: dict[str, Any] = {
        "nfs": NFS,
        "repeat": args.repeat,
        "runs": args.runs,
        "direct_ns": statistics.median(samples["direct"]),
        "subprograms_ns": statistics.median(samples["subprograms"]),
        "subprograms_counters_ns": statistics.median(samples["subprograms_counters"]),
        "paired_per_nf_ns": paired,
        "mitigations": mitigations(),
        "machine": machine(),
    }
    emit(result, args.json)


if __name__ == "__main__":
    main()
