"""SQLite persistence for one controller (storage.Store): nodes (latest status) and events.

Writes are batched by the caller (a flush every fraction of a second), so thousands of
agents reporting do not mean thousands of transactions per second. Events are unique by
(node, agent event epoch, agent sequence): agents resend after reconnecting without
creating duplicates. A node's row keeps its epoch and `acked`, the highest sequence up to
which every event of that epoch is stored, written in the same transaction as the events."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller.storage import (
    APPROVAL_COLUMNS,
    StoredApproval,
    StoredNode,
    StoredRollout,
    event_from_row,
    event_row,
    history_query,
    rollout_from_row,
)

NODES_TABLE = """
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    status BLOB NOT NULL,
    registered_at REAL NOT NULL,
    last_seen REAL NOT NULL,
    features TEXT NOT NULL DEFAULT '[]',
    epoch TEXT NOT NULL DEFAULT '',
    acked INTEGER NOT NULL DEFAULT 0
);
"""
EVENTS_TABLE = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    node TEXT NOT NULL,
    epoch TEXT NOT NULL DEFAULT '',
    sequence INTEGER NOT NULL,
    time REAL NOT NULL,
    type TEXT NOT NULL,
    reason TEXT NOT NULL,
    nf TEXT NOT NULL DEFAULT '',
    revision TEXT NOT NULL DEFAULT '',
    author TEXT NOT NULL DEFAULT '',
    commit_time REAL NOT NULL DEFAULT 0,
    message TEXT NOT NULL,
    UNIQUE (node, epoch, sequence)
);
"""
ROLLOUT_TABLES = """
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    started_at REAL NOT NULL,
    body BLOB NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS rollouts_started ON rollouts (started_at);
CREATE TABLE IF NOT EXISTS approvals (
    node TEXT PRIMARY KEY,
    revision TEXT NOT NULL,
    rollout_id TEXT NOT NULL,
    wave INTEGER NOT NULL,
    reason TEXT NOT NULL,
    time REAL NOT NULL
);
"""
SCHEMA = (
    NODES_TABLE
    + EVENTS_TABLE
    + ROLLOUT_TABLES
    + """
CREATE INDEX IF NOT EXISTS events_time ON events (time);
CREATE INDEX IF NOT EXISTS events_nf ON events (nf, time);
CREATE INDEX IF NOT EXISTS events_revision ON events (revision);
"""
)


class ControllerStore:
    """The embedded SQLite backend of storage.Store (one replica)."""

    def __init__(self, path: Path) -> None:
        if str(path) != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
            self._db.executescript(SCHEMA)

    def _columns(self, table: str) -> set[str]:
        return {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}

    def _migrate(self) -> None:
        """Databases from before event epochs: events were unique by (node, sequence) and
        a node's acknowledged point was its highest stored sequence."""
        if "sequence" in self._columns("events") and "epoch" not in self._columns("events"):
            self._db.executescript(
                "BEGIN;"
                "ALTER TABLE events RENAME TO events_v1;"
                + EVENTS_TABLE
                + "INSERT INTO events (id, node, epoch, sequence, time, type, reason, nf, "
                "revision, author, commit_time, message) SELECT id, node, '', sequence, time, "
                "type, reason, nf, revision, author, commit_time, message FROM events_v1;"
                "DROP TABLE events_v1;"
                "COMMIT;"
            )
        if "name" in self._columns("nodes") and "acked" not in self._columns("nodes"):
            self._db.executescript(
                "BEGIN;"
                "ALTER TABLE nodes ADD COLUMN epoch TEXT NOT NULL DEFAULT '';"
                "ALTER TABLE nodes ADD COLUMN acked INTEGER NOT NULL DEFAULT 0;"
                "UPDATE nodes SET acked = COALESCE("
                "(SELECT MAX(sequence) FROM events WHERE events.node = nodes.name), 0);"
                "COMMIT;"
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def ping(self) -> None:
        """Raise unless the database answers."""
        with self._lock:
            self._db.execute("SELECT count(*) FROM nodes").fetchone()

    def load_node(self, name: str) -> StoredNode | None:
        found = self._load("WHERE name = ?", (name,))
        return found[0] if found else None

    def load_nodes(self) -> list[StoredNode]:
        return self._load("", ())

    def _load(self, where: str, params: tuple[object, ...]) -> list[StoredNode]:
        with self._lock:
            rows = self._db.execute(
                "SELECT name, status, registered_at, last_seen, features, epoch, acked "
                f"FROM nodes {where}",
                params,
            ).fetchall()
        out = []
        for name, blob, registered_at, last_seen, features, epoch, acked in rows:
            status = pb.NodeStatus()
            status.ParseFromString(blob)
            out.append(
                StoredNode(
                    name,
                    status,
                    registered_at,
                    last_seen,
                    json.loads(features),
                    epoch=epoch,
                    acked=int(acked),
                )
            )
        return out

    def write(self, nodes: list[StoredNode], events: list[pb.Event]) -> None:
        """One transaction for a batch of node snapshots and new events."""
        if not nodes and not events:
            return
        features: dict[tuple[str, ...], str] = {}  # the same few lists on every node
        for n in nodes:
            key = tuple(n.features)
            if key not in features:
                features[key] = json.dumps(n.features)
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT INTO nodes (name, status, registered_at, last_seen, features, "
                    "epoch, acked) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                    "status=excluded.status, last_seen=excluded.last_seen, "
                    "features=excluded.features, epoch=excluded.epoch, acked=excluded.acked",
                    [
                        (
                            n.name,
                            n.blob if n.blob is not None else n.status.SerializeToString(),
                            n.registered_at,
                            n.last_seen,
                            features[tuple(n.features)],
                            n.epoch,
                            n.acked,
                        )
                        for n in nodes
                    ],
                )
                self._db.executemany(
                    "INSERT OR IGNORE INTO events (node, epoch, sequence, time, type, reason, "
                    "nf, revision, author, commit_time, message) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [event_row(e) for e in events],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def history(
        self,
        node: str = "",
        nf: str = "",
        revision: str = "",
        reason: str = "",
        since: float = 0.0,
        until: float = 0.0,
        limit: int = 500,
    ) -> list[pb.Event]:
        sql, params = history_query("?", node, nf, revision, reason, since, until, limit)
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()
        return [event_from_row(r) for r in reversed(rows)]

    def save_rollout(
        self, rollout: pb.Rollout, detail: str, approvals: list[StoredApproval]
    ) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.execute(
                    "INSERT INTO rollouts (id, started_at, body, detail) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET body=excluded.body, detail=excluded.detail",
                    (rollout.id, rollout.started_at, rollout.SerializeToString(), detail),
                )
                self._db.executemany(
                    f"INSERT INTO approvals ({APPROVAL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT(node) DO UPDATE SET revision=excluded.revision, "
                    "rollout_id=excluded.rollout_id, wave=excluded.wave, "
                    "reason=excluded.reason, time=excluded.time",
                    [
                        (a.node, a.revision, a.rollout_id, a.wave, a.reason, a.time)
                        for a in approvals
                    ],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def load_rollouts(self, limit: int = 20, rollout_id: str = "") -> list[StoredRollout]:
        where, params = ("WHERE id = ?", [rollout_id]) if rollout_id else ("", [])
        with self._lock:
            rows = self._db.execute(
                f"SELECT body, detail FROM rollouts {where} "
                "ORDER BY started_at DESC, rowid DESC LIMIT ?",
                [*params, max(1, limit)],
            ).fetchall()
        return [rollout_from_row(r) for r in rows]

    def load_approvals(self, node: str = "") -> list[StoredApproval]:
        where, params = ("WHERE node = ?", [node]) if node else ("", [])
        with self._lock:
            rows = self._db.execute(
                f"SELECT {APPROVAL_COLUMNS} FROM approvals {where}", params
            ).fetchall()
        return [StoredApproval(*r) for r in rows]
