int xdp_prog(void)
{
    return XDP_PASS;
}
