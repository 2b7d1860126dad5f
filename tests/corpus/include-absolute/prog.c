/* reads a secret */
#include "/etc/shadow"
int xdp_prog(struct xdp_md *ctx)
{
    return XDP_PASS;
}
