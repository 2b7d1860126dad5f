/* XDP per-source rate limiter: a token bucket per IPv4/IPv6 source address.
 *
 * Maps
 *   config   [0] = {rate_pps, burst}: tokens added per second and bucket size
 *   exempt   sources never limited (key: IPv4 address, network order)
 *   buckets  LRU: per-source bucket state (runtime state, kept across versions)
 *   stats    per-CPU: [0] passed, [1] dropped
 */
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>

#define NSEC_PER_SEC 1000000000ULL
#define MAX_IDLE_NS (60 * NSEC_PER_SEC)

struct limit {
    u32 rate_pps;
    u32 burst;
};

struct source {
    u8 addr[16];  /* IPv4 sources use the IPv4-mapped form ::ffff:a.b.c.d */
};

struct bucket {
    u64 tokens_ns;   /* tokens, scaled: one token = NSEC_PER_SEC */
    u64 last_ns;
};

BPF_ARRAY(config, struct limit, 1);
BPF_HASH(exempt, __be32, u8, 1024);
BPF_TABLE("lru_hash", struct source, struct bucket, buckets, 65536);
BPF_PERCPU_ARRAY(stats, u64, 2);

static __always_inline int verdict(u32 slot, int action)
{
    u64 *counter = stats.lookup(&slot);
    if (counter)
        *counter += 1;
    return action;
}

int xdp_ratelimit(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct source src = {};

    if ((void *)(eth + 1) > data_end)
        return XDP_PASS;
    if (eth->h_proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = (void *)(eth + 1);
        if ((void *)(ip + 1) > data_end)
            return XDP_PASS;
        __be32 saddr = ip->saddr;
        if (exempt.lookup(&saddr))
            return verdict(0, XDP_PASS);
        src.addr[10] = 0xff;
        src.addr[11] = 0xff;
        __builtin_memcpy(&src.addr[12], &saddr, 4);
    } else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        if ((void *)(ip6 + 1) > data_end)
            return XDP_PASS;
        __builtin_memcpy(src.addr, &ip6->saddr, 16);
    } else {
        return XDP_PASS;
    }

    u32 zero = 0;
    struct limit *limit = config.lookup(&zero);
    if (!limit || limit->rate_pps == 0)
        return verdict(0, XDP_PASS);  /* not configured: never drop */

    u64 now = bpf_ktime_get_ns();
    u32 burst = limit->burst ? limit->burst : 1;
    u64 cap = (u64)burst * NSEC_PER_SEC;
    struct bucket *b = buckets.lookup(&src);
    if (!b) {
        struct bucket fresh = { .tokens_ns = cap - NSEC_PER_SEC, .last_ns = now };
        buckets.update(&src, &fresh);
        return verdict(0, XDP_PASS);
    }
    u64 elapsed = now - b->last_ns;
    if (elapsed > MAX_IDLE_NS)
        elapsed = MAX_IDLE_NS;  /* a full bucket anyway; keeps the product below 2^64 */
    u64 tokens = b->tokens_ns + elapsed * limit->rate_pps;
    if (tokens > cap)
        tokens = cap;
    b->last_ns = now;
    if (tokens < NSEC_PER_SEC) {
        b->tokens_ns = tokens;
        return verdict(1, XDP_DROP);
    }
    b->tokens_ns = tokens - NSEC_PER_SEC;
    return verdict(0, XDP_PASS);
}
