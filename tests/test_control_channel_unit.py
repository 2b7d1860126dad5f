"""Pure logic of the control channel: event de-duplication and flag validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller.fleet import EventLedger, Fleet
from nfctl.controller.server import ControllerConfig
from nfctl.controller.store import ControllerStore


def test_ledger_keeps_every_new_sequence_and_only_once() -> None:
    ledger = EventLedger("e1")
    assert [ledger.accept(s) for s in (1, 2, 4)] == [True, True, True]
    assert ledger.received == 2  # 3 is missing: the acknowledged point stays before it
    assert not ledger.accept(4) and not ledger.accept(2)
    assert ledger.accept(3)  # the gap is filled, not skipped
    assert ledger.received == 4 and ledger.above == set()


def test_ledger_gives_up_only_what_the_agent_no_longer_has() -> None:
    ledger = EventLedger("e1")
    ledger.accept(1)
    ledger.accept(7)
    assert ledger.skip_to(6) == 4  # 2..5 were compacted away by the agent
    assert ledger.received == 5 and ledger.above == {7} and ledger.lost == 4
    assert ledger.accept(6) and ledger.received == 7


def _register(node: str, epoch: str, first: int = 0) -> pb.Register:
    return pb.Register(node=node, event_epoch=epoch, first_event_sequence=first)


def test_acknowledged_point_survives_a_restart_and_a_new_epoch_starts_over(
    tmp_path: Path,
) -> None:
    store = ControllerStore(tmp_path / "c.db")
    fleet = Fleet(store)
    entry, _, _ = fleet.connect(_register("n1", "e1"), "peer")
    events = [pb.Event(sequence=s, reason="Applied", message=f"m{s}") for s in (1, 2, 3)]
    assert len(fleet.add_events(entry, events)) == 3
    assert fleet.add_events(entry, events[:2]) == []  # a resend
    assert entry.events.stored == 0  # nothing acknowledged before it is in the database
    fleet.flush()
    assert entry.events.stored == 3
    store.close()

    fleet = Fleet(ControllerStore(tmp_path / "c.db"))  # a controller restart
    entry, _, _ = fleet.connect(_register("n1", "e1"), "peer")
    assert entry.events.stored == 3
    assert fleet.add_events(entry, [pb.Event(sequence=3, reason="Applied")]) == []
    # the agent's state dir was wiped: a new epoch, numbered from 1 again, all new
    entry, _, _ = fleet.connect(_register("n1", "e2"), "peer")
    assert entry.events.stored == 0
    assert len(fleet.add_events(entry, [pb.Event(sequence=1, reason="Applied")])) == 1
    fleet.flush()
    stored = fleet.store.history(node="n1")
    assert sorted((e.epoch, e.sequence) for e in stored) == [
        ("e1", 1),
        ("e1", 2),
        ("e1", 3),
        ("e2", 1),
    ]


def test_heartbeat_must_fit_twice_in_stale_after() -> None:
    ok = ControllerConfig(insecure=True, listen="127.0.0.1:0", stale_after=30, heartbeat=10)
    ok.validate()
    bad = ControllerConfig(insecure=True, listen="127.0.0.1:0", stale_after=30, heartbeat=20)
    with pytest.raises(ValueError, match="at most half of --stale-after"):
        bad.validate()
    assert Fleet(ControllerStore(Path(":memory:")), stale_after=30).heartbeat == 10
