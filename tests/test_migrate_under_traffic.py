"""Map migration under traffic: what the old program counts between the migration copy and
the switch to the new version is merged into the new map, so the counter total after a
layout change equals the packets sent (real XDP programs, real pings through a veth)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from nfctl.builder.builder import Builder
from nfctl.datapath.datapath import ChainMember, Datapath, LoadedBuild
from nfctl.manifest.model import Hook
from nfctl.netns import VethPair
from tests.helpers import prepare_nf, write_nf
from tests.test_datapath import PingFlood

pytestmark = pytest.mark.kernel

# Counts ICMP echo requests into per_proto[0]; V2 adds a byte counter (incompatible layout).
COUNTER_NF = r"""
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/icmp.h>
#include <linux/in.h>

#if V2
struct stats { u64 packets; u64 bytes; };
#else
struct stats { u64 packets; };
#endif
MAP_DECL;

int xdp_main(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end || eth->h_proto != htons(ETH_P_IP))
        return XDP_PASS;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_ICMP)
        return XDP_PASS;
    struct icmphdr *icmp = (void *)ip + ip->ihl * 4;
    if ((void *)(icmp + 1) > end || icmp->type != ICMP_ECHO)
        return XDP_PASS;
    u32 key = 0;
    struct stats *s = per_proto.lookup(&key);
    if (s) {
        __sync_fetch_and_add(&s->packets, 1);
#if V2
        __sync_fetch_and_add(&s->bytes, end - data);
#endif
    } else {
        struct stats fresh = { .packets = 1 };
        per_proto.update(&key, &fresh);
    }
    return XDP_PASS;
}
"""

MAP_DECLS = {
    "hash": "BPF_HASH(per_proto, u32, struct stats, 64)",
    "percpu_array": "BPF_PERCPU_ARRAY(per_proto, struct stats, 4)",
}


def load_counter(dp: Datapath, folder: Path, map_type: str, v2: bool) -> LoadedBuild:
    source = COUNTER_NF.replace("MAP_DECL", MAP_DECLS[map_type])
    version = "2.0.0" if v2 else "1.0.0"
    write_nf(folder, "counter", source, "xdp_main", version=version, cflags=[f"-DV2={int(v2)}"])
    return Builder(dp).build(prepare_nf(folder, "counter"))


def packets(dp: Datapath, loaded: LoadedBuild) -> int:
    value: Any = dict(dp.map_entries(loaded, "per_proto"))[0]
    slots = value if isinstance(value, list) else [value]
    return sum(int(s["packets"]) for s in slots)


@pytest.mark.parametrize("map_type", list(MAP_DECLS))
def test_migration_keeps_counts_written_until_the_switch(
    datapath: Datapath, veth: VethPair, tmp_path: Path, map_type: str
) -> None:
    v1 = load_counter(datapath, tmp_path, map_type, v2=False)
    datapath.set_chain(veth.a_if, Hook.XDP, [ChainMember(v1.nf, v1.build_hash, v1.prog_pin)])
    assert veth.ping_a_from_b(2) == 2
    assert packets(datapath, v1) == 2

    with PingFlood(veth, count=4000, interval=0.002) as flood:
        time.sleep(0.5)
        v2 = load_counter(datapath, tmp_path, map_type, v2=True)  # copies the map here
        swaps = list(v2.swaps)  # commit empties v2.swaps
        assert [s.name for s in swaps] == ["per_proto"]
        # the reconciler loads every changed NF before it switches: the old program keeps
        # counting into the old map meanwhile
        time.sleep(0.5)
        datapath.set_chain(veth.a_if, Hook.XDP, [ChainMember(v2.nf, v2.build_hash, v2.prog_pin)])
        time.sleep(0.3)
        Builder(datapath).commit(v2)
        switched_mid_flood = flood.thread.is_alive()
    sent, received = flood.result()

    assert switched_mid_flood, "the flood ended before the switch; raise its count"
    assert received == sent
    assert swaps[0].migrated_entries == (1 if map_type == "hash" else 4)  # arrays: every slot
    assert swaps[0].merged_entries == 1  # the old program wrote after the copy
    assert packets(datapath, v2) == 2 + sent, "counts lost or doubled across the migration"
    with_bytes: Any = dict(datapath.map_entries(v2, "per_proto"))[0]
    slots = with_bytes if isinstance(with_bytes, list) else [with_bytes]
    assert sum(int(s["bytes"]) for s in slots) > 0  # the new layout is the one in place
