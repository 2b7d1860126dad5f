"""The status model (nfctl/wire/status.py) <-> protobuf messages, both ways.

Proto3 has no "unset" for scalars: an empty string or a zero on the wire is None in the
model (no revision, no program id, no line), and an unset message field is None too. The
one lossy step is deliberate: a compiler or verifier log is cut to its last LOG_LIMIT
characters on the way out (a status is sent often; the full log stays on the node)."""

from __future__ import annotations

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
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

LOG_LIMIT = 8000


# -- model -> proto ------------------------------------------------------------------------
def status_to_proto(status: NodeStatus) -> pb.NodeStatus:
    msg = pb.NodeStatus(
        node=status.node,
        labels=status.labels,
        kernel=status.kernel,
        agent_version=status.agent_version,
        last_applied_revision=status.last_applied_revision or "",
        last_attempted_revision=status.last_attempted_revision or "",
        approved_revision=status.approved_revision or "",
        suspended=status.suspended,
        drift_mode=status.drift_mode,
        observed_at=status.observed_at,
    )
    if status.last_reconcile is not None:
        timings = status.last_reconcile
        msg.last_reconcile.CopyFrom(
            pb.ReconcileTimings(
                started_at=timings.started_at,
                fetch_seconds=timings.fetch,
                build_seconds=timings.build,
                apply_seconds=timings.apply,
                total_seconds=timings.total,
                revision=timings.revision or "",
            )
        )
    if status.source is not None:
        msg.source.CopyFrom(
            pb.SourceStatus(
                url=status.source.url,
                ref=status.source.ref,
                path=status.source.path,
                last_fetched_revision=status.source.last_fetched_revision or "",
                last_fetch_error=status.source.last_fetch_error or "",
            )
        )
    for cond in status.conditions:
        msg.conditions.add(
            type=cond.type.value,
            status=cond.status,
            reason=cond.reason,
            message=cond.message,
            last_transition_time=cond.last_transition_time,
        )
    msg.functions.extend(function_to_proto(nf) for nf in status.functions)
    return msg


def function_to_proto(nf: NFStatus) -> pb.FunctionStatus:
    fn = pb.FunctionStatus(
        name=nf.name,
        state=nf.state.value,
        version=nf.version or "",
        revision=nf.revision or "",
        build_hash=nf.build_hash or "",
        program_id=nf.program_id or 0,
        program_tag=nf.program_tag or "",
        hook=nf.hook or "",
        suspended=nf.suspended,
        applied_at=nf.applied_at or 0.0,
        mode=nf.mode or "",
    )
    if nf.verdicts is not None:
        fn.verdicts.enforce.CopyFrom(pb.Verdicts(**nf.verdicts.enforce.model_dump()))
        fn.verdicts.monitor.CopyFrom(pb.Verdicts(**nf.verdicts.monitor.model_dump()))
        fn.verdicts.chain_errors = nf.verdicts.chain_errors
    for ap in nf.attach_points:
        fn.attach_points.add(
            interface=ap.interface,
            hook=ap.hook,
            mode=ap.mode or "",
            error=ap.error or "",
            missing_since=ap.missing_since or 0.0,
            dispatcher_id=ap.dispatcher_id or 0,
            link_id=ap.link_id or 0,
            shadowed_by=ap.shadowed_by,
        )
    for m in nf.maps:
        fn.maps.add(
            name=m.name,
            type=m.type,
            entries=m.entries,
            max_entries=m.max_entries,
            managed=m.managed,
        )
    if nf.last_error is not None:
        fn.last_error.CopyFrom(
            pb.ErrorInfo(
                message=nf.last_error.message,
                file=nf.last_error.file or "",
                line=nf.last_error.line or 0,
                log=(nf.last_error.log or "")[-LOG_LIMIT:],
                revision=nf.last_error.revision or "",
                reason=nf.last_error.reason or "",
            )
        )
    return fn


def event_to_proto(event: Event) -> pb.Event:
    return pb.Event(
        time=event.time,
        type=event.type.value,
        reason=event.reason,
        message=event.message,
        node=event.node,
        nf=event.nf or "",
        revision=event.revision or "",
        author=event.author or "",
        commit_time=event.commit_time or 0.0,
        sequence=event.sequence,
    )


# -- proto -> model ------------------------------------------------------------------------
def status_from_proto(msg: pb.NodeStatus) -> NodeStatus:
    """The model of a status the controller holds. Raises ValueError for a state or
    condition type this version does not know (a newer agent)."""
    return NodeStatus(
        node=msg.node,
        labels=dict(msg.labels),
        kernel=msg.kernel,
        agent_version=msg.agent_version,
        source=_source(msg.source) if msg.HasField("source") else None,
        last_applied_revision=msg.last_applied_revision or None,
        last_attempted_revision=msg.last_attempted_revision or None,
        approved_revision=msg.approved_revision or None,
        conditions=[
            Condition(
                type=ConditionType(c.type),
                status=c.status,
                reason=c.reason,
                message=c.message,
                last_transition_time=c.last_transition_time,
            )
            for c in msg.conditions
        ],
        functions=[function_from_proto(f) for f in msg.functions],
        suspended=msg.suspended,
        drift_mode=msg.drift_mode,
        last_reconcile=_timings(msg.last_reconcile) if msg.HasField("last_reconcile") else None,
        observed_at=msg.observed_at,
    )


def function_from_proto(fn: pb.FunctionStatus) -> NFStatus:
    return NFStatus(
        name=fn.name,
        state=NFState(fn.state),
        version=fn.version or None,
        revision=fn.revision or None,
        build_hash=fn.build_hash or None,
        program_id=fn.program_id or None,
        program_tag=fn.program_tag or None,
        hook=fn.hook or None,
        attach_points=[
            AttachPointStatus(
                interface=ap.interface,
                hook=ap.hook,
                mode=ap.mode or None,
                error=ap.error or None,
                missing_since=ap.missing_since or None,
                dispatcher_id=ap.dispatcher_id or None,
                link_id=ap.link_id or None,
                shadowed_by=list(ap.shadowed_by),
            )
            for ap in fn.attach_points
        ],
        maps=[
            MapStatus(
                name=m.name,
                type=m.type,
                entries=m.entries,
                max_entries=m.max_entries,
                managed=m.managed,
            )
            for m in fn.maps
        ],
        last_error=_error(fn.last_error) if fn.HasField("last_error") else None,
        suspended=fn.suspended,
        applied_at=fn.applied_at or None,
        mode=fn.mode or None,
        verdicts=_verdict_totals(fn.verdicts) if fn.HasField("verdicts") else None,
    )


def event_from_proto(msg: pb.Event) -> Event:
    return Event(
        time=msg.time,
        type=EventType(msg.type),
        reason=msg.reason,
        message=msg.message,
        node=msg.node,
        nf=msg.nf or None,
        revision=msg.revision or None,
        author=msg.author or None,
        commit_time=msg.commit_time or None,
        sequence=msg.sequence,
    )


def _source(msg: pb.SourceStatus) -> SourceStatus:
    return SourceStatus(
        url=msg.url,
        ref=msg.ref,
        path=msg.path,
        last_fetched_revision=msg.last_fetched_revision or None,
        last_fetch_error=msg.last_fetch_error or None,
    )


def _timings(msg: pb.ReconcileTimings) -> ReconcileTimings:
    return ReconcileTimings(
        started_at=msg.started_at,
        fetch=msg.fetch_seconds,
        build=msg.build_seconds,
        apply=msg.apply_seconds,
        total=msg.total_seconds,
        revision=msg.revision or None,
    )


def _error(msg: pb.ErrorInfo) -> ErrorInfo:
    return ErrorInfo(
        message=msg.message,
        file=msg.file or None,
        line=msg.line or None,
        log=msg.log or None,
        revision=msg.revision or None,
        reason=msg.reason or None,
    )


def _verdicts(msg: pb.Verdicts) -> Verdicts:
    return Verdicts(
        passed=msg.passed, dropped=msg.dropped, redirected=msg.redirected, other=msg.other
    )


def _verdict_totals(msg: pb.VerdictTotals) -> VerdictTotals:
    return VerdictTotals(
        enforce=_verdicts(msg.enforce),
        monitor=_verdicts(msg.monitor),
        chain_errors=msg.chain_errors,
    )


# -- questions asked of a proto status -------------------------------------------------------
def condition(status: pb.NodeStatus, kind: str) -> pb.Condition | None:
    return next((c for c in status.conditions if c.type == kind), None)


def is_ready(status: pb.NodeStatus) -> bool:
    cond = condition(status, "Ready")
    return bool(cond and cond.status)
