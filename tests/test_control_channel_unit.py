"""Pure logic of the control channel: event de-duplication and flag validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller.config import ControllerConfig
from nfctl.controller.event_ledger import EventLedger
from nfctl.controller.fleet import Fleet
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


# The schema before event epochs (a database an existing controller already has).
OLD_SCHEMA = """
CREATE TABLE nodes (name TEXT PRIMARY KEY, status BLOB NOT NULL, registered_at REAL NOT NULL,
    last_seen REAL NOT NULL, features TEXT NOT NULL DEFAULT '[]');
CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, node TEXT NOT NULL,
    sequence INTEGER NOT NULL, time REAL NOT NULL, type TEXT NOT NULL, reason TEXT NOT NULL,
    nf TEXT NOT NULL DEFAULT '', revision TEXT NOT NULL DEFAULT '',
    author TEXT NOT NULL DEFAULT '', commit_time REAL NOT NULL DEFAULT 0,
    message TEXT NOT NULL, UNIQUE (node, sequence));
CREATE INDEX events_time ON events (time);
"""


def test_a_database_from_before_epochs_is_migrated_without_losing_events(
    tmp_path: Path,
) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    status = pb.NodeStatus(node="n1").SerializeToString()
    db.execute("INSERT INTO nodes VALUES ('n1', ?, 1.0, 2.0, '[]')", (status,))
    for seq in (1, 2, 3):
        db.execute(
            "INSERT INTO events (node, sequence, time, type, reason, message) "
            "VALUES ('n1', ?, ?, 'Normal', 'Applied', ?)",
            (seq, float(seq), f"m{seq}"),
        )
    db.commit()
    db.close()

    fleet = Fleet(ControllerStore(path))
    assert [(e.sequence, e.message) for e in fleet.store.history(node="n1")] == [
        (1, "m1"),
        (2, "m2"),
        (3, "m3"),
    ]
    # the agent's first epoch-aware registration continues where the old controller was
    entry, _, _ = fleet.connect(_register("n1", "epoch-1"), "peer")
    assert entry.events.stored == 3
    resent = [
        pb.Event(sequence=s, time=float(s), reason="Applied", message=f"m{s}") for s in (2, 3, 4)
    ]
    assert [e.sequence for e in fleet.add_events(entry, resent)] == [4]
    fleet.flush()
    assert [e.sequence for e in fleet.store.history(node="n1")] == [1, 2, 3, 4]
