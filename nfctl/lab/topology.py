"""Lab topology: a hub namespace with a bridge (the "switch" and the controller host) and
one namespace per node, each with eth0 plugged into the bridge.

    hub (10.N.0.254)  --br0--  node1 eth0 10.N.0.1,  node2 eth0 10.N.0.2, ...
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nfctl.lab.process import nsenter as nsenter  # where the lab's callers look for it
from nfctl.netns import delete_netns, netns_exists, run

STATE_FILE = Path("/run/nfctl-lab")


@dataclass
class Node:
    name: str
    netns: str
    ip: str
    ip6: str


@dataclass
class Topology:
    """The lab's network: a hub namespace with a bridge, one namespace per node plugged into
    it, and optionally a host link; saved under /run so `lab down` finds it after a crash."""

    tag: str
    subnet: int
    hub: str
    hub_ip: str
    nodes: list[Node] = field(default_factory=list)
    host_link: str | None = None  # veth in the host namespace into the hub bridge
    host_ip: str | None = None

    @classmethod
    def create(cls, tag: str, count: int, subnet: int = 99, host_link: bool = False) -> Topology:
        if not re.fullmatch(r"[a-z0-9]{1,8}", tag):
            raise ValueError(f"lab tag {tag!r}: 1-8 lowercase letters/digits")
        topo = cls(tag=tag, subnet=subnet, hub=f"nfl-{tag}-hub", hub_ip=f"10.{subnet}.0.254")
        try:
            topo._setup(count)
            if host_link:
                topo._link_host()
        except BaseException:
            topo.destroy()
            raise
        topo.save()
        return topo

    def _setup(self, count: int) -> None:
        delete_netns(self.hub)
        run("ip", "netns", "add", self.hub)
        run("ip", "link", "set", "lo", "up", netns=self.hub)
        run("ip", "link", "add", "br0", "type", "bridge", netns=self.hub)
        run("ip", "addr", "add", f"{self.hub_ip}/24", "dev", "br0", netns=self.hub)
        run(
            "ip",
            "-6",
            "addr",
            "add",
            f"fd{self.subnet:02x}::fe/64",
            "dev",
            "br0",
            "nodad",
            netns=self.hub,
        )
        run("ip", "link", "set", "br0", "up", netns=self.hub)
        for index in range(1, count + 1):
            node = Node(
                name=f"node{index}",
                netns=f"nfl-{self.tag}-n{index}",
                ip=f"10.{self.subnet}.0.{index}",
                ip6=f"fd{self.subnet:02x}::{index}",
            )
            delete_netns(node.netns)
            run("ip", "netns", "add", node.netns)
            run("ip", "link", "set", "lo", "up", netns=node.netns)
            hub_side = f"p{self.tag}{index}"[:15]
            tmp = f"t{self.tag}{index}"[:15]
            run("ip", "link", "add", tmp, "type", "veth", "peer", "name", hub_side)
            run("ip", "link", "set", hub_side, "netns", self.hub)
            run("ip", "link", "set", tmp, "netns", node.netns, "name", "eth0")
            run("ip", "link", "set", hub_side, "master", "br0", "up", netns=self.hub)
            run("ip", "addr", "add", f"{node.ip}/24", "dev", "eth0", netns=node.netns)
            run(
                "ip",
                "-6",
                "addr",
                "add",
                f"{node.ip6}/64",
                "dev",
                "eth0",
                "nodad",
                netns=node.netns,
            )
            run("ip", "link", "set", "eth0", "up", netns=node.netns)
            self.nodes.append(node)

    def _link_host(self) -> None:
        """The host reaches the hub (controller, webhook) at 10.N.0.254 through this."""
        self.host_link = f"nfl-{self.tag}"[:15]
        self.host_ip = f"10.{self.subnet}.0.253"
        hub_side = f"h{self.tag}"[:15]
        run("ip", "link", "del", self.host_link, check=False)
        run("ip", "link", "add", self.host_link, "type", "veth", "peer", "name", hub_side)
        run("ip", "link", "set", hub_side, "netns", self.hub)
        run("ip", "link", "set", hub_side, "master", "br0", "up", netns=self.hub)
        run("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.host_link)
        run("ip", "link", "set", self.host_link, "up")

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def namespaces(self) -> list[str]:
        return [self.hub, *(n.netns for n in self.nodes)]

    def destroy(self) -> None:
        if self.host_link:
            run("ip", "link", "del", self.host_link, check=False)
        for node in self.nodes:
            delete_netns(node.netns)
        for index in range(1, 64):
            name = f"nfl-{self.tag}-n{index}"
            if netns_exists(name):
                delete_netns(name)
        delete_netns(self.hub)
        self.state_path().unlink(missing_ok=True)

    def state_path(self) -> Path:
        return STATE_FILE / f"{self.tag}.json"

    def save(self) -> None:
        self.state_path().parent.mkdir(parents=True, exist_ok=True)
        self.state_path().write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, tag: str) -> Topology | None:
        try:
            data = json.loads((STATE_FILE / f"{tag}.json").read_text())
        except (OSError, ValueError):
            return None
        nodes = [Node(**n) for n in data.pop("nodes", [])]
        return cls(nodes=nodes, **data)


def leftover_namespaces(tag: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir("/run/netns") if n.startswith(f"nfl-{tag}-"))
    except OSError:
        return []
