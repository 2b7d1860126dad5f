"""Interface names resolve through SIOCGIFINDEX on a socket of the namespace asked about."""

from __future__ import annotations

import socket

from nfctl.datapath.netlink import index_by_name


def test_names_resolve_like_if_nametoindex() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        assert index_by_name(sock, "lo") == socket.if_nametoindex("lo")
        assert index_by_name(sock, "nfctl-absent0") is None
        assert index_by_name(sock, "x" * 16) is None  # longer than IFNAMSIZ-1: not truncated
        assert index_by_name(sock, "") is None
