#include <linux/if_ether.h>

#include "../../../../../../../../../../../../../../../../etc/passwd"
int xdp_prog(struct xdp_md *ctx)
{
    return XDP_PASS;
}
