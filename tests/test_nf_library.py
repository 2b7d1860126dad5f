"""Real datapath tests for the NF library in bpf/: each NF is compiled and loaded with BCC,
attached through the dispatcher on a veth in a throwaway namespace, fed managed map entries
and checked with real packets, the way a user would check it (ping, UDP sockets, counters).

Topology (see nfctl.netns.VethPair): the NF sits on a_if in namespace a; b is the
peer. XDP and tc-ingress see what b sends to a; tc-egress sees what a sends to b.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest

from nfctl.builder.builder import Builder
from nfctl.datapath.datapath import ChainMember, Datapath, LoadedBuild
from nfctl.manifest.model import Hook
from nfctl.netns import VethPair, run
from tests.helpers import prepare_library_nf

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
IPPROTO_ICMP = 1
IPPROTO_UDP = 17

ETH_HLEN = 14
IPV4_HLEN = 20
IPV6_HLEN = 40
UDP_HLEN = 8
PING_FRAME = ETH_HLEN + IPV4_HLEN + 8 + 56  # ICMP header + ping's default 56-byte payload

# Replies on a veth come back in microseconds: a short wait keeps lossy pings fast.
REPLY_WAIT_S = 0.3


# -- setup helpers ------------------------------------------------------------------------


def attach_library_nf(datapath: Datapath, veth: VethPair, name: str, hook: Hook) -> LoadedBuild:
    """Compile, load and attach the library NF `name` alone on (a_if, hook)."""
    prepared = prepare_library_nf(name)
    assert prepared.nf.spec.attach.hook is hook, f"{name} is declared for another hook"
    loaded = Builder(datapath).build(prepared)
    assert loaded.compiled
    datapath.set_chain(
        veth.a_if, hook, [ChainMember(loaded.nf, loaded.build_hash, loaded.prog_pin)]
    )
    assert datapath.chain_prog_ids(veth.a_if, hook) == [loaded.prog_id]
    return loaded


def b_host(veth: VethPair, host: int, v6: bool = False) -> str:
    """Another address in b's subnet: a reaches it on-link, no extra route needed."""
    prefix = f"{veth.b_ip6}/64" if v6 else f"{veth.b_ip}/24"
    return str(ipaddress.ip_interface(prefix).network[host])


def add_b_ip6(veth: VethPair, ip: str) -> None:
    """An extra IPv6 source on b, usable at once (no duplicate address detection)."""
    run("ip", "-6", "addr", "add", f"{ip}/128", "dev", veth.b_if, "nodad", netns=veth.ns_b)


def mac_of(netns: str, ifname: str) -> str:
    info = json.loads(run("ip", "-j", "link", "show", "dev", ifname, netns=netns))
    return str(info[0]["address"])


def static_neighbours(veth: VethPair, b_extra: tuple[str, ...] = (), ipv6: bool = True) -> None:
    """Permanent ARP/NDP entries both ways, so no neighbour discovery runs during a test:
    a blocked IPv6 source cannot resolve its peer otherwise, and counters stay exact."""
    a_mac, b_mac = mac_of(veth.ns_a, veth.a_if), mac_of(veth.ns_b, veth.b_if)
    for ip in (veth.a_ip, veth.a_ip6) if ipv6 else (veth.a_ip,):
        neigh = ("ip", "neigh", "replace", ip, "lladdr", a_mac, "nud", "permanent")
        run(*neigh, "dev", veth.b_if, netns=veth.ns_b)
    for ip in (veth.b_ip, *((veth.b_ip6,) if ipv6 else ()), *b_extra):
        neigh = ("ip", "neigh", "replace", ip, "lladdr", b_mac, "nud", "permanent")
        run(*neigh, "dev", veth.a_if, netns=veth.ns_a)


def disable_ipv6(netns: str, ifname: str) -> None:
    """Silence IPv6 housekeeping (router solicitations, MLD) so packet counters are exact."""
    run("sysctl", "-qw", f"net.ipv6.conf.{ifname}.disable_ipv6=1", netns=netns)


def counters(datapath: Datapath, loaded: LoadedBuild, map_name: str) -> dict[int, int]:
    """An array of integer counters (per-CPU values are summed by map_entries)."""
    return {int(k): int(v) for k, v in datapath.map_entries(loaded, map_name)}


def timed_ping(veth: VethPair, count: int, interval: float, source: str) -> tuple[int, float]:
    start = time.monotonic()
    replies = veth.ping(
        veth.ns_b, veth.a_ip, count, interval=interval, source=source, timeout_s=REPLY_WAIT_S
    )
    return replies, time.monotonic() - start


# -- UDP in the namespaces ----------------------------------------------------------------

UDP_SENDER = r"""
import json, socket, sys
for item in json.loads(sys.argv[1]):
    v6 = ":" in item["dst"]
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    if item.get("tos") is not None:
        if v6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, item["tos"])
        else:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, item["tos"])
    for _ in range(item["count"]):
        s.sendto(b"x" * item["size"], (item["dst"], item["port"]))
    s.close()
"""

UDP_RECEIVER = r"""
import json, selectors, socket, sys, time
spec = json.loads(sys.argv[1])
sel = selectors.DefaultSelector()
for addr, port in spec["listen"]:
    v6 = ":" in addr
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    if v6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVTCLASS, 1)
    else:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_RECVTOS, 1)
    s.bind((addr, port))
    sel.register(s, selectors.EVENT_READ, (addr, port))
print("ready", flush=True)
got = []
deadline = time.monotonic() + spec["timeout"]
while len(got) < spec["expect"] and time.monotonic() < deadline:
    for key, _ in sel.select(deadline - time.monotonic()):
        data, anc, _flags, _src = key.fileobj.recvmsg(65535, socket.CMSG_SPACE(4))
        tos = None
        for level, kind, value in anc:
            if (level, kind) == (socket.IPPROTO_IP, socket.IP_TOS):
                tos = value[0]
            elif (level, kind) == (socket.IPPROTO_IPV6, socket.IPV6_TCLASS):
                tos = int.from_bytes(value[:4], sys.byteorder)
        got.append({"addr": key.data[0], "port": key.data[1], "tos": tos, "len": len(data)})
print(json.dumps(got), flush=True)
"""


def send_udp(netns: str, items: list[dict[str, Any]]) -> None:
    """items: {dst, port, count, size, tos (optional: IP_TOS / IPV6_TCLASS)}."""
    run(sys.executable, "-c", UDP_SENDER, json.dumps(items), netns=netns, timeout=30)


@contextmanager
def udp_receiver(
    netns: str, listen: list[tuple[str, int]], expect: int, timeout_s: float = 5.0
) -> Iterator[list[dict[str, Any]]]:
    """A receiver process in netns, bound before the body runs; after the body the list
    holds what it received (addr, port, tos as seen by the socket, len). It stops after
    `expect` datagrams or timeout_s."""
    spec = json.dumps({"listen": listen, "expect": expect, "timeout": timeout_s})
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c", UDP_RECEIVER, spec],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    received: list[dict[str, Any]] = []
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            proc.wait(timeout=10)
            pytest.fail(f"UDP receiver did not start: {proc.stderr.read() if proc.stderr else ''}")
        yield received
        out, err = proc.communicate(timeout=timeout_s + 10)
        assert proc.returncode == 0, err
        received.extend(json.loads(out))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def tos_by_port(received: list[dict[str, Any]]) -> dict[tuple[str, int], set[int]]:
    out: dict[tuple[str, int], set[int]] = {}
    for item in received:
        out.setdefault((item["addr"], item["port"]), set()).add(item["tos"])
    return out


# -- blocklist (XDP) ------------------------------------------------------------------------


@pytest.mark.kernel
def test_blocklist_drops_listed_sources_and_counts_them(datapath: Datapath, veth: VethPair) -> None:
    loaded = attach_library_nf(datapath, veth, "blocklist", Hook.XDP)
    other4, other6 = b_host(veth, 3), b_host(veth, 3, v6=True)
    veth.add_b_address(other4)
    add_b_ip6(veth, other6)
    static_neighbours(veth, b_extra=(other4, other6))

    datapath.sync_entries(loaded, "blocked_v4", [(veth.b_ip, 1)])
    datapath.sync_entries(loaded, "blocked_v6", [({"addr": veth.b_ip6}, 1)])
    assert counters(datapath, loaded, "drops") == {0: 0, 1: 0}

    n4, n6 = 5, 4
    ping = veth.ping
    assert ping(veth.ns_b, veth.a_ip, n4, source=veth.b_ip, timeout_s=REPLY_WAIT_S) == 0
    assert ping(veth.ns_b, veth.a_ip, 3, source=other4, timeout_s=REPLY_WAIT_S) == 3
    assert ping(veth.ns_b, veth.a_ip6, n6, source=veth.b_ip6, timeout_s=REPLY_WAIT_S) == 0
    assert ping(veth.ns_b, veth.a_ip6, 3, source=other6, timeout_s=REPLY_WAIT_S) == 3
    # slot 0 counts IPv4 drops, slot 1 IPv6 drops: exactly the echo requests sent
    assert counters(datapath, loaded, "drops") == {0: n4, 1: n6}

    # Removing the entries (a map update in place, same program) lets traffic through.
    result4 = datapath.sync_entries(loaded, "blocked_v4", [])
    result6 = datapath.sync_entries(loaded, "blocked_v6", [])
    assert (result4.deleted, result6.deleted) == (1, 1)
    assert datapath.chain_prog_ids(veth.a_if, Hook.XDP) == [loaded.prog_id]
    assert ping(veth.ns_b, veth.a_ip, 3, source=veth.b_ip, timeout_s=REPLY_WAIT_S) == 3
    assert ping(veth.ns_b, veth.a_ip6, 3, source=veth.b_ip6, timeout_s=REPLY_WAIT_S) == 3
    assert counters(datapath, loaded, "drops") == {0: n4, 1: n6}


# -- ratelimit (XDP) ------------------------------------------------------------------------


@pytest.mark.kernel
def test_ratelimit_limits_a_flooding_source_only(datapath: Datapath, veth: VethPair) -> None:
    rate, burst = 10, 5
    disable_ipv6(veth.ns_b, veth.b_if)  # only our echo requests reach the limiter
    loaded = attach_library_nf(datapath, veth, "ratelimit", Hook.XDP)
    flooder, slow, exempt = veth.b_ip, b_host(veth, 3), b_host(veth, 4)
    veth.add_b_address(slow)
    veth.add_b_address(exempt)
    static_neighbours(veth, b_extra=(slow, exempt), ipv6=False)
    datapath.sync_entries(loaded, "config", [(0, {"rate_pps": rate, "burst": burst})])
    datapath.sync_entries(loaded, "exempt", [(exempt, 1)])
    assert counters(datapath, loaded, "stats") == {0: 0, 1: 0}

    flood_count, flood_interval = 100, 0.005
    slow_count, slow_interval = 5, 0.3
    with ThreadPoolExecutor(max_workers=3) as pool:
        flood = pool.submit(timed_ping, veth, flood_count, flood_interval, flooder)
        calm = pool.submit(timed_ping, veth, slow_count, slow_interval, slow)
        free = pool.submit(timed_ping, veth, flood_count, flood_interval, exempt)
        (flood_replies, flood_seconds) = flood.result()
        slow_replies, _ = calm.result()
        exempt_replies, _ = free.result()

    # A token bucket passes the burst, then `rate` per second of the flood's span. The
    # flood spans at least (count - 1) * interval and at most the ping's wall time (ping
    # slows down while replies are missing: ~1 s here, so ~14 replies, not 10).
    min_span = (flood_count - 1) * flood_interval
    lower = burst + int(rate * min_span) - 1
    upper = burst + int(rate * flood_seconds) + 1
    assert lower <= flood_replies <= upper, (flood_replies, lower, upper, flood_seconds)
    assert slow_replies == slow_count  # well under the rate: never limited
    assert exempt_replies == flood_count  # exempt: never limited, even flooding

    # Every echo request was counted once; only the flooder's were dropped.
    stats = counters(datapath, loaded, "stats")
    assert stats[1] == flood_count - flood_replies
    assert stats[0] == flood_replies + slow_replies + exempt_replies
    assert stats[0] + stats[1] == 2 * flood_count + slow_count

    # Buckets exist per limited source; the exempt one never gets one.
    # (keys read back as IPv6 text: IPv4 sources in their ::ffff:a.b.c.d mapped form)
    sources = {
        ipaddress.IPv6Address(key["addr"]) for key, _ in datapath.map_entries(loaded, "buckets")
    }
    assert sources == {ipaddress.IPv6Address(f"::ffff:{ip}") for ip in (flooder, slow)}


@pytest.mark.kernel
def test_ratelimit_unconfigured_or_zero_rate_never_drops(
    datapath: Datapath, veth: VethPair
) -> None:
    disable_ipv6(veth.ns_b, veth.b_if)
    loaded = attach_library_nf(datapath, veth, "ratelimit", Hook.XDP)
    static_neighbours(veth, ipv6=False)
    assert veth.ping(veth.ns_b, veth.a_ip, 30, interval=0.005, timeout_s=REPLY_WAIT_S) == 30
    datapath.sync_entries(loaded, "config", [(0, {"rate_pps": 0, "burst": 5})])
    assert veth.ping(veth.ns_b, veth.a_ip, 30, interval=0.005, timeout_s=REPLY_WAIT_S) == 30
    assert counters(datapath, loaded, "stats") == {0: 60, 1: 0}


# -- counter (tc-ingress) -------------------------------------------------------------------


@pytest.mark.kernel
def test_counter_counts_packets_and_bytes_per_protocol(datapath: Datapath, veth: VethPair) -> None:
    loaded = attach_library_nf(datapath, veth, "counter", Hook.TC_INGRESS)
    static_neighbours(veth)

    pings, udp4, udp6, payload = 7, 11, 5, 100
    assert veth.ping(veth.ns_b, veth.a_ip, pings, timeout_s=REPLY_WAIT_S) == pings
    send_udp(
        veth.ns_b,
        [
            {"dst": veth.a_ip, "port": 9, "count": udp4, "size": payload},
            {"dst": veth.a_ip6, "port": 9, "count": udp6, "size": payload},
        ],
    )

    stats: dict[tuple[int, int], dict[str, int]] = {}
    for key, value in datapath.map_entries(loaded, "proto_stats"):
        assert set(key) == {"ethertype", "proto", "pad"} and key["pad"] == 0
        assert isinstance(value, list)  # per-CPU struct values: one per possible CPU
        stats[(key["ethertype"], key["proto"])] = {
            "packets": sum(v["packets"] for v in value),
            "bytes": sum(v["bytes"] for v in value),
        }

    # skb->len at TC ingress includes the Ethernet header
    udp4_frame = ETH_HLEN + IPV4_HLEN + UDP_HLEN + payload
    udp6_frame = ETH_HLEN + IPV6_HLEN + UDP_HLEN + payload
    assert stats[(ETH_P_IP, IPPROTO_ICMP)] == {"packets": pings, "bytes": pings * PING_FRAME}
    assert stats[(ETH_P_IP, IPPROTO_UDP)] == {"packets": udp4, "bytes": udp4 * udp4_frame}
    assert stats[(ETH_P_IPV6, IPPROTO_UDP)] == {"packets": udp6, "bytes": udp6 * udp6_frame}
    # the echo replies leave a: they are not counted at a's ingress
    assert not any(ethertype == ETH_P_IP and proto not in (1, 17) for ethertype, proto in stats)


# -- dscp (tc-egress) -----------------------------------------------------------------------

EF, AF11 = 46, 10


@pytest.mark.kernel
def test_dscp_marks_matching_traffic_as_seen_by_the_receiver(
    datapath: Datapath, veth: VethPair
) -> None:
    loaded = attach_library_nf(datapath, veth, "dscp", Hook.TC_EGRESS)
    static_neighbours(veth)
    datapath.sync_entries(loaded, "rules", [({"proto": IPPROTO_UDP, "dport": 5060}, EF)])
    datapath.sync_entries(loaded, "defaults", [(0, 255)])  # leave unmatched traffic alone
    assert counters(datapath, loaded, "marked") == {0: 0}

    b4, b6 = veth.b_ip, veth.b_ip6
    listen = [(b4, 5060), (b4, 5070), (b6, 5060), (b6, 5070)]
    n = 4
    with udp_receiver(veth.ns_b, listen, expect=6 * n) as received:
        send_udp(
            veth.ns_a,
            [
                {"dst": b4, "port": 5060, "count": n, "size": 32},
                # ECN bits (ECT(0)) survive the re-marking
                {"dst": b4, "port": 5060, "count": n, "size": 32, "tos": 0x02},
                {"dst": b4, "port": 5070, "count": n, "size": 32, "tos": 0x20},
                {"dst": b6, "port": 5060, "count": n, "size": 32},
                {"dst": b6, "port": 5060, "count": n, "size": 32, "tos": 0x01},
                {"dst": b6, "port": 5070, "count": n, "size": 32, "tos": 0x20},
            ],
        )
    assert len(received) == 6 * n  # all arrived: the IPv4 header checksum is still right
    seen = tos_by_port(received)
    assert seen[(b4, 5060)] == {EF << 2, EF << 2 | 0x02}  # 0xb8, 0xba
    assert seen[(b4, 5070)] == {0x20}  # another port keeps its TOS
    assert seen[(b6, 5060)] == {EF << 2, EF << 2 | 0x01}
    assert seen[(b6, 5070)] == {0x20}
    assert counters(datapath, loaded, "marked") == {0: 4 * n}

    # A default DSCP re-marks everything unmatched (IPv4 only here, so that IPv6
    # housekeeping packets of a cannot add to the counter).
    disable_ipv6(veth.ns_a, veth.a_if)
    datapath.sync_entries(loaded, "defaults", [(0, AF11)])
    with udp_receiver(veth.ns_b, [(b4, 5060), (b4, 5070)], expect=3 * n) as received:
        send_udp(
            veth.ns_a,
            [
                {"dst": b4, "port": 5070, "count": n, "size": 32},
                {"dst": b4, "port": 5070, "count": n, "size": 32, "tos": AF11 << 2},
                {"dst": b4, "port": 5060, "count": n, "size": 32},
            ],
        )
    seen = tos_by_port(received)
    assert len(received) == 3 * n
    assert seen[(b4, 5070)] == {AF11 << 2}  # 0x28
    assert seen[(b4, 5060)] == {EF << 2}  # a rule still wins over the default
    # packets already carrying DSCP 10 are left as they are and not counted
    assert counters(datapath, loaded, "marked") == {0: 4 * n + 2 * n}
