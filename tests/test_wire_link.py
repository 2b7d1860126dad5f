"""The controller link through its narrow interface: a status provider and command
callbacks (no agent, no kernel), against a real controller on loopback. What the node
publishes reaches `get node`; what an operator asks reaches the callbacks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from nfctl.agent.config import AgentConfig
from nfctl.agent.controller_link import CommandRefused, ControllerLink
from nfctl.agent.store import StateStore
from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.api.nfctl.v1 import nfctl_pb2_grpc as pbg
from nfctl.wire.convert import status_from_proto
from nfctl.wire.status import Event, NodeStatus
from tests.agent_harness import wait_until
from tests.test_wire_convert_unit import full_status
from tests.test_wire_render import controller as controller_fixture

controller = controller_fixture  # a real `nfctl controller --insecure` on loopback


class FakeNode:
    """A StatusProvider: a status the test sets, the real event log of a state dir."""

    def __init__(self, status: NodeStatus, state_dir: Path) -> None:
        self.status = status
        self.store = StateStore(state_dir)
        self.notify_status: Callable[[], None] = lambda: None
        self.notify_event: Callable[[], None] = lambda: None

    @property
    def outbox(self) -> StateStore:
        return self.store

    def status_snapshot(self) -> NodeStatus:
        return self.status

    def subscribe(self, on_status: Callable[[], None], on_event: Callable[[], None]) -> None:
        self.notify_status, self.notify_event = on_status, on_event


class FakeCommands:
    """CommandCallbacks that record what they were asked; NF "locked" refuses."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def reconcile_now(self, reason: str, revision: str) -> str:
        self.calls.append(("reconcile", reason, revision))
        return "reconcile scheduled"

    def set_suspended(self, nf: str | None, suspended: bool) -> str:
        if nf == "locked":
            raise CommandRefused("NF locked cannot be suspended here")
        self.calls.append(("suspend", nf, suspended))
        return f"{nf} suspended={suspended}"

    def reconnected(self) -> None:
        self.calls.append(("reconnected",))


@pytest.fixture
def fleet(controller: str) -> Iterator[pbg.FleetServiceStub]:
    with grpc.insecure_channel(controller) as channel:
        yield pbg.FleetServiceStub(channel)


def remote_status(fleet: pbg.FleetServiceStub, node: str) -> NodeStatus | None:
    try:
        reply = fleet.GetNode(pb.GetNodeRequest(name=node), timeout=10)
    except grpc.RpcError:
        return None
    return status_from_proto(reply.node.status)


def test_status_events_and_commands_through_the_narrow_interface(
    controller: str, fleet: pbg.FleetServiceStub, tmp_path: Path
) -> None:
    status = full_status()
    node = FakeNode(status, tmp_path / "state")
    commands = FakeCommands()
    config = AgentConfig(
        repo="file:///nowhere", node=status.node, controller=controller, insecure=True
    )
    link = ControllerLink(node, commands, config)
    link.start()
    try:
        assert link.connected.wait(30), "the link never registered"
        wait_until(lambda: remote_status(fleet, status.node) == status, 30, what="status")

        # a new status is published: the controller has it without waiting for a heartbeat
        newer = status.model_copy(deep=True)
        newer.last_applied_revision = "e" * 40
        node.status = newer
        node.notify_status()
        wait_until(lambda: remote_status(fleet, status.node) == newer, 5, what="new status")

        # an event appended to the node's log is delivered
        node.store.append_event(Event(reason="Applied", message="from the outbox", node="edge-1"))
        node.notify_event()

        def delivered() -> bool:
            history = fleet.GetHistory(pb.GetHistoryRequest(node=status.node), timeout=10)
            return any(e.message == "from the outbox" for e in history.events)

        wait_until(delivered, 10, what="event at the controller")

        selector = pb.NodeSelector(nodes=[status.node])
        fleet.Reconcile(pb.ReconcileRequest(selector=selector, revision="f" * 40), timeout=10)
        fleet.Suspend(pb.SuspendRequest(selector=selector, nf="blocklist"), timeout=10)
        wait_until(lambda: len(commands.calls) >= 2, 10, what="both commands")
        reconciles = [c for c in commands.calls if c[0] == "reconcile"]
        assert len(reconciles) == 1 and reconciles[0][2] == "f" * 40, commands.calls
        assert ("suspend", "blocklist", True) in commands.calls
        assert ("reconnected",) not in commands.calls  # one session, never apart
    finally:
        link.stop()


def test_a_refused_or_unknown_command_answers_not_ok(tmp_path: Path) -> None:
    node = FakeNode(NodeStatus(node="n"), tmp_path / "state")
    link = ControllerLink(node, FakeCommands(), AgentConfig(repo="file:///x", node="n"))
    refused = link._execute(
        pb.Command(id="1", suspend=pb.SetSuspended(nf="locked", suspended=True))
    )
    assert (refused.command_id, refused.ok) == ("1", False)
    assert refused.message == "NF locked cannot be suspended here"
    unknown = link._execute(pb.Command(id="2"))
    assert not unknown.ok and "unknown command" in unknown.message
    done = link._execute(pb.Command(id="3", reconcile=pb.ReconcileNow(reason="webhook")))
    assert done.ok and done.message == "reconcile scheduled"
