/* XDP blocklist firewall: drop packets whose IPv4 or IPv6 source address is listed.
 *
 * Maps
 *   blocked_v4  key: IPv4 source address (network order), value: 1
 *   blocked_v6  key: IPv6 source address, value: 1
 *   drops       per-CPU counters: [0] IPv4 drops, [1] IPv6 drops
 */
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>

#ifndef MAX_RULES
#define MAX_RULES 4096
#endif

struct v6_addr {
    u8 addr[16];
};

BPF_HASH(blocked_v4, __be32, u8, MAX_RULES);
BPF_HASH(blocked_v6, struct v6_addr, u8, MAX_RULES);
BPF_PERCPU_ARRAY(drops, u64, 2);

static __always_inline int count_drop(u32 slot)
{
    u64 *counter = drops.lookup(&slot);
    if (counter)
        *counter += 1;
    return XDP_DROP;
}

int xdp_blocklist(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;

    if ((void *)(eth + 1) > data_end)
        return XDP_PASS;

    if (eth->h_proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = (void *)(eth + 1);
        if ((void *)(ip + 1) > data_end)
            return XDP_PASS;
        __be32 saddr = ip->saddr;
        if (blocked_v4.lookup(&saddr))
            return count_drop(0);
    } else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        if ((void *)(ip6 + 1) > data_end)
            return XDP_PASS;
        struct v6_addr saddr = {};
        __builtin_memcpy(saddr.addr, &ip6->saddr, sizeof(saddr.addr));
        if (blocked_v6.lookup(&saddr))
            return count_drop(1);
    }
    return XDP_PASS;
}
