"""Build test packets with scapy and read back the fields a test can check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nfctl.nftest.model import Eth, Packet


class PacketError(ValueError):
    pass


def build_packet(spec: Packet, base_dir: Path, repo_root: Path) -> bytes:
    """The bytes of a test packet. pcap paths are relative to the tests file and must stay
    inside the repository (the NF repository is untrusted)."""
    if spec.hex is not None:
        return bytes.fromhex(spec.hex.replace(":", "").replace(" ", "").replace("\n", ""))
    if spec.pcap is not None:
        return _from_pcap(spec, base_dir, repo_root)
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    eth = spec.eth or Eth()
    pkt: Any = Ether(src=eth.src, dst=eth.dst)
    if spec.ipv4 is not None:
        v4 = spec.ipv4
        tos = v4.tos if v4.tos is not None else ((v4.dscp or 0) << 2) | (v4.ecn or 0)
        fields: dict[str, Any] = {"src": v4.src, "dst": v4.dst, "tos": tos, "ttl": v4.ttl}
        fields["id"] = v4.id
        if v4.proto is not None:
            fields["proto"] = v4.proto
        pkt = pkt / IP(**fields)
    elif spec.ipv6 is not None:
        v6 = spec.ipv6
        tc = v6.tc if v6.tc is not None else ((v6.dscp or 0) << 2) | (v6.ecn or 0)
        fields = {"src": v6.src, "dst": v6.dst, "tc": tc, "hlim": v6.hlim, "fl": v6.fl}
        if v6.nh is not None:
            fields["nh"] = v6.nh
        pkt = pkt / IPv6(**fields)
    if spec.tcp is not None:
        t = spec.tcp
        pkt = pkt / TCP(
            sport=t.sport, dport=t.dport, flags=t.flags, seq=t.seq, ack=t.ack, window=t.window
        )
    elif spec.udp is not None:
        pkt = pkt / UDP(sport=spec.udp.sport, dport=spec.udp.dport)
    elif spec.icmp is not None:
        i = spec.icmp
        if spec.ipv6 is not None:
            pkt = pkt / ICMPv6EchoRequest(id=i.id, seq=i.seq)
        else:
            pkt = pkt / ICMP(type=i.type, code=i.code, id=i.id, seq=i.seq)
    if spec.payload:
        pkt = pkt / Raw(load=bytes(spec.payload))
    try:
        return bytes(pkt)
    except (OSError, ValueError) as exc:  # e.g. an address scapy cannot parse
        raise PacketError(f"cannot build the packet: {exc}") from exc


def _from_pcap(spec: Packet, base_dir: Path, repo_root: Path) -> bytes:
    from scapy.utils import RawPcapReader

    from nfctl.manifest.paths import PathEscapeError, resolve_inside

    assert spec.pcap is not None
    try:
        path = resolve_inside(base_dir / spec.pcap, repo_root)
    except PathEscapeError as exc:
        raise PacketError(str(exc)) from exc
    if not path.is_file():
        raise PacketError(f"pcap file {spec.pcap!r} not found")
    try:
        with RawPcapReader(str(path)) as reader:
            for index, (data, _meta) in enumerate(reader):
                if index == spec.index:
                    return bytes(data)
    except Exception as exc:  # scapy raises Scapy_Exception and friends on bad files
        raise PacketError(f"cannot read pcap file {spec.pcap!r}: {exc}") from exc
    raise PacketError(f"pcap file {spec.pcap!r} has no packet #{spec.index}")


def packet_fields(data: bytes) -> dict[str, Any]:
    """Every checkable field of a packet, by 'layer.field' (names as in tests.yaml)."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    out: dict[str, Any] = {}
    pkt: Any = Ether(data)
    out["eth.src"], out["eth.dst"], out["eth.type"] = pkt.src, pkt.dst, pkt.type
    ip4 = pkt.getlayer(IP)
    if ip4 is not None:
        out.update(
            {
                "ipv4.src": ip4.src,
                "ipv4.dst": ip4.dst,
                "ipv4.tos": ip4.tos,
                "ipv4.dscp": ip4.tos >> 2,
                "ipv4.ecn": ip4.tos & 3,
                "ipv4.ttl": ip4.ttl,
                "ipv4.proto": ip4.proto,
                "ipv4.id": ip4.id,
                "ipv4.chksumValid": _ipv4_checksum_ok(bytes(ip4)[: ip4.ihl * 4]),
            }
        )
    ip6 = pkt.getlayer(IPv6)
    if ip6 is not None:
        out.update(
            {
                "ipv6.src": ip6.src,
                "ipv6.dst": ip6.dst,
                "ipv6.tc": ip6.tc,
                "ipv6.dscp": ip6.tc >> 2,
                "ipv6.ecn": ip6.tc & 3,
                "ipv6.hlim": ip6.hlim,
                "ipv6.nh": ip6.nh,
                "ipv6.fl": ip6.fl,
            }
        )
    tcp = pkt.getlayer(TCP)
    if tcp is not None:
        out.update(
            {
                "tcp.sport": tcp.sport,
                "tcp.dport": tcp.dport,
                "tcp.flags": str(tcp.flags),
                "tcp.seq": tcp.seq,
                "tcp.ack": tcp.ack,
                "tcp.window": tcp.window,
            }
        )
    udp = pkt.getlayer(UDP)
    if udp is not None:
        out.update({"udp.sport": udp.sport, "udp.dport": udp.dport})
    icmp = pkt.getlayer(ICMP)
    if icmp is not None:
        out.update(
            {
                "icmp.type": icmp.type,
                "icmp.code": icmp.code,
                "icmp.id": icmp.id,
                "icmp.seq": icmp.seq,
            }
        )
    out["frame.len"] = len(data)
    return out


def _ipv4_checksum_ok(header: bytes) -> bool:
    total = 0
    for i in range(0, len(header) - 1, 2):
        total += (header[i] << 8) | header[i + 1]
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


def same_value(expected: Any, got: Any) -> bool:
    """Compare a YAML value with a packet field: addresses and MACs case-insensitively,
    numbers as numbers, TCP flags as a set of letters."""
    if isinstance(got, bool) or isinstance(expected, bool):
        return bool(expected) == bool(got) and type(expected) is type(got)
    if isinstance(got, int):
        return isinstance(expected, int) and expected == got
    if isinstance(got, str) and isinstance(expected, str):
        if got.isalpha() and got.isupper():
            return sorted(expected) == sorted(got)
        import ipaddress

        try:
            return ipaddress.ip_address(expected) == ipaddress.ip_address(got)
        except ValueError:
            return expected.lower() == got.lower()
    return bool(expected == got)
