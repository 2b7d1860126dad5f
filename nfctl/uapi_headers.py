"""Spot NF sources that include a kernel header where its UAPI twin would do.

`#include <linux/ip.h>` makes BCC parse the kernel's internal headers (~1 s of clang per
NF, measured 6-8x the whole compile in BENCHMARKS.md §7); `<uapi/linux/ip.h>` declares the
same packet structures and constants. Only headers whose UAPI version declares what NFs
use from them are listed; `htons` is the one thing the internal headers add (BCC's
`bpf_htons` replaces it).
"""

from __future__ import annotations

import re

from nfctl.diagnostics import Diagnostic

UAPI_TWINS = frozenset(
    {
        "bpf",
        "icmp",
        "icmpv6",
        "if_ether",
        "if_packet",
        "in",
        "in6",
        "ip",
        "ipv6",
        "pkt_cls",
        "tcp",
        "udp",
    }
)

_INCLUDE_RE = re.compile(r"^[ \t]*#[ \t]*include[ \t]*<linux/([A-Za-z0-9_]+)\.h>", re.MULTILINE)


def internal_header_warnings(rel_path: str, text: str) -> list[Diagnostic]:
    """One warning per `#include <linux/X.h>` that `<uapi/linux/X.h>` would replace."""
    out = []
    for match in _INCLUDE_RE.finditer(text):
        name = match.group(1)
        if name in UAPI_TWINS:
            out.append(
                Diagnostic(
                    file=rel_path,
                    line=text.count("\n", 0, match.start()) + 1,
                    severity="warning",
                    message=(
                        f"<linux/{name}.h> pulls in the kernel's internal headers (slow to "
                        f"compile); <uapi/linux/{name}.h> declares the same (use bpf_htons "
                        "for htons)"
                    ),
                )
            )
    return out
