BPF_HASH(blocked, __be32, u8, 1024);

int xdp_prog(struct xdp_md *ctx)
{
    return XDP_PASS;
}
