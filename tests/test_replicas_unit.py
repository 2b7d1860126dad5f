"""Pure logic of several replicas: the agent's endpoint list, and how a replica takes in
node rows other replicas wrote (Fleet.merge)."""

from __future__ import annotations

from pathlib import Path

from nfctl.agent.controller_link import endpoints
from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller.fleet import Fleet
from nfctl.controller.storage import StoredNode
from nfctl.controller.store import ControllerStore


def row(name: str, last_seen: float, holder: str, acked: int = 0, rev: str = "r") -> StoredNode:
    status = pb.NodeStatus(node=name, last_applied_revision=rev)
    return StoredNode(name, status, 1.0, last_seen, ["xdp"], epoch="e", acked=acked, holder=holder)


def fleet() -> Fleet:
    return Fleet(ControllerStore(Path(":memory:")), replica="me")


def test_endpoints_are_a_comma_separated_list() -> None:
    assert endpoints("a:9443, b:9443,,c:1") == ["a:9443", "b:9443", "c:1"]
    assert endpoints("ctl.example.org:9443") == ["ctl.example.org:9443"]
    assert endpoints("") == []


def test_nodes_of_other_replicas_show_as_connected_with_their_status() -> None:
    f = fleet()
    f.merge([row("n1", 10.0, "other", acked=4, rev="abc"), row("n2", 10.0, "")])
    n1, n2 = f.nodes["n1"], f.nodes["n2"]
    assert n1.connected and n1.session is None and n1.holder == "other"
    assert n1.status.last_applied_revision == "abc" and n1.events.stored == 4
    assert not n2.connected
    assert [e.name for e in f.ordered()] == ["n1", "n2"]
    # nothing merged is written back by this replica
    assert f.take_dirty(everything=True) == ([], [])


def test_what_this_replica_holds_or_saw_later_is_kept() -> None:
    f = fleet()
    entry, session, _ = f.connect(pb.Register(node="n1", event_epoch="e"), "peer")
    f.report_status(entry, pb.NodeStatus(last_applied_revision="mine"))
    f.merge([row("n1", entry.last_seen + 100, "other", rev="theirs")])
    assert f.nodes["n1"].status.last_applied_revision == "mine"  # the stream is here
    f.merge([row("n2", 50.0, "me", rev="stale copy of my own write")])
    assert "n2" not in f.nodes
    f.disconnect(entry, session)
    f.merge([row("n1", 1.0, "other", rev="older")])  # older than what this replica saw
    assert f.nodes["n1"].status.last_applied_revision == "mine"


def test_a_newer_row_replaces_a_pending_write_of_a_lost_stream() -> None:
    f = fleet()
    entry, session, _ = f.connect(pb.Register(node="n1", event_epoch="e"), "peer")
    f.disconnect(entry, session)  # a disconnect waits for the next flush
    f.merge([row("n1", entry.last_seen + 5, "other", acked=9, rev="moved")])
    nodes, _ = f.take_dirty(everything=True)
    assert nodes == []  # the write would have said "disconnected" over the new holder
    assert f.nodes["n1"].holder == "other" and f.nodes["n1"].events.acked == 9
