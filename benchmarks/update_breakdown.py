"""Where one nfctl chain update spends its time, next to the single syscalls it is
compared with (same run, same machine).

Swaps two versions of a counting NF on one veth (no traffic needed: the cost is on the
agent's side) N times: first unwrapped (the update as it runs), then with a
perf_counter_ns timer around each step of Datapath.set_chain (inclusive times; install
contains allocate, the head lookup and the counter labels). A one-NF version swap takes
the fast path (one slot write); --full-path turns it off, so every update takes the
fresh range and head switch that any other chain change takes. Baselines in the same run:
the head switch alone (the map updates that make a chain live) and a bare
BPF_LINK_UPDATE of a TCX / XDP link between two standalone programs.

    sudo .venv/bin/python -m benchmarks.update_breakdown --hook tc-ingress --updates 1000
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.common import emit, machine, percentile
from benchmarks.update_loss import _load_versions, _standalone
from nfctl.datapath import (
    attach,
    chain,
    chains,
    chainset,
    counters,
    datapath,
    interfaces,
    links,
    tc,
)
from nfctl.datapath.datapath import ChainMember, Datapath
from nfctl.datapath.pins import remove_tree
from nfctl.manifest.model import Hook
from nfctl.netns import VethPair, unique_name

# (owner, attribute, label): the steps of set_chain, outermost first
STEPS: list[tuple[Any, str, str]] = [
    (datapath.Datapath, "set_chain", "set_chain (total)"),
    (datapath.Datapath, "ifindex", "interface index (ioctl)"),
    (chains.LiveChains, "get", "live chain known for the interface"),
    (chain.ChainTable, "live_head", "swap check: the head packets take (mapped array)"),
    (chain.ChainTable, "head", "head lookup (hash)"),
    (chain.ChainTable, "replace_slot", "slot write (one prog-array update)"),
    (chains.ProgramFds, "fd", "program pin fds (opened once per version)"),
    (chains.LiveChains, "record", "remember the live chain"),
    (chainset.ChainSetter, "_install", "full path: fresh range + head switch + attach"),
    (counters.CounterTable, "counter_id", "  counter ids (lookup per NF)"),
    (chain.ChainTable, "install", "  chain install (write range + head switch)"),
    (chain.ChainTable, "_allocate", "    allocate a free range"),
    (counters.CounterTable, "label_slots", "    label slots with counter ids"),
    (counters.CounterTable, "release", "  release counters of departed NFs"),
    (attach.HookAttacher, "uses_link", "  attach policy probe (cached)"),
    (tc, "has_clsact", "  clsact check (netlink path only)"),
    (attach.HookAttacher, "attach", "  attach check (our link / filter in place)"),
    (interfaces.TouchedInterfaces, "note_hook", "  interface state file"),
]


@contextmanager
def timed_steps() -> Iterator[dict[str, list[int]]]:
    spent: dict[str, list[int]] = defaultdict(list)
    saved = []
    for owner, name, label in STEPS:
        original = owner.__dict__[name]
        func = original.__func__ if isinstance(original, classmethod | staticmethod) else original

        def timer(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
            @functools.wraps(fn)
            def run(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter_ns()
                try:
                    return fn(*args, **kwargs)
                finally:
                    spent[label].append(time.perf_counter_ns() - start)

            return run

        wrapped: Any = timer(func, label)
        if isinstance(original, classmethod):
            wrapped = classmethod(wrapped)
        elif isinstance(original, staticmethod):
            wrapped = staticmethod(wrapped)
        saved.append((owner, name, original))
        setattr(owner, name, wrapped)
    try:
        yield spent
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def _us(samples: list[int], pct: float) -> float:
    return round(percentile([s / 1000 for s in samples], pct), 1)


def _swap(
    dp: Datapath, pair: VethPair, hook: Hook, members: list[ChainMember], n: int
) -> list[int]:
    out = []
    for i in range(n):
        start = time.perf_counter_ns()
        dp.set_chain(pair.a_if, hook, [members[(i + 1) % 2]])
        out.append(time.perf_counter_ns() - start)
        dp.reap()  # outside the timing, as the agent reaps after applying
    return out


def _head_switch(dp: Datapath, pair: VethPair, hook: Hook, n: int) -> list[int]:
    table = dp.table(hook)
    ifindex = dp.ifindex(pair.a_if)
    base = table.head(ifindex, hook)
    assert base is not None
    out = []
    for _ in range(n):
        start = time.perf_counter_ns()
        table.switch_head(ifindex, hook, base)
        out.append(time.perf_counter_ns() - start)
    return out


def _observe(dp: Datapath, n: int) -> list[int]:
    """The observation a reconcile pass makes before it changes anything
    (Datapath.observe): where the swap's checks are made, whether our dispatcher still
    runs on the hook and which range is the head."""
    out = []
    for _ in range(n):
        start = time.perf_counter_ns()
        dp.observe()
        out.append(time.perf_counter_ns() - start)
    return out


def _link_update(pair: VethPair, hook: Hook, root: Path, n: int) -> list[int]:
    """A bare BPF_LINK_UPDATE between two standalone programs, on the other veth end."""
    _objs, fds = _standalone(hook, root / "bench-seen")
    from pyroute2 import IPRoute

    with IPRoute(netns=pair.ns_b) as ipr:
        index = int(ipr.link_lookup(ifname=pair.b_if)[0])
    direction = "egress" if hook is Hook.TC_EGRESS else "ingress"
    attach_type = links.BPF_XDP if hook is Hook.XDP else links.TCX_ATTACH_TYPE[direction]
    with links.in_netns(pair.ns_b):
        link = links.link_create(fds[0], index, attach_type)
    out = []
    try:
        for i in range(n):
            start = time.perf_counter_ns()
            links.link_update(link, fds[(i + 1) % 2], fds[i % 2])
            out.append(time.perf_counter_ns() - start)
    finally:
        links.link_detach(link)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hook", choices=[h.value for h in Hook], default="tc-ingress")
    parser.add_argument("--updates", type=int, default=1000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--full-path",
        action="store_true",
        help="disable the one-NF swap fast path: every update takes a fresh range and the "
        "head switch (the path every other chain change takes)",
    )
    args = parser.parse_args()
    hook = Hook(args.hook)
    if args.full_path:
        chains.swap_offset = lambda live, wanted: None
    root = Path("/sys/fs/bpf") / f"nfctl-bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp, VethPair.create(unique_name("ub")) as pair:
        dp = Datapath(root, Path(tmp) / "state", netns=pair.ns_a)
        try:
            builds = _load_versions(dp, Path(tmp) / "repo", hook)
            members = [ChainMember(b.nf, b.build_hash, b.prog_pin) for b in builds]
            attach = dp.set_chain(pair.a_if, hook, [members[0]])
            _swap(dp, pair, hook, members, 50)  # warm-up
            plain = _swap(dp, pair, hook, members, args.updates)
            with timed_steps() as spent:
                _swap(dp, pair, hook, members, args.updates)
            switch = _head_switch(dp, pair, hook, args.updates)
            observed = _observe(dp, min(args.updates, 200))
            link = _link_update(pair, hook, root, args.updates)
        finally:
            dp.teardown()
            remove_tree(root)
    total = sum(spent["set_chain (total)"])
    emit(
        {
            "hook": hook.value,
            "attach": attach,
            "updates": args.updates,
            "path": "full (fresh range + head switch)" if args.full_path else "one-NF swap",
            "set_chain_us": {"p50": _us(plain, 50), "p99": _us(plain, 99)},
            "steps_us_per_update": {
                label: {
                    "p50": _us(spent[label], 50),
                    "p99": _us(spent[label], 99),
                    "mean": round(sum(spent[label]) / args.updates / 1000, 1),
                    "share": round(sum(spent[label]) / total, 3),
                    "calls_per_update": round(len(spent[label]) / args.updates, 2),
                }
                for _, _, label in STEPS
                if spent[label]
            },
            "head_switch_us": {"p50": _us(switch, 50), "p99": _us(switch, 99)},
            "link_update_us": {"p50": _us(link, 50), "p99": _us(link, 99)},
            # once per reconcile pass, not per update: its checks are why a swap needs none
            "observe_pass_us": {"p50": _us(observed, 50), "p99": _us(observed, 99)},
            "machine": machine(),
        },
        args.json,
    )


if __name__ == "__main__":
    main()
