struct counters {
    u64 packets;
    u64 bytes;
};

BPF_PERCPU_ARRAY(stats, struct counters, 1);

int xdp_prog(struct xdp_md *ctx)
{
    return XDP_PASS;
}
