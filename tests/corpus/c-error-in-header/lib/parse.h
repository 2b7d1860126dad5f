#pragma once
static __always_inline int header_len(void)
{
    return ETH_HLEN_TYPO;
}
