"""An NF cannot switch off the NFs after it (issue #10, finding 4), with real packets.

Each case is an attacker NF at priority 10 in front of the library blocklist on the same
XDP hook, blocking veth b's address. Each attack, if loaded, lets the blocked source get
ping replies (the blocklist is skipped, or its entry deleted on every packet). The agent
must refuse the attacker with an error naming its file, keep the running chain attached
and the blocked source must get 0 replies.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from nfctl.builder.builder import Builder
from nfctl.datapath.datapath import ChainMember, Datapath, DatapathError, LoadedBuild
from nfctl.manifest.model import Hook
from nfctl.netns import VethPair
from tests.helpers import prepare_library_nf, prepare_nf, write_nf
from tests.nfsources import counting_nf

pytestmark = pytest.mark.kernel

PINGS = 5
REPLY_WAIT_S = 0.3

# Parses the IPv4 source into `src`; the delete-entry attacks use it.
_PARSE_SRC = r"""
#include <linux/if_ether.h>
#include <linux/ip.h>
static __always_inline int ipv4_src(struct xdp_md *ctx, __be32 *src)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end || eth->h_proto != htons(ETH_P_IP))
        return -1;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end)
        return -1;
    *src = ip->saddr;
    return 0;
}
"""

_DELETE_SRC_BODY = r"""
int xdp_attack(struct xdp_md *ctx)
{
    __be32 src;
    if (ipv4_src(ctx, &src) == 0)
        %(map)s.delete(&src);
    return XDP_PASS;
}
"""

# ROOT is replaced with the test's bpffs root (an attacker knows /sys/fs/bpf/nfctl).
ATTACKS: dict[str, str] = {
    # (a) write the chain cursor: the wrapper then jumps past the blocklist's slot
    "cursor-write": r"""
int xdp_attack(struct xdp_md *ctx)
{
    u32 zero = 0;
    u32 *pos = nfctl_cursor.lookup(&zero);
    if (pos)
        *pos = *pos + 1;
    return XDP_PASS;
}
""",
    # (a) the same through the cursor's pin: BCC's table macro restored, pasted past the
    # source guard's word list
    "cursor-by-pin": r"""
#undef BPF_F_TABLE
#define BPF_F_TABLE(_type, _key, _leaf, _name, _max, _flags) \
    NFCTL_TABLE_AT("maps/" _type, _key, _leaf, _name, _max, _flags)
#define PIN(x) BPF_TABLE_##x
PIN(PINNED)("percpu_array", u32, u32, cur, 1, "ROOT/xdp/cursor");
int xdp_attack(struct xdp_md *ctx)
{
    u32 zero = 0;
    u32 *pos = cur.lookup(&zero);
    if (pos)
        *pos = *pos + 1;
    return XDP_PASS;
}
""",
    # (b) tail-call its own slot until the tail-call limit ends the chain with a pass
    "tail-call-chain": r"""
int xdp_attack(struct xdp_md *ctx)
{
    u32 zero = 0;
    u32 *pos = nfctl_cursor.lookup(&zero);
    if (pos)
        nfctl_chain.call(ctx, *pos);
    return XDP_PASS;
}
""",
    # (b) the same through the pins and the raw helper
    "tail-call-by-pin": r"""
NFCTL_TABLE_AT("maps/prog:ROOT/xdp/chain", u32, u32, ch, 65536, 0);
NFCTL_TABLE_AT("maps/percpu_array:ROOT/xdp/cursor", u32, u32, cur, 1, 0);
int xdp_attack(struct xdp_md *ctx)
{
    u32 zero = 0;
    u32 *pos = cur.lookup(&zero);
    if (pos)
        ch.call(ctx, *pos);
    return XDP_PASS;
}
""",
    # (c) redefine the maps directory: its blocked_v4 is the blocklist's
    "maps-dir-macro": r"""
#undef NFCTL_MAPS_DIR
#define NFCTL_MAPS_DIR "ROOT/nfs/blocklist/maps"
BPF_HASH(blocked_v4, __be32, u8, 65536);
"""
    + _PARSE_SRC
    + _DELETE_SRC_BODY % {"map": "blocked_v4"},
    # (c) redefine the section macro
    "map-section-macro": r"""
#undef NFCTL_MAP_SECTION
#define NFCTL_MAP_SECTION(_t, _name) "maps/" _t ":ROOT/nfs/blocklist/maps/" #_name
BPF_HASH(blocked_v4, __be32, u8, 65536);
"""
    + _PARSE_SRC
    + _DELETE_SRC_BODY % {"map": "blocked_v4"},
    # (d) open the later blocklist's pinned map by path and delete the entry per packet
    "pinned-path": r"""
#undef BPF_F_TABLE
#define BPF_F_TABLE(_type, _key, _leaf, _name, _max, _flags) \
    NFCTL_TABLE_AT("maps/" _type, _key, _leaf, _name, _max, _flags)
#define PIN(x) BPF_TABLE_##x
PIN(PINNED)("hash", __be32, u8, bl, 65536, "ROOT/nfs/blocklist/maps/blocked_v4");
"""
    + _PARSE_SRC
    + _DELETE_SRC_BODY % {"map": "bl"},
    # (d) the same with the generated table macro and an explicit section
    "pinned-section": r"""
NFCTL_TABLE_AT("maps/hash:ROOT/nfs/blocklist/maps/blocked_v4", __be32, u8, bl, 65536, 0);
"""
    + _PARSE_SRC
    + _DELETE_SRC_BODY % {"map": "bl"},
    # (d) plant a new map in the blocklist's folder, under a name it may declare later
    "plant-pin": r"""
NFCTL_TABLE_AT("maps/hash:ROOT/nfs/blocklist/maps/allowed", __be32, u8, planted, 16, 0);
int xdp_attack(struct xdp_md *ctx)
{
    u32 zero = 0;
    planted.lookup(&zero);
    return XDP_PASS;
}
""",
    # (e) token pasting to reach the cursor
    "token-pasting": r"""
#define CAT(a, b) a##b
int xdp_attack(struct xdp_md *ctx)
{
    u32 zero = 0;
    u32 *pos = CAT(nfctl_, cursor).lookup(&zero);
    if (pos)
        *pos = *pos + 1;
    return XDP_PASS;
}
""",
    # (e) an attribute pragma left open, which would apply to the generated tables
    "pragma-attribute": r"""
int xdp_attack(struct xdp_md *ctx)
{
    return XDP_PASS;
}
#pragma clang attribute push (__attribute__((section("maps/percpu_array:ROOT/evil"))), \
    apply_to = variable)
""",
}


# Macros defined at the end of the author's file would reshape the generated code that
# follows it; nfctl #undefs every identifier it uses, so these load and change nothing.
NEUTRALISED: dict[str, str] = {
    "wrapper-if-macro": r"""
int xdp_attack(struct xdp_md *ctx)
{
    return XDP_PASS;
}
#define if(c) if (0)
""",
    "wrapper-call-macro": r"""
int xdp_attack(struct xdp_md *ctx)
{
    return XDP_PASS;
}
#define call(c, n) lookup(&n)
#define XDP_PASS 1
#define unsigned
""",
    # a map named like the old generated cursor is just the NF's own map now
    "same-named-map": r"""
BPF_PERCPU_ARRAY(nfctl_cursor, u32, 1);
int xdp_attack(struct xdp_md *ctx)
{
    u32 zero = 0;
    u32 *pos = nfctl_cursor.lookup(&zero);
    if (pos)
        *pos = *pos + 1;
    return XDP_PASS;
}
""",
}

PASS_ALL = r"""
int xdp_attack(struct xdp_md *ctx)
{
    return XDP_PASS;
}
"""


def member(loaded: LoadedBuild) -> ChainMember:
    return ChainMember(loaded.nf, loaded.build_hash, loaded.prog_pin)


def blocked_replies(veth: VethPair) -> int:
    return veth.ping(veth.ns_b, veth.a_ip, PINGS, source=veth.b_ip, timeout_s=REPLY_WAIT_S)


def other_replies(veth: VethPair, other: str) -> int:
    return veth.ping(veth.ns_b, veth.a_ip, 3, source=other, timeout_s=REPLY_WAIT_S)


def load_attacker(datapath: Datapath, repo: Path, source: str, version: str) -> LoadedBuild:
    source = source.replace("ROOT", str(datapath.paths.root))
    write_nf(repo, "attacker", source, "xdp_attack", priority=10, version=version)
    return Builder(datapath).build(prepare_nf(repo, "attacker"))


def chain_of_pass_all_and_blocklist(
    datapath: Datapath, veth: VethPair, repo: Path
) -> tuple[LoadedBuild, LoadedBuild, str]:
    """A running chain: a harmless first version of the attacker at priority 10, then the
    blocklist blocking b's address. Returns both and another source address on b."""
    first = load_attacker(datapath, repo, PASS_ALL, "1.0.0")
    blocklist = Builder(datapath).build(prepare_library_nf("blocklist"))
    datapath.sync_entries(blocklist, "blocked_v4", [(veth.b_ip, 1)])
    datapath.set_chain(veth.a_if, Hook.XDP, [member(first), member(blocklist)])
    other = str(ipaddress.ip_interface(f"{veth.b_ip}/24").network[3])
    veth.add_b_address(other)
    assert blocked_replies(veth) == 0
    assert other_replies(veth, other) == 3
    return first, blocklist, other


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attacker_nf_is_refused_and_blocklist_keeps_blocking(
    datapath: Datapath, veth: VethPair, tmp_path: Path, attack: str
) -> None:
    first, blocklist, other = chain_of_pass_all_and_blocklist(datapath, veth, tmp_path)
    blocklist_pins = datapath.paths.pinned_maps("blocklist")
    try:
        attacker = load_attacker(datapath, tmp_path, ATTACKS[attack], "2.0.0")
    except DatapathError as exc:
        refused = exc
    else:
        # Not refused: show what the attack does to traffic, then fail.
        datapath.set_chain(veth.a_if, Hook.XDP, [member(attacker), member(blocklist)])
        got = blocked_replies(veth)
        pytest.fail(f"attacker NF loaded; the blocked source got {got}/{PINGS} replies")

    files = {d.file for d in refused.diagnostics}
    assert files == {"attacker/attacker.c"}, refused.diagnostics
    # the running chain stays attached and keeps blocking; other sources still pass
    assert datapath.chain_prog_ids(veth.a_if, Hook.XDP) == [first.prog_id, blocklist.prog_id]
    assert blocked_replies(veth) == 0
    assert other_replies(veth, other) == 3
    assert dict(datapath.map_entries(blocklist, "blocked_v4")) == {veth.b_ip: 1}
    # a refused build leaves no program pinned beside the running one, nothing planted
    assert datapath.paths.pinned_maps("blocklist") == blocklist_pins
    assert [p.name for p in datapath.paths.pinned_progs("attacker")] == [first.prog_pin.name]


@pytest.mark.parametrize("attack", sorted(NEUTRALISED))
def test_macros_after_the_nf_do_not_reshape_the_chaining_code(
    datapath: Datapath, veth: VethPair, tmp_path: Path, attack: str
) -> None:
    _, blocklist, other = chain_of_pass_all_and_blocklist(datapath, veth, tmp_path)
    attacker = load_attacker(datapath, tmp_path, NEUTRALISED[attack], "2.0.0")
    datapath.set_chain(veth.a_if, Hook.XDP, [member(attacker), member(blocklist)])
    assert blocked_replies(veth) == 0
    assert other_replies(veth, other) == 3


TC_CURSOR_ATTACK = r"""
NFCTL_TABLE_AT("maps/percpu_array:ROOT/tc/cursor", u32, u32, cur, 1, 0);
int tc_attack(struct __sk_buff *ctx)
{
    u32 zero = 0;
    u32 *pos = cur.lookup(&zero);
    if (pos)
        *pos = *pos + 1;
    return TC_ACT_OK;
}
"""


def test_tc_attacker_cannot_skip_a_later_tc_firewall(
    datapath: Datapath, veth: VethPair, tmp_path: Path
) -> None:
    """The same check on tc-ingress: a later NF drops b's pings; the attacker is refused."""
    source, function, cflags = counting_nf("tc-ingress")
    write_nf(tmp_path, "fw", source, function, hook="tc-ingress", priority=20, cflags=cflags)
    firewall = Builder(datapath).build(prepare_nf(tmp_path, "fw"))
    datapath.sync_entries(firewall, "drop_flag", [(0, 1)])
    datapath.set_chain(veth.a_if, Hook.TC_INGRESS, [member(firewall)])
    assert veth.ping_a_from_b(PINGS, timeout_s=REPLY_WAIT_S) == 0

    attack = TC_CURSOR_ATTACK.replace("ROOT", str(datapath.paths.root))
    write_nf(tmp_path, "attacker", attack, "tc_attack", hook="tc-ingress", priority=10)
    with pytest.raises(DatapathError) as refused:
        Builder(datapath).build(prepare_nf(tmp_path, "attacker"))
    messages = [d.message for d in refused.value.diagnostics]
    assert any("chain's internal state" in m for m in messages), messages
    assert datapath.chain_prog_ids(veth.a_if, Hook.TC_INGRESS) == [firewall.prog_id]
    assert veth.ping_a_from_b(PINGS, timeout_s=REPLY_WAIT_S) == 0
