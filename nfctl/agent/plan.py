"""Pure planning: which NFs belong on this node, on which interfaces and hooks, in which
order, and what must change in the kernel to get there. No side effects here."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from nfctl.manifest.model import Hook, InterfaceRemoval, NetworkFunction


@dataclass(frozen=True, order=True)
class AttachPoint:
    ifname: str
    hook: Hook

    def __str__(self) -> str:
        return f"{self.ifname}/{self.hook.value}"


@dataclass(frozen=True)
class ChainEntry:
    nf: str
    build_hash: str


@dataclass(frozen=True)
class Placement:
    """Where one NF build goes: its hook, order and interface globs."""

    nf: str
    build_hash: str
    hook: Hook
    priority: int
    interfaces: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    xdp_mode: str = "auto"
    # the NF's interfaces come and go (onInterfaceRemoved: forget): one vanishing is no loss
    forget_removed: bool = False

    @classmethod
    def of(cls, nf: NetworkFunction, build_hash: str) -> Placement:
        attach = nf.spec.attach
        return cls(
            nf=nf.name,
            build_hash=build_hash,
            hook=attach.hook,
            priority=attach.priority,
            interfaces=tuple(attach.interfaces),
            exclude=tuple(attach.exclude_interfaces),
            xdp_mode=attach.xdp_mode.value,
            forget_removed=attach.on_interface_removed is InterfaceRemoval.FORGET,
        )


def selects_node(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Kubernetes nodeSelector semantics: every selector label must match exactly."""
    return all(labels.get(key) == value for key, value in selector.items())


def match_interfaces(
    include: Iterable[str], exclude: Iterable[str], interfaces: Iterable[str]
) -> list[str]:
    excluded = list(exclude)
    out = []
    for name in interfaces:
        if name == "lo":
            continue  # never: XDP/TC on loopback would catch the node's own traffic
        if any(fnmatch.fnmatchcase(name, p) for p in include) and not any(
            fnmatch.fnmatchcase(name, p) for p in excluded
        ):
            out.append(name)
    return sorted(out)


def target_chains(
    placements: Iterable[Placement], interfaces: Iterable[str]
) -> dict[AttachPoint, list[ChainEntry]]:
    """Every attach point and its NFs in order: priority, then name (stable, total)."""
    names = list(interfaces)
    grouped: dict[AttachPoint, list[Placement]] = {}
    for placement in placements:
        for ifname in match_interfaces(placement.interfaces, placement.exclude, names):
            grouped.setdefault(AttachPoint(ifname, placement.hook), []).append(placement)
    return {
        point: [
            ChainEntry(p.nf, p.build_hash) for p in sorted(group, key=lambda p: (p.priority, p.nf))
        ]
        for point, group in sorted(grouped.items())
    }


@dataclass
class ChainChanges:
    set: dict[AttachPoint, list[ChainEntry]] = field(default_factory=dict)
    clear: list[AttachPoint] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.set and not self.clear


def plan_chain_changes(
    target: Mapping[AttachPoint, list[ChainEntry]],
    actual: Mapping[AttachPoint, list[ChainEntry] | None],
    frozen: Iterable[AttachPoint] = (),
) -> ChainChanges:
    """actual: every attach point we hold or track, with the chain the kernel runs there
    (None: our dispatcher is not on the hook). Targets that differ are set; attach points
    no longer targeted are cleared; frozen ones (suspended NFs) are left alone."""
    keep = set(frozen)
    changes = ChainChanges()
    for point, entries in target.items():
        if point in keep:
            continue
        have = actual.get(point)
        if have is None or [_short(e) for e in have] != [_short(e) for e in entries]:
            changes.set[point] = entries
    for point in actual:
        if point not in target and point not in keep:
            changes.clear.append(point)
    changes.clear.sort()
    return changes


def _short(entry: ChainEntry) -> tuple[str, str]:
    # the kernel side knows builds by the 32-character prefix pinned in bpffs
    return entry.nf, entry.build_hash[:32]


def prune_candidates(
    applied: Iterable[str], in_git: Iterable[str], failing_paths_owners: Iterable[str]
) -> list[str]:
    """NFs to remove: applied here, gone from Git, and not merely unreadable this time
    (a manifest that fails to parse keeps its NF: a typo must never detach a firewall)."""
    present = set(in_git) | set(failing_paths_owners)
    return sorted(set(applied) - present)
