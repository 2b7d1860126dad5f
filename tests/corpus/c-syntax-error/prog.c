/* counts nothing, fails to compile */
BPF_ARRAY(hits, u64, 1);

int xdp_prog(struct xdp_md *ctx)
{
    int verdict = XDP_PASS
    return verdict;
}
