"""Throwaway network namespaces joined by veth pairs, always removed: the lab builds its
nodes with these, the hook check probes the kernel with them, tests and benchmarks send
traffic through them.

with VethPair.create("t1") as pair:   # netns nfct-t1-a / nfct-t1-b, 10.77.x.1/.2
    pair.ping_from_b(count=5)
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from dataclasses import dataclass, field
from types import TracebackType

PREFIX = "nfct"


def run(*args: str, netns: str | None = None, check: bool = True, timeout: float = 60) -> str:
    cmd = list(args)
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def ping_summary(output: str) -> tuple[int, int]:
    """(transmitted, received) from ping's summary line; ValueError if it printed none."""
    match = re.search(r"(\d+) packets transmitted, (\d+) received", output)
    if not match:
        raise ValueError(f"ping gave no summary: {output}")
    return int(match.group(1)), int(match.group(2))


def unique_name(tag: str) -> str:
    """Short and unique: netns names are free, but interface names hold 15 bytes."""
    return f"{tag}{uuid.uuid4().hex[:6]}"


def netns_exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")


def delete_netns(name: str) -> None:
    if netns_exists(name):
        run("ip", "netns", "del", name, check=False)


@dataclass
class VethPair:
    """Two namespaces a and b, veth `a_if` in a and `b_if` in b, IPv4 and IPv6 addresses.

    The NF under test usually sits on a_if (ingress from b, egress towards b)."""

    tag: str
    ns_a: str
    ns_b: str
    a_if: str = "veth0"
    b_if: str = "veth0"
    a_ip: str = ""
    b_ip: str = ""
    a_ip6: str = ""
    b_ip6: str = ""
    extra_b_ips: list[str] = field(default_factory=list)

    @classmethod
    def create(
        cls, tag: str | None = None, subnet: int | None = None, a_index: int | None = None
    ) -> VethPair:
        """a_index: the interface index a_if gets (kept when it moves into its namespace)."""
        tag = tag or unique_name("")
        if not re.fullmatch(r"[a-z0-9]{1,12}", tag):
            raise ValueError(f"bad netns tag {tag!r}")
        octet = subnet if subnet is not None else int(uuid.uuid4().hex[:2], 16) % 250 + 1
        pair = cls(
            tag=tag,
            ns_a=f"{PREFIX}-{tag}-a",
            ns_b=f"{PREFIX}-{tag}-b",
            a_ip=f"10.77.{octet}.1",
            b_ip=f"10.77.{octet}.2",
            a_ip6=f"fd77:{octet:x}::1",
            b_ip6=f"fd77:{octet:x}::2",
        )
        try:
            pair._setup(a_index)
        except BaseException:
            pair.destroy()
            raise
        return pair

    def _setup(self, a_index: int | None = None) -> None:
        for ns in (self.ns_a, self.ns_b):
            delete_netns(ns)
            run("ip", "netns", "add", ns)
            run("ip", "link", "set", "lo", "up", netns=ns)
        tmp_a, tmp_b = f"nfa{self.tag}"[:15], f"nfb{self.tag}"[:15]
        index = [] if a_index is None else ["index", str(a_index)]
        run("ip", "link", "add", tmp_a, *index, "type", "veth", "peer", "name", tmp_b)
        run("ip", "link", "set", tmp_a, "netns", self.ns_a, "name", self.a_if)
        run("ip", "link", "set", tmp_b, "netns", self.ns_b, "name", self.b_if)
        for ns, ifname, ip, ip6 in (
            (self.ns_a, self.a_if, self.a_ip, self.a_ip6),
            (self.ns_b, self.b_if, self.b_ip, self.b_ip6),
        ):
            run("ip", "addr", "add", f"{ip}/24", "dev", ifname, netns=ns)
            run("ip", "-6", "addr", "add", f"{ip6}/64", "dev", ifname, "nodad", netns=ns)
            run("ip", "link", "set", ifname, "up", netns=ns)

    def add_b_address(self, ip: str) -> None:
        """An extra source address on b (to test per-source behaviour). It must lie in the
        pair's subnet (a has no route elsewhere); IPv6 ones skip duplicate detection."""
        if ":" in ip:
            run("ip", "-6", "addr", "add", f"{ip}/128", "dev", self.b_if, "nodad", netns=self.ns_b)
        else:
            run("ip", "addr", "add", f"{ip}/32", "dev", self.b_if, netns=self.ns_b)
        self.extra_b_ips.append(ip)

    def destroy(self) -> None:
        delete_netns(self.ns_a)
        delete_netns(self.ns_b)

    def __enter__(self) -> VethPair:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    def ping(
        self,
        src_ns: str,
        dst: str,
        count: int = 3,
        interval: float = 0.01,
        source: str | None = None,
        timeout_s: float = 1.0,
        size: int | None = None,
    ) -> int:
        """Send count echo requests; returns how many replies came back."""
        args = ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", str(timeout_s)]
        if ":" in dst:
            args.insert(1, "-6")
        if source:
            args += ["-I", source]
        if size is not None:
            args += ["-s", str(size)]
        out = run(*args, dst, netns=src_ns, check=False, timeout=60 + count * interval * 2)
        match = re.search(r"(\d+) received", out)
        return int(match.group(1)) if match else 0

    def ping_a_from_b(self, count: int = 3, **kwargs: object) -> int:
        return self.ping(self.ns_b, self.a_ip, count, **kwargs)  # type: ignore[arg-type]


def cleanup_stale(prefix: str = PREFIX, older_than: float = 900.0) -> list[str]:
    """Remove namespaces a crashed run left behind. Only old ones: another test run may
    be using fresh ones right now."""
    import time

    removed: list[str] = []
    try:
        names = os.listdir("/run/netns")
    except OSError:
        return removed
    now = time.time()
    for name in names:
        if not name.startswith(prefix + "-"):
            continue
        try:
            age = now - os.stat(f"/run/netns/{name}").st_mtime
        except OSError:
            continue
        if age > older_than:
            delete_netns(name)
            removed.append(name)
    return removed
