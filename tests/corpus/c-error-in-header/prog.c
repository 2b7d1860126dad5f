#include "lib/parse.h"

int xdp_prog(struct xdp_md *ctx)
{
    return header_len() ? XDP_PASS : XDP_DROP;
}
