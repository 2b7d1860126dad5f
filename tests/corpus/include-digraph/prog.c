// the digraph spelling of #include
%:inc\
lude "/etc/shadow"
int xdp_prog(struct xdp_md *ctx)
{
    return XDP_PASS;
}
