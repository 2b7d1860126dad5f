"""Per-NF verdict counters in the chain wrapper, and monitor mode, with real packets.

The veth pair is made quiet (static neighbours, no IPv6) so the only packets a's ingress
sees are the test's echo requests: the counters must equal what was sent exactly."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
import yaml

from nfctl.builder.builder import Builder
from nfctl.datapath.counters import CounterKey, VerdictCounts
from nfctl.datapath.datapath import ChainMember, Datapath, DatapathError, LoadedBuild
from nfctl.manifest.model import Hook
from nfctl.netns import VethPair, run
from tests.helpers import prepare_nf, write_nf

pytestmark = pytest.mark.kernel

HOOKS = [Hook.XDP, Hook.TC_INGRESS]
REPLY_WAIT_S = 0.3

# Drops ICMP echo requests from BLOCKED (an IPv4 address as a host-order integer of the
# network-order value the packet holds); everything else passes.
BLOCKER = r"""
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#ifndef VERSION
#define VERSION 1
#endif
BPF_ARRAY(builds, u32, 1);
int FN(CTX *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    u32 zero = 0, version = VERSION;
    builds.update(&zero, &version);
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end || eth->h_proto != htons(ETH_P_IP))
        return PASS;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end)
        return PASS;
    if (ip->protocol == IPPROTO_ICMP && ip->saddr == BLOCKED)
        return DROP;
    return PASS;
}
"""


def blocker_source(hook: Hook) -> tuple[str, str]:
    if hook is Hook.XDP:
        names = {"FN": "xdp_block", "CTX": "struct xdp_md", "PASS": "XDP_PASS", "DROP": "XDP_DROP"}
    else:
        names = {"FN": "tc_block", "CTX": "struct __sk_buff", "PASS": "TC_ACT_OK"}
        names["DROP"] = "TC_ACT_SHOT"
    source = BLOCKER
    for placeholder, value in names.items():
        source = source.replace(placeholder, value)
    return source, names["FN"]


def load_blocker(
    dp: Datapath,
    folder: Path,
    hook: Hook,
    blocked: str,
    *,
    name: str = "blocker",
    version: int = 1,
    mode: str | None = None,
    priority: int = 100,
) -> LoadedBuild:
    source, function = blocker_source(hook)
    as_int = int.from_bytes(ipaddress.IPv4Address(blocked).packed, "little")
    cflags = [f"-DBLOCKED={as_int}u", f"-DVERSION={version}"]
    path = write_nf(
        folder, name, source, function, hook=hook.value, cflags=cflags, priority=priority
    )
    if mode is not None:
        manifest = yaml.safe_load(path.read_text())
        manifest["spec"]["mode"] = mode
        path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return Builder(dp).build(prepare_nf(folder, name))


def member(loaded: LoadedBuild) -> ChainMember:
    return ChainMember(loaded.nf, loaded.build_hash, loaded.prog_pin)


def mac(ns: str, ifname: str) -> str:
    return str(json.loads(run("ip", "-j", "link", "show", ifname, netns=ns))[0]["address"])


def quiet(veth: VethPair) -> str:
    """No ARP, no IPv6 on the pair; returns a second (allowed) source address on b."""
    other = str(ipaddress.ip_interface(f"{veth.b_ip}/24").network[3])
    veth.add_b_address(other)
    a_mac, b_mac = mac(veth.ns_a, veth.a_if), mac(veth.ns_b, veth.b_if)
    for ns, ifname in ((veth.ns_a, veth.a_if), (veth.ns_b, veth.b_if)):
        run("sysctl", "-qw", f"net.ipv6.conf.{ifname}.disable_ipv6=1", netns=ns)
    for ip in (veth.b_ip, other):
        run("ip", "neigh", "replace", ip, "lladdr", b_mac, "dev", veth.a_if, "nud", "permanent",
            netns=veth.ns_a)  # fmt: skip
    run("ip", "neigh", "replace", veth.a_ip, "lladdr", a_mac, "dev", veth.b_if, "nud",
        "permanent", netns=veth.ns_b)  # fmt: skip
    return other


def ping_from(veth: VethPair, source: str, count: int) -> int:
    return veth.ping(veth.ns_b, veth.a_ip, count, source=source, timeout_s=REPLY_WAIT_S)


def counts(dp: Datapath, veth: VethPair, nf: str, hook: Hook) -> VerdictCounts:
    index = dp.ifindex(veth.a_if)
    return dp.verdict_counts().get(CounterKey(nf, index, hook), VerdictCounts.zero())


def verdicts(c: VerdictCounts, mode: str = "enforce") -> dict[str, int]:
    return {k: v for k, v in c.by_mode()[mode].items() if v}


@pytest.mark.parametrize("hook", HOOKS, ids=lambda h: h.value)
def test_counters_match_traffic_and_survive_a_version_swap(
    datapath: Datapath, veth: VethPair, tmp_path: Path, hook: Hook
) -> None:
    allowed = quiet(veth)
    blocker = load_blocker(datapath, tmp_path, hook, veth.b_ip, priority=10)
    # a second NF behind it: it only sees what the first let through
    after = load_blocker(datapath, tmp_path, hook, "192.0.2.1", name="after", priority=20)
    datapath.set_chain(veth.a_if, hook, [member(blocker), member(after)])

    assert ping_from(veth, allowed, 7) == 7
    assert ping_from(veth, veth.b_ip, 5) == 0
    first = counts(datapath, veth, "blocker", hook)
    assert verdicts(first) == {"pass": 7, "drop": 5}
    assert first.errors == 0 and first.packets == 12
    assert verdicts(counts(datapath, veth, "after", hook)) == {"pass": 7}

    # a new version of the blocker: a fresh program and slot range, the same counters
    v2 = load_blocker(datapath, tmp_path, hook, veth.b_ip, version=2, priority=10)
    assert v2.prog_id != blocker.prog_id
    datapath.set_chain(veth.a_if, hook, [member(v2), member(after)])
    assert ping_from(veth, allowed, 3) == 3
    assert ping_from(veth, veth.b_ip, 2) == 0
    assert verdicts(counts(datapath, veth, "blocker", hook)) == {"pass": 10, "drop": 7}

    # the agent's restart: a new Datapath reads the same pinned counters
    with Datapath(datapath.paths.root, tmp_path / "state", netns=veth.ns_a) as again:
        assert verdicts(counts(again, veth, "blocker", hook)) == {"pass": 10, "drop": 7}


@pytest.mark.parametrize("hook", HOOKS, ids=lambda h: h.value)
def test_monitor_mode_counts_drops_but_lets_packets_through(
    datapath: Datapath, veth: VethPair, tmp_path: Path, hook: Hook
) -> None:
    quiet(veth)
    monitored = load_blocker(datapath, tmp_path, hook, veth.b_ip, mode="monitor")
    datapath.set_chain(veth.a_if, hook, [member(monitored)])
    assert ping_from(veth, veth.b_ip, 6) == 6
    c = counts(datapath, veth, "blocker", hook)
    assert verdicts(c, "monitor") == {"drop": 6} and verdicts(c) == {}

    # switching to enforce is a new build swapped in like any version
    enforced = load_blocker(datapath, tmp_path, hook, veth.b_ip, mode="enforce")
    assert enforced.build_hash != monitored.build_hash
    datapath.set_chain(veth.a_if, hook, [member(enforced)])
    assert ping_from(veth, veth.b_ip, 4) == 0
    c = counts(datapath, veth, "blocker", hook)
    assert verdicts(c, "monitor") == {"drop": 6} and verdicts(c) == {"drop": 4}


def test_a_missing_program_in_the_chain_is_counted_as_a_chain_error(
    datapath: Datapath, veth: VethPair, tmp_path: Path
) -> None:
    allowed = quiet(veth)
    first = load_blocker(datapath, tmp_path, Hook.XDP, veth.b_ip, priority=10)
    second = load_blocker(datapath, tmp_path, Hook.XDP, "192.0.2.1", name="second", priority=20)
    datapath.set_chain(veth.a_if, Hook.XDP, [member(first), member(second)])
    table = datapath.table(Hook.XDP)
    base = table.head(datapath.ifindex(veth.a_if), Hook.XDP)
    assert base is not None
    table.chain.delete((base + 1).to_bytes(4, "little"))  # the second NF's slot empties

    assert ping_from(veth, allowed, 4) == 4
    c = counts(datapath, veth, "blocker", Hook.XDP)
    assert verdicts(c) == {"pass": 4} and c.errors == 4
    assert counts(datapath, veth, "second", Hook.XDP).packets == 0


# An NF that declares the counter map's pin as its own and zeroes its counters entries.
COUNTER_WRITE_ATTACK = r"""
struct ctr { u64 v[9]; };
NFCTL_TABLE_AT("maps/percpu_array:ROOT/xdp/counters", u32, struct ctr, ctr, 4096, 0);
int xdp_attack(struct xdp_md *ctx)
{
    u32 id = 1;
    struct ctr *c = ctr.lookup(&id);
    if (c)
        c->v[1] = 0;
    return XDP_PASS;
}
"""


def test_an_nf_cannot_write_the_counters(
    datapath: Datapath, veth: VethPair, tmp_path: Path
) -> None:
    quiet(veth)
    blocker = load_blocker(datapath, tmp_path, Hook.XDP, veth.b_ip)
    datapath.set_chain(veth.a_if, Hook.XDP, [member(blocker)])
    attack = COUNTER_WRITE_ATTACK.replace("ROOT", str(datapath.paths.root))
    write_nf(tmp_path, "attacker", attack, "xdp_attack", priority=10)
    with pytest.raises(DatapathError) as refused:
        Builder(datapath).build(prepare_nf(tmp_path, "attacker"))
    messages = [d.message for d in refused.value.diagnostics]
    assert any("chain's internal state" in m for m in messages), messages
    assert ping_from(veth, veth.b_ip, 3) == 0
    assert verdicts(counts(datapath, veth, "blocker", Hook.XDP)) == {"drop": 3}
