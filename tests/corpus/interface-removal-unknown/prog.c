int tc_prog(struct __sk_buff *skb)
{
    return TC_ACT_OK;
}
