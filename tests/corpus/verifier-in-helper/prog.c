/* a prototype, a multi-line signature and a string with braces: the verifier's line
 * numbers must still point at the author's line (BCC's rewriter shifts them) */
#define CHECK(p, end) \
    do { if ((void *)(p) > (end)) return XDP_PASS; } while (0)

struct pair {
    u32 a;
    u32 b;
};

BPF_ARRAY(counts, struct pair, 4);

static __always_inline int parse(void *data, void *data_end);

static __always_inline
int first_check(void *data,
                void *data_end)
{
    const char *s = "{ not a brace }";
    (void)s;
    return XDP_PASS;
}

static __always_inline int parse(void *data, void *data_end)
{
    CHECK(data + 1, data_end);
    return *(u8 *)(data + 20) ? XDP_PASS : XDP_DROP; /* checked 1 byte, reads the 21st */
}

int xdp_prog(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct pair init = { .a = 1, .b = 2 };
    u32 k = 0;
    counts.update(&k, &init);
    if (first_check(data, data_end) != XDP_PASS)
        return XDP_DROP;
    return parse(data, data_end);
}
