"""Node status: per-NF state and the node's conditions, derived from what the reconciler
knows and what the kernel was seen to run. Pure: the kernel reads (program ids, map
counts, verdict counters) arrive as data in StatusInputs."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nfctl.agent.attachments import LostPoint
from nfctl.agent.plan import AttachPoint, ChainEntry
from nfctl.agent.reconcile.state import Applied, NFRuntime
from nfctl.datapath.counters import CounterKey, VerdictCounts
from nfctl.datapath.datapath import LoadedBuild
from nfctl.datapath.observe import AttachPointState
from nfctl.wire.status import (
    AttachPointStatus,
    ConditionType,
    ErrorInfo,
    MapStatus,
    NFState,
    NFStatus,
    NodeStatus,
    Verdicts,
    VerdictTotals,
)


@dataclass
class StatusInputs:
    applied: Mapping[str, Applied] = field(default_factory=dict)
    runtime: Mapping[str, NFRuntime] = field(default_factory=dict)
    loaded: Mapping[str, LoadedBuild] = field(default_factory=dict)  # running builds
    map_counts: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # nf -> map -> n
    verdicts: Mapping[str, VerdictTotals] = field(default_factory=dict)
    target: Mapping[AttachPoint, list[ChainEntry]] = field(default_factory=dict)
    modes: Mapping[AttachPoint, str | None] = field(default_factory=dict)
    observed: Mapping[AttachPoint, AttachPointState] = field(default_factory=dict)
    lost: Mapping[AttachPoint, LostPoint] = field(default_factory=dict)
    suspended: set[str] = field(default_factory=set)  # by `nfctl suspend --nf`
    spec_suspended: set[str] = field(default_factory=set)  # by spec.suspend in Git


def nf_state(
    name: str, rt: NFRuntime, applied: Applied | None, suspended: bool, lost: bool
) -> NFState:
    if suspended:
        return NFState.SUSPENDED
    if rt.in_git and not rt.selected:
        return NFState.NOT_SELECTED
    if rt.error is not None:
        return NFState.FAILED
    if applied is None:
        return NFState.PENDING
    if rt.attach_errors or lost:
        return NFState.DEGRADED
    return NFState.APPLIED


def nf_statuses(view: StatusInputs) -> list[NFStatus]:
    names = set(view.applied) | {n for n, rt in view.runtime.items() if rt.in_git or rt.error}
    out = []
    for name in sorted(n for n in names if not n.startswith("<")):
        rt = view.runtime.get(name) or NFRuntime()
        applied = view.applied.get(name)
        loaded = view.loaded.get(name) if applied else None
        points = [p for p, entries in view.target.items() if any(e.nf == name for e in entries)]
        lost = {p: gone for p, gone in view.lost.items() if name in gone.nfs}
        spec_suspend = name in view.spec_suspended or bool(applied and applied.nf.spec.suspend)
        state = nf_state(name, rt, applied, name in view.suspended or spec_suspend, bool(lost))
        status = NFStatus(
            name=name,
            state=state,
            version=applied.record.version if applied else None,
            revision=applied.record.revision if applied else None,
            build_hash=applied.build_hash if applied else None,
            program_id=loaded.prog_id if loaded else None,
            program_tag=loaded.tag if loaded else None,
            hook=applied.nf.spec.attach.hook.value if applied else None,
            attach_points=[
                AttachPointStatus(
                    interface=p.ifname,
                    hook=p.hook.value,
                    mode=view.modes.get(p),
                    error=rt.attach_errors.get(p),
                    **_kernel_ids(view.observed.get(p)),
                )
                for p in points
            ]
            + [
                AttachPointStatus(
                    interface=p.ifname,
                    hook=p.hook.value,
                    error=f"interface {p.ifname} vanished",
                    missing_since=gone.since,
                )
                for p, gone in sorted(lost.items())
            ],
            maps=map_statuses(applied, loaded, view.map_counts.get(name, {})),
            last_error=rt.error,
            suspended=state is NFState.SUSPENDED,
            applied_at=applied.record.applied_at if applied else None,
            mode=applied.nf.spec.mode.value if applied else None,
            verdicts=view.verdicts.get(name),
        )
        if rt.attach_errors and not status.last_error:
            first = next(iter(rt.attach_errors.items()))
            status.last_error = ErrorInfo(message=f"{first[0]}: {first[1]}")
        elif lost and not status.last_error:
            point = min(lost)
            status.last_error = ErrorInfo(message=f"{point}: interface {point.ifname} vanished")
        out.append(status)
    return out


def map_statuses(
    applied: Applied | None, loaded: LoadedBuild | None, counts: Mapping[str, int]
) -> list[MapStatus]:
    if loaded is None or applied is None:
        return []
    managed = {m for m, spec in applied.nf.spec.maps.items() if spec.managed}
    return [
        MapStatus(
            name=info.name,
            type=info.map_type,
            entries=counts.get(info.name, -1),
            max_entries=info.max_entries,
            managed=info.name in managed,
        )
        for info in loaded.record.maps
    ]


@dataclass(frozen=True)
class Outlook:
    """The reconciler's standing beyond its NFs: why it cannot go on, if it cannot."""

    stalled: tuple[str, str] | None = None  # (reason, message)
    source_error: str | None = None
    unparsed: tuple[str, ...] = ()  # manifest paths that name no NF and do not parse


def settle(
    status: NodeStatus,
    functions: list[NFStatus],
    outlook: Outlook,
    revision: str | None,
    view: StatusInputs,
) -> None:
    """The conditions at the end of a pass. revision: the one this pass reconciled to;
    it becomes lastAppliedRevision once every NF runs it."""
    failed = [
        s for s in functions if s.state in (NFState.FAILED, NFState.DEGRADED, NFState.PENDING)
    ]
    if revision is not None and not failed and not outlook.unparsed and outlook.stalled is None:
        status.last_applied_revision = revision
    status.set_condition(ConditionType.RECONCILING, False, "Idle", "")
    attached_condition(status, view.lost)
    shadowed_condition(status, view.observed, view.target)
    if outlook.stalled is not None:
        reason, message = outlook.stalled
        status.set_condition(ConditionType.STALLED, True, reason, message)
        status.set_condition(ConditionType.READY, False, reason, message)
    elif outlook.source_error is not None:
        source_unavailable(status, outlook.source_error)
    elif failed or outlook.unparsed:
        names = ", ".join(
            [f"{s.name} ({s.state.value})" for s in failed]
            + [f"{path} (unreadable)" for path in outlook.unparsed]
        )
        status.set_condition(ConditionType.STALLED, False, "ReconciliationFailed", "")
        status.set_condition(ConditionType.READY, False, "ReconciliationFailed", names)
    else:
        status.set_condition(ConditionType.STALLED, False, "Succeeded", "")
        rev = (revision or status.last_applied_revision or "")[:12]
        status.set_condition(
            ConditionType.READY, True, "ReconciliationSucceeded", f"applied revision {rev}"
        )


def attached_condition(status: NodeStatus, lost: Mapping[AttachPoint, LostPoint]) -> None:
    if not lost:
        status.set_condition(ConditionType.ATTACHED, True, "AllAttached", "")
        return
    missing = "; ".join(
        f"{point} ({', '.join(gone.nfs)}) since "
        + time.strftime("%H:%M:%S", time.localtime(gone.since))
        for point, gone in sorted(lost.items())
    )
    status.set_condition(
        ConditionType.ATTACHED, False, "InterfaceMissing", f"interface gone: {missing}"
    )


def shadowed_condition(
    status: NodeStatus,
    observed: Mapping[AttachPoint, AttachPointState],
    target: Mapping[AttachPoint, list[ChainEntry]],
) -> None:
    shadowed = [
        f"{p}: {', '.join(_shadow_names(s))} can end processing before nfctl's chain"
        for p, s in sorted(observed.items())
        if s.shadowed_by and p in target
    ]
    if shadowed:
        status.set_condition(
            ConditionType.SHADOWED, True, "ForeignProgramAhead", "; ".join(shadowed)
        )
    else:
        status.set_condition(ConditionType.SHADOWED, False, "ChainRunsFirst", "")


def source_unavailable(status: NodeStatus, error: str) -> None:
    status.set_condition(ConditionType.STALLED, False, "SourceUnavailable", "")
    status.set_condition(
        ConditionType.READY,
        False,
        "SourceUnavailable",
        f"{error}; datapath keeps {status.last_applied_revision or 'nothing'}",
    )


def _shadow_names(state: AttachPointState) -> list[str]:
    return [f"{p.name} (id {p.prog_id})" for p in state.shadowed_by]


def _kernel_ids(state: AttachPointState | None) -> dict[str, Any]:
    if state is None:
        return {}
    ours = state.ours and state.hook_prog is not None
    return {
        "dispatcherId": state.hook_prog.prog_id if ours and state.hook_prog else None,
        "linkId": state.link_id if ours else None,
        "shadowedBy": _shadow_names(state),
    }


def _verdicts(counts: dict[str, int]) -> Verdicts:
    return Verdicts(
        passed=counts["pass"],
        dropped=counts["drop"],
        redirected=counts["redirect"],
        other=counts["other"],
    )


def verdict_totals(counts: Mapping[CounterKey, VerdictCounts]) -> dict[str, VerdictTotals]:
    """Per NF, its counters summed over attach points."""
    summed: dict[str, VerdictCounts] = {}
    for key, value in counts.items():
        summed[key.nf] = summed.get(key.nf, VerdictCounts.zero()).add(value)
    return {
        nf: VerdictTotals(
            enforce=_verdicts(c.enforce), monitor=_verdicts(c.monitor), chain_errors=c.errors
        )
        for nf, c in summed.items()
    }
