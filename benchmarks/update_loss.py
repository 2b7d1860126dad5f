"""Live NF updates under traffic: nfctl's atomic chain switch vs detach-then-attach.

Two versions of an NF that count ICMP echo packets into one pinned map are swapped N
times on a veth in throwaway namespaces while `ping -f` runs through the hook.
  lost      = echo requests sent - replies received
  bypassed  = packets that went through without the NF counting them
The baseline does what tools without atomic replace do: detach, then attach the other
version (same programs, same maps, same traffic).

    sudo .venv/bin/python benchmarks/update_loss.py --hook xdp --updates 1000 --json
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.common import Flood, emit, machine, percentile
from nfctl.datapath.datapath import ChainMember, Datapath, LoadedBuild
from nfctl.datapath.pins import remove_tree
from nfctl.manifest.model import Hook
from nfctl.testing.netns import VethPair, unique_name


def _load_versions(dp: Datapath, folder: Path, hook: Hook) -> tuple[LoadedBuild, LoadedBuild]:
    from tests.helpers import prepare_nf, write_nf
    from tests.nfsources import counting_nf

    builds = []
    for version in (1, 2):
        source, function, cflags = counting_nf(hook.value, version)
        write_nf(folder, "bench", source, function, hook=hook.value, cflags=cflags)
        builds.append(dp.load(prepare_nf(folder, "bench")))
    return builds[0], builds[1]


def _counted(dp: Datapath, build: LoadedBuild, hook: Hook) -> int:
    counts = dict(dp.map_entries(build, "seen"))
    return int(counts[1] if hook is Hook.TC_EGRESS else counts[0])


def run_mode(
    dp: Datapath,
    pair: VethPair,
    hook: Hook,
    builds: tuple[LoadedBuild, LoadedBuild],
    updates: int,
    detach_first: bool,
) -> dict[str, Any]:
    members = [ChainMember(b.nf, b.build_hash, b.prog_pin) for b in builds]
    dp.set_chain(pair.a_if, hook, [members[0]])
    time.sleep(0.1)
    counted_before = _counted(dp, builds[0], hook)
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
        "bypassed": max(0, received - counted),
        "update_ms_p50": round(percentile(timings, 50) * 1000, 3),
        "update_ms_p99": round(percentile(timings, 99) * 1000, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hook", choices=[h.value for h in Hook], default="xdp")
    parser.add_argument("--updates", type=int, default=1000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    hook = Hook(args.hook)
    root = Path("/sys/fs/bpf") / f"nfctl-bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp, VethPair.create(unique_name("ul")) as pair:
        dp = Datapath(root, Path(tmp) / "state", netns=pair.ns_a)
        try:
            builds = _load_versions(dp, Path(tmp) / "repo", hook)
            ours = run_mode(dp, pair, hook, builds, args.updates, detach_first=False)
            dp.clear_chain(pair.a_if, hook)
            baseline = run_mode(dp, pair, hook, builds, args.updates, detach_first=True)
        finally:
            dp.teardown()
            remove_tree(root)
    ours["baseline"] = {**baseline, "method": "detach then attach (what unload+reload tools do)"}
    ours["method"] = "nfctl: new chain range + atomic head switch"
    ours["machine"] = machine()
    emit(ours, args.json)


if __name__ == "__main__":
    main()
