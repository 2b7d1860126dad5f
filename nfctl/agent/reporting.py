"""The agent's status in the Flux vocabulary: conditions, per-NF state, map statistics,
published to the state dir, metrics and listeners (the controller link). Mixed into the
Reconciler, whose state it reads."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nfctl.agent.attachments import AttachmentTracker
from nfctl.agent.plan import AttachPoint, ChainEntry, Placement
from nfctl.agent.status import (
    AttachPointStatus,
    ConditionType,
    ErrorInfo,
    Event,
    MapStatus,
    NFState,
    NFStatus,
    NodeStatus,
    Verdicts,
    VerdictTotals,
)
from nfctl.agent.store import AppliedNF, StateStore
from nfctl.bpf.syscall import BpfMap
from nfctl.datapath.counters import CounterKey, VerdictCounts
from nfctl.datapath.datapath import Datapath, LoadedBuild
from nfctl.datapath.observe import AttachPointState

if TYPE_CHECKING:
    from nfctl.agent.reconciler import Metrics
    from nfctl.agent.source import Revision

log = logging.getLogger(__name__)


@dataclass
class NFRuntime:
    """What this process knows about an NF beyond the persisted applied state."""

    error: ErrorInfo | None = None
    error_key: str = ""
    attach_errors: dict[AttachPoint, str] = field(default_factory=dict)
    selected: bool = True
    in_git: bool = False


class StatusReporting:
    # provided by the Reconciler
    status: NodeStatus
    store: StateStore
    datapath: Datapath
    metrics: Metrics | None
    applied: dict[str, AppliedNF]
    runtime: dict[str, NFRuntime]
    unparsed: dict[str, ErrorInfo]
    stalled: tuple[str, str] | None
    source_error: str | None
    status_listeners: list[Callable[[NodeStatus], None]]
    _modes: dict[AttachPoint, str | None]
    _observed: dict[AttachPoint, AttachPointState]
    _target: dict[AttachPoint, list[ChainEntry]]
    _spec_suspended: set[str]
    attachments: AttachmentTracker

    def event(
        self,
        reason: str,
        message: str,
        nf: str | None = None,
        warning: bool = False,
        revision: Revision | None = None,
    ) -> Event:
        raise NotImplementedError

    def _placements(self) -> list[Placement]:
        raise NotImplementedError

    def _nf(self, name: str) -> NFRuntime:
        return self.runtime.setdefault(name, NFRuntime())

    def _loaded(self, name: str) -> LoadedBuild | None:
        raise NotImplementedError

    def _track_attachments(
        self, target: dict[AttachPoint, list[ChainEntry]], present: set[str]
    ) -> None:
        """Events for attach points whose interface vanished or came back."""
        now = time.time()
        lost, restored = self.attachments.update(
            self._target, target, present, self._placements(), now
        )
        for point, gone in lost:
            self.event(
                "InterfaceLost",
                f"{point}: interface {point.ifname} vanished; "
                f"{', '.join(gone.nfs)} no longer attached there",
                nf=gone.nfs[0] if len(gone.nfs) == 1 else None,
                warning=True,
            )
        for point, gone in restored:
            self.event(
                "InterfaceRestored",
                f"{point}: interface {point.ifname} is back; {', '.join(gone.nfs)} attached "
                f"again after {now - gone.since:.1f} s",
                nf=gone.nfs[0] if len(gone.nfs) == 1 else None,
            )

    def _finish(self, revision: Revision | None) -> bool:
        status = self.status
        failed = [
            s
            for s in self.build_nf_statuses()
            if s.state in (NFState.FAILED, NFState.DEGRADED, NFState.PENDING)
        ]
        all_applied = not failed and not self.unparsed
        if revision is not None and all_applied and self.stalled is None:
            status.last_applied_revision = revision.sha
        status.set_condition(ConditionType.RECONCILING, False, "Idle", "")
        self._attached_condition()
        self._shadowed_condition()
        if self.stalled is not None:
            reason, message = self.stalled
            status.set_condition(ConditionType.STALLED, True, reason, message)
            status.set_condition(ConditionType.READY, False, reason, message)
        elif self.source_error is not None:
            self._source_unavailable_conditions()
        elif failed or self.unparsed:
            names = ", ".join(
                [f"{s.name} ({s.state.value})" for s in failed]
                + [f"{path} (unreadable)" for path in self.unparsed]
            )
            status.set_condition(ConditionType.STALLED, False, "ReconciliationFailed", "")
            status.set_condition(ConditionType.READY, False, "ReconciliationFailed", names)
        else:
            status.set_condition(ConditionType.STALLED, False, "Succeeded", "")
            rev = revision.short if revision else (status.last_applied_revision or "")[:12]
            status.set_condition(
                ConditionType.READY, True, "ReconciliationSucceeded", f"applied revision {rev}"
            )
        self._publish()
        return status.ready

    def _attached_condition(self) -> None:
        lost = self.attachments.lost
        if not lost:
            self.status.set_condition(ConditionType.ATTACHED, True, "AllAttached", "")
            return
        missing = "; ".join(
            f"{point} ({', '.join(gone.nfs)}) since "
            + time.strftime("%H:%M:%S", time.localtime(gone.since))
            for point, gone in sorted(lost.items())
        )
        self.status.set_condition(
            ConditionType.ATTACHED, False, "InterfaceMissing", f"interface gone: {missing}"
        )

    def _shadowed_condition(self) -> None:
        shadowed = [
            f"{p}: {', '.join(_shadow_names(s))} can end processing before nfctl's chain"
            for p, s in sorted(self._observed.items())
            if s.shadowed_by and p in self._target
        ]
        if shadowed:
            self.status.set_condition(
                ConditionType.SHADOWED, True, "ForeignProgramAhead", "; ".join(shadowed)
            )
        else:
            self.status.set_condition(ConditionType.SHADOWED, False, "ChainRunsFirst", "")

    def _source_unavailable_conditions(self) -> None:
        status = self.status
        status.set_condition(ConditionType.STALLED, False, "SourceUnavailable", "")
        status.set_condition(
            ConditionType.READY,
            False,
            "SourceUnavailable",
            f"{self.source_error}; datapath keeps {status.last_applied_revision or 'nothing'}",
        )

    def build_nf_statuses(self) -> list[NFStatus]:
        suspensions = self.store.suspensions()
        names = set(self.applied) | {n for n, rt in self.runtime.items() if rt.in_git or rt.error}
        names = {n for n in names if not n.startswith("<")}
        statuses = []
        modes = self._modes
        target = self._target
        verdicts = verdict_totals(self.datapath.verdict_counts())
        for name in sorted(names):
            rt = self._nf(name)
            applied = self.applied.get(name)
            loaded = self._loaded(name) if applied else None
            points = [p for p, entries in target.items() if any(e.nf == name for e in entries)]
            lost = self.attachments.of(name)
            spec_suspend = name in self._spec_suspended or bool(
                applied and applied.spec.get("spec", {}).get("suspend")
            )
            if name in suspensions.nfs or spec_suspend:
                state = NFState.SUSPENDED
            elif rt.in_git and not rt.selected:
                state = NFState.NOT_SELECTED
            elif rt.error is not None:
                state = NFState.FAILED
            elif applied is None:
                state = NFState.PENDING
            elif rt.attach_errors or lost:
                state = NFState.DEGRADED
            else:
                state = NFState.APPLIED
            status = NFStatus(
                name=name,
                state=state,
                version=applied.version if applied else None,
                revision=applied.revision if applied else None,
                build_hash=applied.build_hash if applied else None,
                program_id=loaded.prog_id if loaded else None,
                program_tag=loaded.tag if loaded else None,
                hook=applied.spec.get("spec", {}).get("attach", {}).get("hook")
                if applied
                else None,
                attach_points=[
                    AttachPointStatus(
                        interface=p.ifname,
                        hook=p.hook.value,
                        mode=modes.get(p),
                        error=rt.attach_errors.get(p),
                        **_kernel_ids(self._observed.get(p)),
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
                maps=self._map_statuses(name, loaded, applied),
                last_error=rt.error,
                suspended=state is NFState.SUSPENDED,
                applied_at=applied.applied_at if applied else None,
                mode=applied.spec.get("spec", {}).get("mode", "enforce") if applied else None,
                verdicts=verdicts.get(name),
            )
            if rt.attach_errors and not status.last_error:
                first = next(iter(rt.attach_errors.items()))
                status.last_error = ErrorInfo(message=f"{first[0]}: {first[1]}")
            elif lost and not status.last_error:
                point = min(lost)
                status.last_error = ErrorInfo(message=f"{point}: interface {point.ifname} vanished")
            statuses.append(status)
        return statuses

    def _map_statuses(
        self, name: str, loaded: LoadedBuild | None, applied: AppliedNF | None
    ) -> list[MapStatus]:
        if loaded is None or applied is None:
            return []
        managed = {
            m
            for m, spec in applied.spec.get("spec", {}).get("maps", {}).items()
            if spec.get("managed")
        }
        out = []
        for info in loaded.record.maps:
            pin = loaded.map_pin(self.datapath.paths, info.name)
            try:
                with BpfMap.from_pin(str(pin)) as bmap:
                    count = bmap.count()
            except OSError:
                count = -1
            out.append(
                MapStatus(
                    name=info.name,
                    type=info.map_type,
                    entries=count,
                    max_entries=info.max_entries,
                    managed=info.name in managed,
                )
            )
        return out

    def _publish(self) -> None:
        self.status.functions = self.build_nf_statuses()
        self.status.observed_at = time.time()
        self.store.save_status(self.status)
        if self.metrics:
            self.metrics.update(self.status)
        for listener in self.status_listeners:
            try:
                listener(self.status)
            except Exception:
                log.exception("status listener failed")


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


def verdict_totals(counts: dict[CounterKey, VerdictCounts]) -> dict[str, VerdictTotals]:
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
