"""C sources of small test NFs (not part of the library): they count ICMP echo packets
into pinned maps so tests can prove which NF saw which packet."""

from __future__ import annotations

# Counts ICMP echo requests (type 8) and replies (type 0) seen by this NF into `seen`
# ([0] requests, [1] replies) and, when drop_flag[0] != 0, drops ICMP echo packets.
# VERSION lets two builds differ (hitless replace tests); both share the pinned maps.
COUNTING_NF = r"""
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/icmp.h>
#include <linux/in.h>

#ifndef VERSION
#define VERSION 1
#endif

BPF_ARRAY(seen, u64, 2);
BPF_ARRAY(drop_flag, u32, 1);
BPF_ARRAY(last_version, u32, 1);

static __always_inline int classify(void *data, void *data_end)
{
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end || eth->h_proto != htons(ETH_P_IP))
        return -1;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end || ip->protocol != IPPROTO_ICMP)
        return -1;
    struct icmphdr *icmp = (void *)ip + ip->ihl * 4;
    if ((void *)(icmp + 1) > data_end)
        return -1;
    if (icmp->type == ICMP_ECHO)
        return 0;
    if (icmp->type == ICMP_ECHOREPLY)
        return 1;
    return -1;
}

int HOOK_FN(CTX_TYPE *ctx)
{
    int kind = classify((void *)(long)ctx->data, (void *)(long)ctx->data_end);
    if (kind < 0)
        return PASS;
    u32 slot = kind;
    u64 *counter = seen.lookup(&slot);
    if (counter)
        __sync_fetch_and_add(counter, 1);
    u32 zero = 0;
    u32 version = VERSION;
    last_version.update(&zero, &version);
    u32 *flag = drop_flag.lookup(&zero);
    if (flag && *flag)
        return DROP;
    return PASS;
}
"""


def counting_nf(hook: str, version: int = 1) -> tuple[str, str, list[str]]:
    """(source, function, cflags) of the counting NF for a hook."""
    if hook == "xdp":
        names = {"HOOK_FN": "xdp_main", "CTX_TYPE": "struct xdp_md", "PASS": "XDP_PASS"}
        names["DROP"] = "XDP_DROP"
    else:
        names = {"HOOK_FN": "tc_main", "CTX_TYPE": "struct __sk_buff", "PASS": "TC_ACT_OK"}
        names["DROP"] = "TC_ACT_SHOT"
    source = COUNTING_NF
    for placeholder, value in names.items():
        source = source.replace(placeholder, value)
    return source, names["HOOK_FN"], [f"-DVERSION={version}"]


SYNTAX_ERROR_NF = r"""
BPF_ARRAY(seen, u64, 2);
int xdp_main(struct xdp_md *ctx)
{
    u32 slot = 0
    return XDP_PASS;
}
"""

VERIFIER_REJECT_NF = r"""
#include <linux/if_ether.h>
BPF_ARRAY(seen, u64, 2);
int xdp_main(struct xdp_md *ctx)
{
    struct ethhdr *eth = (void *)(long)ctx->data;
    if (eth->h_proto == 0)
        return XDP_DROP;
    return XDP_PASS;
}
"""
