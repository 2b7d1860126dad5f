"""Node status and events, in the Flux vocabulary (conditions Ready / Reconciling /
Stalled; lastAppliedRevision / lastAttemptedRevision): what an agent writes to its state
dir, sends to the controller (nfctl/wire/convert.py) and what the CLI renders."""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    def dump(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, mode="json")


class ConditionType(StrEnum):
    READY = "Ready"
    RECONCILING = "Reconciling"
    STALLED = "Stalled"
    ATTACHED = "Attached"  # every attach point an NF ran on still exists
    SHADOWED = "Shadowed"  # another tool's program can end processing before our chain
    APPROVED = "Approved"  # under a rollout policy: runs the revision the controller approved


class Condition(_Model):
    type: ConditionType
    status: bool
    reason: str
    message: str = ""
    last_transition_time: float = Field(default_factory=time.time, alias="lastTransitionTime")


class NFState(StrEnum):
    APPLIED = "Applied"  # the desired version runs on every matched attach point
    DEGRADED = "Degraded"  # runs, but not everywhere (an attach point failed)
    FAILED = "Failed"  # the new version failed; the last good one (if any) still runs
    PENDING = "Pending"  # selected but nothing applied yet
    SUSPENDED = "Suspended"  # frozen by an operator or spec.suspend
    NOT_SELECTED = "NotSelected"  # nodeSelector does not match this node


class ErrorInfo(_Model):
    message: str
    file: str | None = None
    line: int | None = None
    log: str | None = None
    revision: str | None = None
    reason: str | None = None  # e.g. TestsFailed: the NF's tests.yaml refused the build


class AttachPointStatus(_Model):
    interface: str
    hook: str
    mode: str | None = None
    error: str | None = None
    missing_since: float | None = Field(default=None, alias="missingSince")  # interface gone
    # what `bpftool net show` / `bpftool link` print, to match them to this attach point
    dispatcher_id: int | None = Field(default=None, alias="dispatcherId")
    link_id: int | None = Field(default=None, alias="linkId")
    shadowed_by: list[str] = Field(default_factory=list, alias="shadowedBy")


class MapStatus(_Model):
    name: str
    type: str
    entries: int
    max_entries: int = Field(alias="maxEntries")
    managed: bool = False


class Verdicts(_Model):
    """Packets per verdict: what the NF returned (in monitor mode: would have done)."""

    passed: int = 0
    dropped: int = 0
    redirected: int = 0
    other: int = 0


class VerdictTotals(_Model):
    """An NF's verdict counters summed over its attach points, monotonic across versions."""

    enforce: Verdicts = Field(default_factory=Verdicts)
    monitor: Verdicts = Field(default_factory=Verdicts)
    chain_errors: int = Field(default=0, alias="chainErrors")


class NFStatus(_Model):
    name: str
    state: NFState
    version: str | None = None
    revision: str | None = None
    build_hash: str | None = Field(default=None, alias="buildHash")
    program_id: int | None = Field(default=None, alias="programId")
    program_tag: str | None = Field(default=None, alias="programTag")
    hook: str | None = None
    attach_points: list[AttachPointStatus] = Field(default_factory=list, alias="attachPoints")
    maps: list[MapStatus] = Field(default_factory=list)
    last_error: ErrorInfo | None = Field(default=None, alias="lastError")
    suspended: bool = False
    applied_at: float | None = Field(default=None, alias="appliedAt")
    mode: str | None = None  # enforce | monitor (spec.mode of the applied version)
    verdicts: VerdictTotals | None = None


class SourceStatus(_Model):
    url: str
    ref: str
    path: str
    last_fetched_revision: str | None = Field(default=None, alias="lastFetchedRevision")
    last_fetch_error: str | None = Field(default=None, alias="lastFetchError")


class ReconcileTimings(_Model):
    """Where the last full reconcile spent its time (seconds)."""

    started_at: float = Field(alias="startedAt")
    fetch: float = 0.0
    build: float = 0.0
    apply: float = 0.0
    total: float = 0.0
    revision: str | None = None


class NodeStatus(_Model):
    """What a node reports (status.json, `nfctl status`, the controller): revisions applied
    and attempted, Flux-style conditions, and each NF's state, program and attach points."""

    node: str
    labels: dict[str, str] = Field(default_factory=dict)
    kernel: str = ""
    agent_version: str = Field(default="", alias="agentVersion")
    source: SourceStatus | None = None
    last_applied_revision: str | None = Field(default=None, alias="lastAppliedRevision")
    last_attempted_revision: str | None = Field(default=None, alias="lastAttemptedRevision")
    # under a RolloutPolicy: the revision the controller approved for this node
    approved_revision: str | None = Field(default=None, alias="approvedRevision")
    conditions: list[Condition] = Field(default_factory=list)
    functions: list[NFStatus] = Field(default_factory=list)
    suspended: bool = False
    drift_mode: str = Field(default="correct", alias="driftMode")
    last_reconcile: ReconcileTimings | None = Field(default=None, alias="lastReconcile")
    observed_at: float = Field(default_factory=time.time, alias="observedAt")

    def condition(self, kind: ConditionType) -> Condition | None:
        return next((c for c in self.conditions if c.type is kind), None)

    def set_condition(
        self, kind: ConditionType, status: bool, reason: str, message: str = ""
    ) -> None:
        current = self.condition(kind)
        if current is not None and current.status == status:
            current.reason, current.message = reason, message
            return
        self.conditions = [c for c in self.conditions if c.type is not kind]
        self.conditions.append(Condition(type=kind, status=status, reason=reason, message=message))
        self.conditions.sort(key=lambda c: c.type.value)

    @property
    def ready(self) -> bool:
        cond = self.condition(ConditionType.READY)
        return bool(cond and cond.status)


class EventType(StrEnum):
    NORMAL = "Normal"
    WARNING = "Warning"


class Event(_Model):
    time: float = Field(default_factory=time.time)
    type: EventType = EventType.NORMAL
    reason: str  # Applied, Failed, Pruned, DriftCorrected, DriftDetected, SourceUnavailable, ...
    message: str
    node: str = ""
    nf: str | None = None
    revision: str | None = None
    author: str | None = None
    commit_time: float | None = Field(default=None, alias="commitTime")
    sequence: int = 0
