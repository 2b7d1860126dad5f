"""Apply: the datapath executes a plan, one step at a time; every step's outcome is recorded
in order (summary.py turns them into events). A failed step never stops the others."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from nfctl.agent.plan import AttachPoint
from nfctl.agent.reconcile.plan import (
    Chains,
    EntryIntent,
    EntrySync,
    Plan,
    releases,
    swaps_ready,
)
from nfctl.agent.reconcile.ports import BuilderPort, DatapathPort
from nfctl.agent.reconcile.state import Applied
from nfctl.agent.store import AppliedNF
from nfctl.bpf.codec import CodecError
from nfctl.datapath.datapath import LoadedBuild

log = logging.getLogger(__name__)


class Step(StrEnum):
    ENTRIES_WRITTEN = "EntriesWritten"  # detail: the counts; intent says change or drift
    ENTRIES_DIFFER = "EntriesDiffer"  # warn mode: the map differs from Git, left alone
    ENTRIES_FAILED = "EntriesFailed"
    CHAIN_SET = "ChainSet"
    CHAIN_FAILED = "ChainFailed"
    CLEAR_FAILED = "ClearFailed"
    MAPS_REPLACED = "MapsReplaced"
    MAPS_FAILED = "MapsFailed"
    PRUNED = "Pruned"


@dataclass(frozen=True)
class Outcome:
    step: Step
    nf: str | None = None
    subject: str = ""  # the map or attach point
    detail: str = ""
    intent: EntryIntent | None = None  # entry steps
    drift: tuple[str, ...] = ()  # a chain step that corrected drift


@dataclass
class ApplyResult:
    """What applying did: outcomes in order, the attach mode per point set, the errors per
    NF and attach point, and which NFs' entries are fully in the kernel."""

    outcomes: list[Outcome] = field(default_factory=list)
    modes: dict[AttachPoint, str | None] = field(default_factory=dict)
    attach_errors: dict[str, dict[AttachPoint, str]] = field(default_factory=dict)
    synced: dict[str, tuple[str, str]] = field(default_factory=dict)
    entry_drift: list[str] = field(default_factory=list)  # "nf/map"
    committed: list[str] = field(default_factory=list)


def write_entries(datapath: DatapathPort, items: list[EntrySync], result: ApplyResult) -> None:
    for item in items:
        ok = True
        for spec in item.maps:
            subject = f"{item.nf}/{spec.map_name}"
            try:
                if item.intent is EntryIntent.CHECK:
                    if not datapath.entries_diff(item.loaded, spec.map_name, spec.entries).empty:
                        result.entry_drift.append(subject)
                        result.outcomes.append(
                            Outcome(Step.ENTRIES_DIFFER, item.nf, spec.map_name, "", item.intent)
                        )
                    continue
                written = datapath.sync_entries(item.loaded, spec.map_name, spec.entries)
            except (OSError, CodecError, KeyError) as exc:
                result.outcomes.append(
                    Outcome(Step.ENTRIES_FAILED, item.nf, spec.map_name, str(exc), item.intent)
                )
                ok = False
                continue
            if not written.added + written.updated + written.deleted:
                continue
            if item.intent is not EntryIntent.APPLY:
                result.entry_drift.append(subject)
            result.outcomes.append(
                Outcome(
                    Step.ENTRIES_WRITTEN,
                    item.nf,
                    spec.map_name,
                    f"+{written.added} ~{written.updated} -{written.deleted} "
                    f"entries ({written.total} total)",
                    item.intent,
                )
            )
        if ok:
            result.synced[item.nf] = item.synced_as


def set_chains(datapath: DatapathPort, plan: Plan, correct: bool, result: ApplyResult) -> None:
    for step in plan.chains:
        try:
            result.modes[step.point] = datapath.set_chain(
                step.point, step.entries, step.xdp_mode, correct, step.position
            )
        except Exception as exc:  # one attach point failing leaves the others going
            for e in step.entries:
                result.attach_errors.setdefault(e.nf, {})[step.point] = str(exc)
            log.warning("cannot set chain on %s: %s", step.point, exc)
            result.outcomes.append(Outcome(Step.CHAIN_FAILED, None, str(step.point), str(exc)))
            continue
        result.outcomes.append(Outcome(Step.CHAIN_SET, None, str(step.point), drift=step.drift))
    for point in plan.clear:
        try:
            datapath.clear_chain(point)
        except Exception as exc:
            log.warning("cannot clear %s: %s", point, exc)
            result.outcomes.append(Outcome(Step.CLEAR_FAILED, None, str(point), str(exc)))
    datapath.reap()


def commit_swaps(
    builder: BuilderPort, pending: dict[str, LoadedBuild], result: ApplyResult
) -> None:
    """Gated by swaps_ready; committed (or failed) swaps leave pending."""
    for name in swaps_ready(pending, result.attach_errors):
        loaded = pending.pop(name)
        swaps = ", ".join(
            f"{w.name} ({w.migrated_entries} entries carried over)" for w in loaded.swaps
        )
        try:
            builder.commit(loaded)
        except OSError as exc:
            result.outcomes.append(Outcome(Step.MAPS_FAILED, name, detail=str(exc)))
            continue
        result.committed.append(name)
        result.outcomes.append(Outcome(Step.MAPS_REPLACED, name, detail=swaps))


def prune(datapath: DatapathPort, gone: list[AppliedNF], result: ApplyResult) -> None:
    for record in gone:
        datapath.remove_nf(record.name)
        result.outcomes.append(Outcome(Step.PRUNED, record.name, detail=record.version))


def apply_plan(
    datapath: DatapathPort,
    builder: BuilderPort,
    plan: Plan,
    correct: bool,
    pending: dict[str, LoadedBuild],
    gone: list[AppliedNF],
    applied: Mapping[str, Applied],
    previous: Chains,
    kept: Mapping[str, set[str]] | None = None,
) -> ApplyResult:
    """Entries first: they live in pinned maps that old and new programs share, so a
    map-only change is in the kernel before any netlink work, and a new NF starts with its
    entries in place. Then chains, swaps of maps for NFs now live everywhere, prunes, and
    builds nothing runs any more (previous: the chains of the last pass, possibly still in
    the kernel where a set failed)."""
    result = ApplyResult()
    write_entries(datapath, plan.entries, result)
    set_chains(datapath, plan, correct, result)
    commit_swaps(builder, pending, result)
    prune(datapath, gone, result)
    for name, keep in releases(applied, previous, pending, kept).items():
        datapath.release_versions(name, keep)
    return result
