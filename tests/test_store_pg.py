"""The PostgreSQL store on a real server: migrations from an older schema, events stored
once whichever replica writes them, the newest snapshot of a node wins, commands claimed
once per node; and SQLite stays the default."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psycopg

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller.pg_schema import LATEST, MIGRATIONS
from nfctl.controller.storage import StoredNode, open_store
from nfctl.controller.store import ControllerStore
from nfctl.controller.store_pg import PgStore
from tests.conftest import REPO_ROOT
from tests.pg_harness import PgServer, pg_url, postgres  # noqa: F401


def node(
    name: str, last_seen: float, epoch: str = "e1", acked: int = 0, holder: str = ""
) -> StoredNode:
    status = pb.NodeStatus(node=name, last_applied_revision=f"rev-{last_seen}")
    return StoredNode(
        name, status, 1000.0, last_seen, ["xdp"], epoch=epoch, acked=acked, holder=holder
    )


def event(name: str, sequence: int, epoch: str = "e1") -> pb.Event:
    return pb.Event(
        node=name,
        epoch=epoch,
        sequence=sequence,
        time=2000.0 + sequence,
        type="Normal",
        reason="Applied",
        message=f"event {sequence}",
        nf="acl",
    )


def test_sqlite_stays_the_default(tmp_path: Path) -> None:
    store = open_store(tmp_path / "c.db")
    assert isinstance(store, ControllerStore)
    store.write([node("n1", 5.0)], [event("n1", 1)])
    assert [n.name for n in store.load_nodes()] == ["n1"]
    store.close()


def test_migrates_from_the_first_schema_version(pg_url: str) -> None:  # noqa: F811
    version, first = MIGRATIONS[0]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(first)
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (%s)", (version,))
        conn.execute(
            "INSERT INTO nodes (name, status, registered_at, last_seen, epoch, acked) "
            "VALUES ('old', %s, 1, 2, 'e0', 7)",
            (pb.NodeStatus(node="old", last_applied_revision="abc").SerializeToString(),),
        )
        conn.execute(
            "INSERT INTO events (node, epoch, sequence, time, type, reason, message) "
            "VALUES ('old', 'e0', 7, 3, 'Normal', 'Applied', 'kept')"
        )
    store = PgStore(pg_url, replica="a")
    assert store.version == LATEST > version
    [old] = store.load_nodes()
    assert (old.name, old.status.last_applied_revision, old.epoch, old.acked, old.holder) == (
        "old",
        "abc",
        "e0",
        7,
        "",
    )
    assert [e.message for e in store.history(node="old")] == ["kept"]
    # the new tables work on the migrated database
    assert store.add_command("c1", b"x", ["old"], ["old"], time.time()) == ["old"]
    store.close()
    again = PgStore(pg_url, replica="b")  # a second start applies nothing twice
    with psycopg.connect(pg_url) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY 1")]
    assert versions == [m[0] for m in MIGRATIONS]
    again.close()


def test_two_replicas_store_each_event_once(pg_url: str) -> None:  # noqa: F811
    a, b = PgStore(pg_url, replica="a"), PgStore(pg_url, replica="b")
    try:
        a.write([node("n1", 10.0, acked=3, holder="a")], [event("n1", s) for s in (1, 2, 3)])
        # the agent moved to b before a's acknowledgement reached it: it resends 2..4
        b.write([node("n1", 20.0, acked=4, holder="b")], [event("n1", s) for s in (2, 3, 4)])
        assert [e.sequence for e in a.history(node="n1")] == [1, 2, 3, 4]
        # a learns late that the stream ended: its older snapshot does not win
        a.write([node("n1", 10.0, acked=3, holder="")], [])
        stored = b.load_node("n1")
        assert stored is not None
        assert (stored.holder, stored.acked, stored.last_seen) == ("b", 4, 20.0)
        # the acknowledged point never goes back within an epoch; a new epoch restarts it
        b.write([node("n1", 30.0, acked=2, holder="b")], [])
        assert (b.load_node("n1") or node("", 0)).acked == 4
        b.write([node("n1", 40.0, epoch="e2", acked=1, holder="b")], [event("n1", 1, "e2")])
        assert (b.load_node("n1") or node("", 0)).acked == 1
        assert len(a.history(node="n1")) == 5
        # what other replicas changed since a given point
        rows, mark = a.changed_nodes(0)
        assert [r.name for r in rows] == ["n1"] and mark > 0
        assert a.changed_nodes(mark)[0] == []
        # a write that commits after a later one was read is still seen next time
        with psycopg.connect(pg_url) as slow:
            slow.execute(
                "INSERT INTO nodes (name, status, registered_at, last_seen) "
                "VALUES ('late', '', 1, 1)"
            )  # open, not committed yet
            b.write([node("quick", 50.0, holder="b")], [])
            rows, mark = a.changed_nodes(mark)
            assert [r.name for r in rows] == ["quick"]
            slow.commit()
        rows, mark = a.changed_nodes(mark)
        assert "late" in [r.name for r in rows]
    finally:
        a.close()
        b.close()


def test_a_command_is_claimed_once_per_node(pg_url: str) -> None:  # noqa: F811
    a, b = PgStore(pg_url, replica="a"), PgStore(pg_url, replica="b")
    try:
        first = a.last_command()
        created = time.time()
        claimed = a.add_command("cmd-1", b"body", ["n1", "n2", "n3"], ["n1"], created)
        assert claimed == ["n1"]
        [recorded] = b.commands_after(first)
        assert recorded.created == created  # the origin's time, for the relay's latency
        assert (recorded.command_id, recorded.body, recorded.nodes) == (
            "cmd-1",
            b"body",
            ["n1", "n2", "n3"],
        )
        # n1 moved to b meanwhile: b must not deliver it again
        assert sorted(b.claim("cmd-1", ["n1", "n2"])) == ["n2"]
        assert a.claim("cmd-1", ["n2", "n3"]) == ["n3"]
        assert b.commands_after(recorded.row) == []
        # n1 reconnects to b before answering: b takes over the unanswered delivery...
        assert [c.command_id for c in b.unanswered("n1", 0)] == ["cmd-1"]
        # ...and once answered it is never sent again, by any replica
        b.done([("cmd-1", "n1")])
        assert a.unanswered("n1", 0) == []
        assert a.unanswered("n9", 0) == []  # not a target
        # answers are recorded in batches (a repeated one too), each pair for itself
        a.done([("cmd-1", "n2"), ("cmd-1", "n2"), ("cmd-9", "n3")])
        assert a.unanswered("n2", 0) == []
        assert [c.command_id for c in a.unanswered("n3", 0)] == ["cmd-1"]
    finally:
        a.close()
        b.close()


def test_leader_release_and_retention(pg_url: str) -> None:  # noqa: F811
    store = PgStore(pg_url, replica="a")
    try:
        now = time.time()
        store.write(
            [node("gone", now - 100, holder="dead"), node("fresh", now, holder="live")],
            [event("gone", 1)],
        )
        assert store.release_stale(now - 60) == ["gone"]
        assert (store.load_node("gone") or node("", 0)).holder == ""
        assert (store.load_node("fresh") or node("", 0)).holder == "live"
        store.add_command("old", b"x", ["fresh"], ["fresh"], now - 1000)
        events, deliveries = store.expire(now - 500)
        assert (events, deliveries) == (1, 1)
        assert store.history() == [] and store.commands_after(0) == []
    finally:
        store.close()


def test_server_restart_is_survived(postgres: PgServer, pg_url: str) -> None:  # noqa: F811
    store = PgStore(pg_url, replica="a", timeout=20)
    try:
        store.write([node("n1", 1.0)], [event("n1", 1)])
        postgres.stop()
        postgres.start()
        # the pool replaces the dead connections: the next write and read just work
        deadline = time.monotonic() + 20
        while True:
            try:
                store.write([node("n1", 2.0)], [event("n1", 2)])
                break
            except psycopg.OperationalError:
                assert time.monotonic() < deadline
                time.sleep(0.5)
        assert [e.sequence for e in store.history(node="n1")] == [1, 2]
    finally:
        store.close()


def test_an_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "nfctl", "controller", "--insecure", "--listen", "127.0.0.1:0",
         "--db", f"postgresql://nfctl@/nfctl?host={tmp_path}", "--webhook-addr", "",
         "--metrics-addr", "", "--health-listen", ""],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "cannot open the PostgreSQL store" in out and str(tmp_path) in out
    assert "Traceback" not in out
