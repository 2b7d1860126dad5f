"""Summarize: what a pass did, as notices (events to record) in the order it happened.
Pure; drift already reported is remembered by the caller and not reported again."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from nfctl.agent.attachments import AttachmentChanges
from nfctl.agent.reconcile.apply import ApplyResult, Step
from nfctl.agent.reconcile.plan import EntryIntent, Plan
from nfctl.agent.source import Revision
from nfctl.wire.status import ErrorInfo


@dataclass(frozen=True)
class Notice:
    reason: str
    message: str
    nf: str | None = None
    warning: bool = False
    failure: ErrorInfo | None = None  # recorded as the NF's error (its event deduplicated)
    drift: tuple[str, bool] | None = None  # (map | chain, corrected) for the drift metric
    revision: Revision | None = None  # the commit it is about, when not the current one


def summarize(
    plan: Plan,
    result: ApplyResult,
    changes: Iterable[tuple[str, str]],
    reported: set[str],
) -> list[Notice]:
    """changes: (nf, message) for builds and manifests accepted this pass. reported: drift
    keys already reported (updated here)."""
    out: list[Notice] = []
    applied: list[tuple[str, str]] = list(changes)
    entry_changes: list[tuple[str, str]] = []

    def report_once(key: str, nf: str | None, drift: tuple[str, bool] | None) -> None:
        if key not in reported:
            reported.add(key)
            out.append(Notice("DriftDetected", key, nf, warning=True, drift=drift))

    entry_steps = (Step.ENTRIES_WRITTEN, Step.ENTRIES_DIFFER, Step.ENTRIES_FAILED)
    for o in (o for o in result.outcomes if o.step in entry_steps):
        assert o.nf is not None
        if o.step is Step.ENTRIES_FAILED:
            out.append(
                Notice(
                    "Failed", "", o.nf, failure=ErrorInfo(message=f"map {o.subject}: {o.detail}")
                )
            )
        elif o.step is Step.ENTRIES_DIFFER:
            report_once(f"{o.nf}/{o.subject} entries differ from Git", o.nf, None)
        elif o.intent is EntryIntent.APPLY:
            entry_changes.append((o.nf, f"map {o.subject}: {o.detail}"))
        else:
            out.append(
                Notice(
                    "DriftCorrected",
                    f"map {o.subject}: {o.detail} restored to match Git",
                    o.nf,
                    warning=True,
                    drift=("map", True),
                )
            )
    for point, problems in plan.drift_left.items():
        for problem in problems:
            report_once(f"{point}: {problem}", None, ("chain", False))
    for o in result.outcomes:
        if o.step is Step.CHAIN_SET:
            out.extend(
                Notice("DriftCorrected", f"{o.subject}: {d}", warning=True, drift=("chain", True))
                for d in o.drift
            )
        elif o.step is Step.MAPS_REPLACED:
            out.append(Notice("MapsReplaced", f"incompatible maps replaced: {o.detail}", o.nf))
        elif o.step is Step.MAPS_FAILED:
            error = ErrorInfo(message=f"committing new maps failed: {o.detail}")
            out.append(Notice("Failed", "", o.nf, failure=error))
        elif o.step is Step.PRUNED:
            out.append(
                Notice("Pruned", f"removed from Git; detached and unpinned (was {o.detail})", o.nf)
            )
    out.extend(Notice("Applied", message, nf) for nf, message in applied + entry_changes)
    return out


def attachment_notices(changes: AttachmentChanges, now: float | None = None) -> list[Notice]:
    """Attach points whose interface vanished or came back."""
    now = time.time() if now is None else now
    out = [
        Notice(
            "InterfaceLost",
            f"{point}: interface {point.ifname} vanished; "
            f"{', '.join(gone.nfs)} no longer attached there",
            gone.nfs[0] if len(gone.nfs) == 1 else None,
            warning=True,
        )
        for point, gone in changes.lost
    ]
    out += [
        Notice(
            "InterfaceRestored",
            f"{point}: interface {point.ifname} is back; {', '.join(gone.nfs)} attached "
            f"again after {now - gone.since:.1f} s",
            gone.nfs[0] if len(gone.nfs) == 1 else None,
        )
        for point, gone in changes.restored
    ]
    out += [
        Notice(
            "InterfaceRemoved",
            f"{point}: interface {point.ifname} vanished; {', '.join(nfs)} ran there and "
            "follow the interfaces that exist (onInterfaceRemoved: forget)",
            nfs[0] if len(nfs) == 1 else None,
        )
        for point, nfs in changes.removed
    ]
    return out
