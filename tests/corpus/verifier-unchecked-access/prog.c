/* counts packets per first byte, but forgets the bounds check */
BPF_ARRAY(first_byte, u64, 256);
BPF_ARRAY(total, u64, 1);

int xdp_prog(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    u32 zero = 0;
    u64 *all = total.lookup(&zero);

    if (all)
        *all += 1;
    if (data + 1 > data_end)
        return XDP_PASS;
    /* checked one byte, reads the 15th */
    u32 slot = *(u8 *)(data + 14);
    u64 *count = first_byte.lookup(&slot);
    if (count)
        *count += 1;
    return XDP_PASS;
}
