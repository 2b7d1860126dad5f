"""Agent status/events (pydantic) <-> protobuf messages."""

from __future__ import annotations

from nfctl.agent.status import Event, NodeStatus
from nfctl.api.nfctl.v1 import nfctl_pb2 as pb


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
    for nf in status.functions:
        fn = msg.functions.add(
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
            for mode, counts in (
                ("enforce", nf.verdicts.enforce),
                ("monitor", nf.verdicts.monitor),
            ):
                getattr(fn.verdicts, mode).CopyFrom(pb.Verdicts(**counts.model_dump()))
            fn.verdicts.chain_errors = nf.verdicts.chain_errors
        for ap in nf.attach_points:
            fn.attach_points.add(
                interface=ap.interface,
                hook=ap.hook,
                mode=ap.mode or "",
                error=ap.error or "",
                missing_since=ap.missing_since or 0.0,
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
                    log=(nf.last_error.log or "")[-8000:],
                    revision=nf.last_error.revision or "",
                )
            )
    return msg


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


def condition(status: pb.NodeStatus, kind: str) -> pb.Condition | None:
    return next((c for c in status.conditions if c.type == kind), None)


def is_ready(status: pb.NodeStatus) -> bool:
    cond = condition(status, "Ready")
    return bool(cond and cond.status)
