"""A `struct in6_addr` field of a map key takes an IPv6 string from YAML, in the byte
order the program compares against packet headers (real kernel, real IPv6 packets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nfctl.builder.builder import Builder
from nfctl.datapath.datapath import ChainMember, Datapath
from nfctl.manifest.model import Hook
from nfctl.netns import VethPair
from tests.helpers import prepare_nf, write_nf

pytestmark = pytest.mark.kernel

V6_BLOCK_NF = """\
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ipv6.h>

struct v6_key {
    struct in6_addr addr;
    u16 port;
};
BPF_HASH(blocked, struct v6_key, u32, 16);

int xdp_v6(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IPV6))
        return XDP_PASS;
    struct ipv6hdr *ip6 = (void *)(eth + 1);
    if ((void *)(ip6 + 1) > end || ip6->nexthdr != 58)  /* ICMPv6 echo only below */
        return XDP_PASS;
    u8 *icmp_type = (void *)(ip6 + 1);
    if ((void *)(icmp_type + 1) > end || *icmp_type != 128)
        return XDP_PASS;
    struct v6_key key = {};
    __builtin_memcpy(&key.addr, &ip6->saddr, sizeof(key.addr));
    key.port = 443;
    return blocked.lookup(&key) ? XDP_DROP : XDP_PASS;
}
"""


def test_in6_addr_field_takes_an_ipv6_string(
    datapath: Datapath, veth: VethPair, tmp_path: Path
) -> None:
    write_nf(tmp_path, "v6block", V6_BLOCK_NF, "xdp_v6")
    loaded = Builder(datapath).build(prepare_nf(tmp_path, "v6block"))
    datapath.set_chain(
        veth.a_if, Hook.XDP, [ChainMember("v6block", loaded.build_hash, loaded.prog_pin)]
    )
    assert veth.ping(veth.ns_b, veth.a_ip6, 2) == 2

    result = datapath.sync_entries(loaded, "blocked", [({"addr": veth.b_ip6, "port": 443}, 1)])
    assert result.added == 1
    assert veth.ping(veth.ns_b, veth.a_ip6, 2, timeout_s=0.3) == 0  # the program matched it
    [(key, value)] = list(datapath.map_entries(loaded, "blocked"))
    assert (key["addr"], key["port"], value) == (veth.b_ip6, 443, 1)  # reads back as text

    # the long form still works, and a non-address string is a clear error
    long_form = {"in6_u": {"u6_addr8": veth.b_ip6}}
    datapath.sync_entries(loaded, "blocked", [({"addr": long_form, "port": 443}, 1)])
    assert veth.ping(veth.ns_b, veth.a_ip6, 2, timeout_s=0.3) == 0
    with pytest.raises(Exception, match="not an IP address"):
        datapath.sync_entries(loaded, "blocked", [({"addr": "example.org", "port": 443}, 1)])
    datapath.sync_entries(loaded, "blocked", [])
    assert veth.ping(veth.ns_b, veth.a_ip6, 2) == 2
