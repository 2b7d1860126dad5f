"""Restart cost: a fresh process rediscovers 50 attached NFs (10 interfaces x 5-NF chains)
from pins and the kernel, and confirms each matches its build hash, without compiling.

    sudo .venv/bin/python -m benchmarks.rediscover --nfs 50 --json
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks.common import emit, machine, summary_ms
from nfctl.builder.builder import Builder
from nfctl.datapath.datapath import ChainMember, Datapath
from nfctl.datapath.pins import remove_tree
from nfctl.manifest.model import Hook
from nfctl.netns import VethPair, run, unique_name

TRIVIAL_NF = """
BPF_ARRAY(hits, u64, 1);
int xdp_n(struct xdp_md *ctx) {
    int k = 0;
    u64 *v = hits.lookup(&k);
    if (v) __sync_fetch_and_add(v, ID);
    return XDP_PASS;
}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nfs", type=int, default=50)
    parser.add_argument("--per-interface", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from tests.helpers import prepare_nf, write_nf

    root = Path("/sys/fs/bpf") / f"nfctl-bench-{uuid.uuid4().hex[:8]}"
    interfaces = (args.nfs + args.per_interface - 1) // args.per_interface
    with tempfile.TemporaryDirectory() as tmp, VethPair.create(unique_name("rd")) as pair:
        repo, state = Path(tmp) / "repo", Path(tmp) / "state"
        for i in range(interfaces):
            run(
                "ip",
                "link",
                "add",
                f"rd{i}",
                "type",
                "veth",
                "peer",
                "name",
                f"rp{i}",
                netns=pair.ns_a,
            )
            run("ip", "link", "set", f"rd{i}", "up", netns=pair.ns_a)
        dp = Datapath(root, state, netns=pair.ns_a)
        desired: dict[tuple[str, Hook], list[str]] = {}
        hashes: dict[str, str] = {}
        load_start = time.monotonic()
        try:
            for i in range(args.nfs):
                name = f"nf{i:03d}"
                write_nf(repo, name, TRIVIAL_NF, "xdp_n", cflags=[f"-DID={i + 1}"])
                prepared = prepare_nf(repo, name)
                hashes[name] = prepared.build_hash
                Builder(dp).build(prepared)
                ifname = f"rd{i // args.per_interface}"
                desired.setdefault((ifname, Hook.XDP), []).append(name)
            first_load = time.monotonic() - load_start
            for (ifname, hook), names in desired.items():
                members = [
                    ChainMember(n, hashes[n], dp.paths.prog_pin(n, hashes[n])) for n in names
                ]
                dp.set_chain(ifname, hook, members)
            dp.close()

            timings = []
            for _ in range(args.rounds):
                start = time.perf_counter()
                fresh = Datapath(root, state, netns=pair.ns_a)
                adopted = [fresh.find_loaded(n, h) for n, h in hashes.items()]
                points = fresh.observe(desired)
                timings.append(time.perf_counter() - start)
                assert all(a is not None and not a.compiled for a in adopted)
                assert len(points) == interfaces and all(p.drift == [] for p in points), [
                    p.drift for p in points
                ]
                fresh.close()
        finally:
            Datapath(root, state, netns=pair.ns_a).teardown()
            remove_tree(root)
    emit(
        {
            "nfs": args.nfs,
            "attach_points": interfaces,
            "rediscover_ms": summary_ms(timings),
            "initial_compile_and_load_s": round(first_load, 2),
            "compiled_on_rediscovery": 0,
            "machine": machine(),
        },
        args.json,
    )


if __name__ == "__main__":
    main()
