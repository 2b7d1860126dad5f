"""The agent's status model lives in the wire contract (nfctl/wire/status.py): the agent,
the controller and the CLI share it. Re-exported here for the agent's modules."""

from nfctl.wire.status import (
    AttachPointStatus,
    Condition,
    ConditionType,
    ErrorInfo,
    Event,
    EventType,
    MapStatus,
    NFState,
    NFStatus,
    NodeStatus,
    ReconcileTimings,
    SourceStatus,
    Verdicts,
    VerdictTotals,
)

__all__ = [
    "AttachPointStatus",
    "Condition",
    "ConditionType",
    "ErrorInfo",
    "Event",
    "EventType",
    "MapStatus",
    "NFState",
    "NFStatus",
    "NodeStatus",
    "ReconcileTimings",
    "SourceStatus",
    "VerdictTotals",
    "Verdicts",
]
