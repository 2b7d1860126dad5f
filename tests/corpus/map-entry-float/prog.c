int xdp_prog(struct xdp_md *ctx)
{
    return XDP_PASS;
}
