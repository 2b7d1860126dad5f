"""The plan: a pure function of the applied NFs, the node's interfaces and what the kernel
runs. It says which chains to set or clear (frozen points left alone), which managed entries
to write or only check, whether a difference is a change or drift, which map swaps may be
committed and which old builds may go."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from nfctl.agent.plan import AttachPoint, ChainEntry, plan_chain_changes, target_chains
from nfctl.agent.reconcile.state import Applied
from nfctl.datapath.datapath import LoadedBuild
from nfctl.datapath.observe import AttachPointState
from nfctl.manifest.model import Hook

Chains = dict[AttachPoint, list[ChainEntry]]


def desired_chains(applied: Mapping[str, Applied], interfaces: Iterable[str]) -> Chains:
    return target_chains([a.placement for a in applied.values()], interfaces)


def observe_request(
    target: Chains, tracked: Iterable[AttachPoint]
) -> dict[tuple[str, Hook], list[str]]:
    """What to ask the kernel about: every attach point targeted or tracked, with the NFs
    wanted there in order (drift is described against these)."""
    points = sorted(set(target) | set(tracked))
    return {(p.ifname, p.hook): [e.nf for e in target.get(p, [])] for p in points}


@dataclass
class Observation:
    """Per attach point: the chain the kernel runs (None: our dispatcher is not on the
    hook), the attach mode, how it differs from the target, and the raw kernel view."""

    actual: dict[AttachPoint, list[ChainEntry] | None] = field(default_factory=dict)
    modes: dict[AttachPoint, str | None] = field(default_factory=dict)
    drift: dict[AttachPoint, list[str]] = field(default_factory=dict)
    states: dict[AttachPoint, AttachPointState] = field(default_factory=dict)


def read_observation(states: Iterable[AttachPointState]) -> Observation:
    seen = Observation()
    for state in states:
        point = AttachPoint(state.ifname, state.hook)
        seen.states[point] = state
        seen.modes[point] = state.xdp_mode if state.hook is Hook.XDP else state.attach or "tc"
        # a vanished interface is not drift: the attachment tracker reports it
        seen.drift[point] = [d for d in state.drift if "is gone" not in d]
        if state.ours:
            seen.actual[point] = [
                ChainEntry(ref.nf or f"?{ref.prog_id}", ref.build_prefix or "")
                for ref in state.chain
            ]
        else:
            seen.actual[point] = None
    return seen


class EntryIntent(StrEnum):
    APPLY = "apply"  # the manifest changed: write, report as applied
    RESTORE = "restore"  # nothing asked for a change: a difference is drift, corrected
    CHECK = "check"  # as RESTORE in warn mode: compare only, report drift


@dataclass(frozen=True)
class MapEntries:
    map_name: str
    entries: list[tuple[Any, Any]]


@dataclass(frozen=True)
class EntrySync:
    nf: str
    loaded: LoadedBuild
    intent: EntryIntent
    maps: list[MapEntries]
    synced_as: tuple[str, str]  # (build, entries digest) once every map is written


@dataclass(frozen=True)
class ChainStep:
    point: AttachPoint
    entries: list[ChainEntry]
    xdp_mode: str
    position: str
    drift: tuple[str, ...] = ()  # non-empty: the step corrects drift, not a change


@dataclass
class Plan:
    entries: list[EntrySync] = field(default_factory=list)
    chains: list[ChainStep] = field(default_factory=list)
    clear: list[AttachPoint] = field(default_factory=list)
    frozen: set[AttachPoint] = field(default_factory=set)
    drift_left: dict[AttachPoint, list[str]] = field(default_factory=dict)  # warn mode
    drift_found: list[str] = field(default_factory=list)  # chain drift, as "point: what"


def plan_entries(
    applied: Mapping[str, Applied],
    loaded: Mapping[str, LoadedBuild],
    suspended: set[str],
    synced: Mapping[str, tuple[str, str]],
    correct: bool,
) -> list[EntrySync]:
    """Managed entries of every running NF that is not frozen. A manifest whose build and
    entries were synced before asks for no change: any difference is drift."""
    out = []
    for name, item in applied.items():
        build = loaded.get(name)
        if name in suspended or build is None:
            continue
        key = (item.build_hash, item.record.entries_digest)
        if synced.get(name) != key:
            intent = EntryIntent.APPLY
        else:
            intent = EntryIntent.RESTORE if correct else EntryIntent.CHECK
        maps = [
            MapEntries(map_name, [(e.key, e.value) for e in spec.entries])
            for map_name, spec in item.nf.spec.maps.items()
            if spec.managed
        ]
        out.append(EntrySync(name, build, intent, maps, key))
    return out


def frozen_points(
    target: Chains, actual: Mapping[AttachPoint, list[ChainEntry] | None], suspended: set[str]
) -> set[AttachPoint]:
    """Attach points running a suspended NF: left exactly as they are."""
    return {
        point
        for point, entries in target.items()
        if any(e.nf in suspended for e in entries) and actual.get(point) is not None
    }


def chain_xdp_mode(entries: list[ChainEntry], applied: Mapping[str, Applied]) -> str:
    """The first NF (in chain order) that asks for an XDP mode sets it."""
    for entry in entries:
        item = applied.get(entry.nf)
        if item and item.nf.spec.attach.xdp_mode.value != "auto":
            return item.nf.spec.attach.xdp_mode.value
    return "auto"


def chain_position(entries: list[ChainEntry], applied: Mapping[str, Applied]) -> str:
    """The TCX placement of the chain: the first NF (in chain order) that sets one."""
    for entry in entries:
        item = applied.get(entry.nf)
        if item and item.nf.spec.attach.position:
            return item.nf.spec.attach.position
    return "first"


def plan_chains(
    target: Chains,
    seen: Observation,
    applied: Mapping[str, Applied],
    suspended: set[str],
    previous: Chains | None,
    correct: bool,
) -> Plan:
    """previous: the target of the last pass (None before the first). A chain that differs
    from the kernel while its target did not change since then is drift: set again (mode
    correct) or left and reported (warn)."""
    plan = Plan(frozen=frozen_points(target, seen.actual, suspended))
    changes = plan_chain_changes(target, seen.actual, plan.frozen)
    for point, entries in changes.set.items():
        unchanged = previous is not None and previous.get(point) == entries
        drift = seen.drift.get(point, []) if unchanged else []
        if drift:
            plan.drift_found.extend(f"{point}: {d}" for d in drift)
            if not correct:
                plan.drift_left[point] = drift
                continue
        plan.chains.append(
            ChainStep(
                point,
                entries,
                chain_xdp_mode(entries, applied),
                chain_position(entries, applied),
                tuple(drift),
            )
        )
    plan.clear = list(changes.clear)
    return plan


def swaps_ready(
    pending: Mapping[str, LoadedBuild], attach_errors: Mapping[str, Mapping[AttachPoint, str]]
) -> list[str]:
    """New maps go in place only for an NF live on every attach point: until then its old
    program (on the points that failed) still uses the old maps."""
    return [name for name in pending if not attach_errors.get(name)]


def releases(
    applied: Mapping[str, Applied],
    in_kernel: Chains,
    pending: Iterable[str],
    kept: Mapping[str, set[str]] | None = None,
) -> dict[str, set[str]]:
    """Per NF, the builds to keep pinned: the applied one, any still in a chain we set,
    and those a rollout keeps for a rollback (kept); NFs with a map swap not yet committed
    keep everything."""
    chained = {(e.nf, e.build_hash[:32]) for entries in in_kernel.values() for e in entries}
    waiting = set(pending)
    kept = kept or {}
    return {
        name: {item.build_hash} | {h for n, h in chained if n == name} | kept.get(name, set())
        for name, item in applied.items()
        if name not in waiting
    }
