"""Pure parts of the controller's fleet view, in process: staleness, the hand-encoded wire
form of ListNodes, write-behind timing, node selection and event watchers."""

from __future__ import annotations

import asyncio

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller.fleet_queries import select
from nfctl.controller.node import NodeEntry
from nfctl.controller.pbwire import repeated_field
from nfctl.controller.staleness import HEARTBEATS_PER_STALE, heartbeat_interval, is_stale
from nfctl.controller.watchers import Watcher, publish
from nfctl.controller.write_behind import WriteBehind


def entry(name: str, last_seen: float = 100.0, **labels: str) -> NodeEntry:
    status = pb.NodeStatus(node=name, labels=labels, last_applied_revision="r1")
    return NodeEntry(name=name, status=status, registered_at=1.0, last_seen=last_seen)


def test_a_node_is_stale_only_after_stale_after_without_a_report() -> None:
    assert not is_stale(last_seen=100.0, stale_after=60.0, now=160.0)
    assert is_stale(last_seen=100.0, stale_after=60.0, now=160.5)
    assert heartbeat_interval(60.0) == 60.0 / HEARTBEATS_PER_STALE < 60.0 / 2
    assert heartbeat_interval(60.0, heartbeat=5.0) == 5.0


def test_list_nodes_bytes_parse_as_the_message_a_client_expects() -> None:
    a, b = entry("a", last_seen=100.0), entry("b", last_seen=10.0)
    blob = repeated_field(1, (e.to_bytes(stale_after=60.0, now=120.0) for e in (a, b)))
    answer = pb.ListNodesResponse.FromString(blob)
    assert [n.status.node for n in answer.nodes] == ["a", "b"]
    assert [n.stale for n in answer.nodes] == [False, True]
    assert answer.nodes[0].status.last_applied_revision == "r1"
    assert answer.nodes[0] == a.to_proto(stale_after=60.0, now=120.0)


def test_a_refresh_waits_for_persist_interval_a_change_does_not() -> None:
    writes = WriteBehind(persist_interval=3600.0)
    quiet, changed = entry("quiet"), entry("changed")
    writes.mark_refreshed(quiet, now=1e12)  # refreshed just now (in the future, even)
    writes.mark_dirty(changed)
    nodes, _ = writes.take()
    assert [n.name for n in nodes] == ["changed"]
    assert writes.take() == ([], [])
    writes.mark_refreshed(quiet, now=1e12)
    nodes, _ = writes.take(everything=True)
    assert [n.name for n in nodes] == ["quiet"]


def test_a_failed_write_goes_into_the_next_batch_before_newer_events() -> None:
    writes = WriteBehind(persist_interval=30.0, replica="r1")
    node = entry("n1")
    first = pb.Event(node="n1", sequence=1)
    writes.events.append(first)
    writes.mark_dirty(node)
    _, events = writes.take()
    writes.events.append(pb.Event(node="n1", sequence=2))
    writes.requeue([node], events)
    again, events = writes.take()
    assert [n.name for n in again] == ["n1"] and [e.sequence for e in events] == [1, 2]
    assert again[0].holder == ""  # no stream here: no replica holds it


def test_selecting_by_name_or_by_all_labels() -> None:
    nodes = [entry("a", role="edge", zone="z1"), entry("b", role="edge"), entry("c")]
    by_name = {e.name: e for e in nodes}
    pick = pb.NodeSelector

    def names(selector: pb.NodeSelector | None) -> list[str]:
        return [e.name for e in select(nodes, by_name, selector)]

    assert names(None) == names(pick()) == ["a", "b", "c"]
    assert names(pick(nodes=["c", "a", "zz"])) == ["a", "c"]
    assert names(pick(labels={"role": "edge", "zone": "z1"})) == ["a"]
    assert names(pick(labels={"zone": "z1"}, nodes=["c"])) == ["a", "c"]


def test_a_watcher_gets_what_it_filters_for_and_a_full_one_is_dropped() -> None:
    async def main() -> None:
        node_a = Watcher(pb.WatchEventsRequest(node="a"))
        failures = Watcher(pb.WatchEventsRequest(reason="Failed"))
        failures.queue = asyncio.Queue(maxsize=1)
        watchers = {node_a, failures}
        events = [
            pb.Event(node="a", reason="Applied"),
            pb.Event(node="b", reason="Failed"),
            pb.Event(node="a", reason="Failed"),
        ]
        publish(watchers, events)
        assert [node_a.queue.get_nowait().reason for _ in range(2)] == ["Applied", "Failed"]
        assert failures.queue.get_nowait().node == "b"
        assert watchers == {node_a}  # its queue overflowed: too slow, its stream ends

    asyncio.run(main())
