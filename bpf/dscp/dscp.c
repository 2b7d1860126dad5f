/* TC egress DSCP marker: set the DSCP of IPv4/IPv6 packets by protocol and destination
 * port, with a default for everything else.
 *
 * Maps
 *   rules     {proto, dport} -> dscp (0..63); dport 0 matches any port of that protocol
 *   defaults  [0] = dscp for unmatched packets, or 255 to leave them unchanged
 *   marked    per-CPU: packets re-marked
 */
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/tcp.h>

struct rule_key {
    u8 proto;
    u8 pad;
    __be16 dport;
};

BPF_HASH(rules, struct rule_key, u8, 1024);
BPF_ARRAY(defaults, u8, 1);
BPF_PERCPU_ARRAY(marked, u64, 1);

static __always_inline int lookup_dscp(u8 proto, __be16 dport)
{
    struct rule_key key = { .proto = proto, .dport = dport };
    u8 *dscp = rules.lookup(&key);
    if (dscp)
        return *dscp;
    key.dport = 0;
    dscp = rules.lookup(&key);
    if (dscp)
        return *dscp;
    u32 zero = 0;
    u8 *fallback = defaults.lookup(&zero);
    if (fallback && *fallback <= 63)
        return *fallback;
    return -1;
}

static __always_inline void count_mark(void)
{
    u32 zero = 0;
    u64 *counter = marked.lookup(&zero);
    if (counter)
        *counter += 1;
}

int tc_dscp(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;

    if ((void *)(eth + 1) > data_end)
        return TC_ACT_OK;

    if (eth->h_proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = (void *)(eth + 1);
        if ((void *)(ip + 1) > data_end)
            return TC_ACT_OK;
        __be16 dport = 0;
        if (ip->protocol == IPPROTO_UDP || ip->protocol == IPPROTO_TCP) {
            struct udphdr *l4 = (void *)ip + ip->ihl * 4;
            if ((void *)(l4 + 1) > data_end)
                return TC_ACT_OK;
            dport = l4->dest;
        }
        int dscp = lookup_dscp(ip->protocol, dport);
        if (dscp < 0)
            return TC_ACT_OK;
        u8 old_tos = ip->tos;
        u8 new_tos = (dscp << 2) | (old_tos & 0x3);
        if (new_tos == old_tos)
            return TC_ACT_OK;
        u32 off = ETH_HLEN + offsetof(struct iphdr, tos);
        bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check),
                            bpf_htons(old_tos), bpf_htons(new_tos), 2);
        bpf_skb_store_bytes(skb, off, &new_tos, 1, 0);
        count_mark();
    } else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        if ((void *)(ip6 + 1) > data_end)
            return TC_ACT_OK;
        __be16 dport = 0;
        if (ip6->nexthdr == IPPROTO_UDP || ip6->nexthdr == IPPROTO_TCP) {
            struct udphdr *l4 = (void *)(ip6 + 1);
            if ((void *)(l4 + 1) > data_end)
                return TC_ACT_OK;
            dport = l4->dest;
        }
        int dscp = lookup_dscp(ip6->nexthdr, dport);
        if (dscp < 0)
            return TC_ACT_OK;
        /* traffic class spans the low nibble of byte 0 and the high nibble of byte 1 */
        u8 *bytes = (u8 *)ip6;
        u8 b0 = (bytes[0] & 0xf0) | ((dscp >> 2) & 0x0f);
        u8 b1 = (bytes[1] & 0x3f) | ((dscp & 0x3) << 6);
        if (b0 == bytes[0] && b1 == bytes[1])
            return TC_ACT_OK;
        bpf_skb_store_bytes(skb, ETH_HLEN, &b0, 1, 0);
        bpf_skb_store_bytes(skb, ETH_HLEN + 1, &b1, 1, 0);
        count_mark();
    }
    return TC_ACT_OK;
}
