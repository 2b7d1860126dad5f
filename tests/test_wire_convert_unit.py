"""The wire contract: a status or event survives model -> proto -> bytes -> proto -> model
unchanged, every field included, so `nfctl get node` shows what `nfctl status` shows."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.wire.convert import (
    LOG_LIMIT,
    event_from_proto,
    event_to_proto,
    is_ready,
    status_from_proto,
    status_to_proto,
)
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

NFCTL = Path(__file__).resolve().parents[1] / "nfctl"


def full_status() -> NodeStatus:
    """Every field set to a value that is not its default."""
    return NodeStatus(
        node="edge-1",
        labels={"role": "edge", "zone": "b"},
        kernel="6.18.0",
        agent_version="0.9.0",
        source=SourceStatus(
            url="https://git.example/nfs.git",
            ref="main",
            path="nfs",
            last_fetched_revision="a" * 40,
            last_fetch_error="timeout after 10 s",
        ),
        last_applied_revision="b" * 40,
        last_attempted_revision="c" * 40,
        approved_revision="b" * 40,
        conditions=[
            Condition(type=ConditionType.READY, status=False, reason="Failed", message="x"),
            Condition(type=ConditionType.SHADOWED, status=True, reason="Foreign", message=""),
        ],
        functions=[
            NFStatus(
                name="blocklist",
                state=NFState.DEGRADED,
                version="1.4.0",
                revision="b" * 40,
                build_hash="d" * 16,
                program_id=41,
                program_tag="0123456789abcdef",
                hook="xdp",
                attach_points=[
                    AttachPointStatus(
                        interface="eth0",
                        hook="xdp",
                        mode="native",
                        dispatcher_id=40,
                        link_id=7,
                        shadowed_by=["cilium_xdp (id 3)"],
                    ),
                    AttachPointStatus(
                        interface="eth1", hook="xdp", error="gone", missing_since=1700000000.5
                    ),
                ],
                maps=[
                    MapStatus(name="blocked_v4", type="Hash", entries=2, max_entries=1024),
                    MapStatus(name="stats", type="PerCpuArray", entries=1, max_entries=1),
                ],
                last_error=ErrorInfo(
                    message="verifier refused",
                    file="nfs/blocklist/blocklist.c",
                    line=42,
                    log="R1 invalid mem access",
                    revision="c" * 40,
                    reason="TestsFailed",
                ),
                suspended=True,
                applied_at=1700000001.25,
                mode="monitor",
                verdicts=VerdictTotals(
                    enforce=Verdicts(passed=10, dropped=2, redirected=1, other=3),
                    monitor=Verdicts(passed=5, dropped=7),
                    chain_errors=4,
                ),
            ),
            NFStatus(name="counter", state=NFState.PENDING),
        ],
        suspended=True,
        drift_mode="warn",
        last_reconcile=ReconcileTimings(
            started_at=1700000000.0, fetch=0.1, build=1.5, apply=0.02, total=1.7, revision="c"
        ),
        observed_at=1700000002.0,
    )


def over_the_wire(status: NodeStatus) -> NodeStatus:
    data = status_to_proto(status).SerializeToString()
    return status_from_proto(pb.NodeStatus.FromString(data))


def test_a_full_status_round_trips_unchanged() -> None:
    status = full_status()
    back = over_the_wire(status)
    assert back == status
    assert back.dump() == status.dump()  # what `-o json` prints is the same on both sides


def test_a_minimal_status_round_trips_with_nothing_invented() -> None:
    status = NodeStatus(node="n", observed_at=5.0)
    back = over_the_wire(status)
    assert back == status
    assert back.source is None and back.last_reconcile is None
    assert back.last_applied_revision is None and back.approved_revision is None


def test_the_model_and_the_proto_have_the_same_fields() -> None:
    """A field added to one side only would silently never cross the wire."""
    pairs = [
        (NodeStatus, pb.NodeStatus, {}),
        (NFStatus, pb.FunctionStatus, {}),
        (AttachPointStatus, pb.AttachPoint, {}),
        (ErrorInfo, pb.ErrorInfo, {}),
        (SourceStatus, pb.SourceStatus, {}),
        (MapStatus, pb.MapStatus, {}),
        (Verdicts, pb.Verdicts, {}),
        (VerdictTotals, pb.VerdictTotals, {}),
        (Condition, pb.Condition, {}),
        (Event, pb.Event, {"epoch": None}),  # the epoch is the controller's, per session
        (
            ReconcileTimings,
            pb.ReconcileTimings,
            {
                "fetch_seconds": "fetch",
                "build_seconds": "build",
                "apply_seconds": "apply",
                "total_seconds": "total",
            },
        ),
    ]
    for model, message, renamed in pairs:
        proto_fields = {renamed.get(f.name, f.name) for f in message.DESCRIPTOR.fields} - {None}
        assert set(model.model_fields) == proto_fields, model.__name__


def test_an_error_log_is_cut_to_its_end() -> None:
    status = full_status()
    error = status.functions[0].last_error
    assert error is not None
    error.log = "start " + "x" * LOG_LIMIT + " the verifier's last words"
    back = over_the_wire(status).functions[0].last_error
    assert back is not None and back.log is not None
    assert len(back.log) == LOG_LIMIT and back.log.endswith("the verifier's last words")


def test_an_event_round_trips() -> None:
    event = Event(
        time=1700000000.0,
        type=EventType.WARNING,
        reason="Failed",
        message="compile failed",
        node="edge-1",
        nf="blocklist",
        revision="c" * 40,
        author="Ann <ann@example.org>",
        commit_time=1699999999.0,
        sequence=17,
    )
    assert event_from_proto(pb.Event.FromString(event_to_proto(event).SerializeToString())) == event


def test_an_unknown_state_from_a_newer_agent_is_refused_not_guessed() -> None:
    msg = status_to_proto(NodeStatus(node="n"))
    msg.functions.add(name="x", state="Hibernating")
    with pytest.raises(ValueError, match="Hibernating"):
        status_from_proto(msg)


def test_readiness_of_a_proto_status() -> None:
    status = full_status()
    assert not is_ready(status_to_proto(status))
    status.set_condition(ConditionType.READY, True, "ReconciliationSucceeded")
    assert is_ready(status_to_proto(status))


def _imports(package: str) -> set[str]:
    """The nfctl packages the modules of `package` import (at any depth in the file)."""
    found: set[str] = set()
    for path in (NFCTL / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            found |= {n.split(".")[1] for n in names if n.startswith("nfctl.") and "." in n}
    return found - {package}


def test_no_cycle_between_agent_controller_and_wire() -> None:
    assert _imports("wire") <= {"api"}
    assert "controller" not in _imports("agent")
    assert "agent" not in _imports("controller")
