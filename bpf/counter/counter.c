/* TC packet/byte counter per protocol (IPv4 protocol or IPv6 next header).
 *
 * Maps
 *   proto_stats  per-CPU hash {ethertype, proto} -> {packets, bytes}
 */
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>

struct proto_key {
    __be16 ethertype;
    u8 proto;
    u8 pad;
};

struct counters {
    u64 packets;
    u64 bytes;
};

BPF_PERCPU_HASH(proto_stats, struct proto_key, struct counters, 1024);

int tc_count(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    struct proto_key key = {};

    if ((void *)(eth + 1) > data_end)
        return TC_ACT_OK;
    key.ethertype = eth->h_proto;
    if (eth->h_proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = (void *)(eth + 1);
        if ((void *)(ip + 1) > data_end)
            return TC_ACT_OK;
        key.proto = ip->protocol;
    } else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        if ((void *)(ip6 + 1) > data_end)
            return TC_ACT_OK;
        key.proto = ip6->nexthdr;
    }
    struct counters *c = proto_stats.lookup(&key);
    if (c) {
        c->packets += 1;
        c->bytes += skb->len;
    } else {
        struct counters fresh = { .packets = 1, .bytes = skb->len };
        proto_stats.update(&key, &fresh);
    }
    return TC_ACT_OK;
}
