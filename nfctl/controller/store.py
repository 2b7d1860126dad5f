"""SQLite persistence for the controller: nodes (latest status) and the event history.

Writes are batched by the caller (a flush every fraction of a second), so thousands of
agents reporting do not mean thousands of transactions per second. Events are unique by
(node, agent sequence): agents resend after reconnecting without creating duplicates."""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb

SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    status BLOB NOT NULL,
    registered_at REAL NOT NULL,
    last_seen REAL NOT NULL,
    features TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    node TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    time REAL NOT NULL,
    type TEXT NOT NULL,
    reason TEXT NOT NULL,
    nf TEXT NOT NULL DEFAULT '',
    revision TEXT NOT NULL DEFAULT '',
    author TEXT NOT NULL DEFAULT '',
    commit_time REAL NOT NULL DEFAULT 0,
    message TEXT NOT NULL,
    UNIQUE (node, sequence)
);
CREATE INDEX IF NOT EXISTS events_time ON events (time);
CREATE INDEX IF NOT EXISTS events_nf ON events (nf, time);
CREATE INDEX IF NOT EXISTS events_revision ON events (revision);
"""


@dataclass
class StoredNode:
    name: str
    status: pb.NodeStatus
    registered_at: float
    last_seen: float
    features: list[str]
    blob: bytes | None = None  # the serialized status, when already at hand


class ControllerStore:
    def __init__(self, path: Path) -> None:
        if str(path) != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def load_nodes(self) -> list[StoredNode]:
        with self._lock:
            rows = self._db.execute(
                "SELECT name, status, registered_at, last_seen, features FROM nodes"
            ).fetchall()
        out = []
        for name, blob, registered_at, last_seen, features in rows:
            status = pb.NodeStatus()
            status.ParseFromString(blob)
            out.append(StoredNode(name, status, registered_at, last_seen, json.loads(features)))
        return out

    def max_sequences(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT node, MAX(sequence) FROM events GROUP BY node"
            ).fetchall()
        return {node: int(seq) for node, seq in rows}

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
                    "INSERT INTO nodes (name, status, registered_at, last_seen, features) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                    "status=excluded.status, last_seen=excluded.last_seen, "
                    "features=excluded.features",
                    [
                        (
                            n.name,
                            n.blob if n.blob is not None else n.status.SerializeToString(),
                            n.registered_at,
                            n.last_seen,
                            features[tuple(n.features)],
                        )
                        for n in nodes
                    ],
                )
                self._db.executemany(
                    "INSERT OR IGNORE INTO events (node, sequence, time, type, reason, nf, "
                    "revision, author, commit_time, message) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            e.node,
                            e.sequence,
                            e.time,
                            e.type,
                            e.reason,
                            e.nf,
                            e.revision,
                            e.author,
                            e.commit_time,
                            e.message,
                        )
                        for e in events
                    ],
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
        clauses: list[str] = []
        params: list[object] = []
        for column, value in (("node", node), ("nf", nf), ("reason", reason)):
            if value:
                clauses.append(f"{column} = ?")
                params.append(value)
        if revision:
            clauses.append("revision LIKE ?")
            params.append(revision + "%")
        if since:
            clauses.append("time >= ?")
            params.append(since)
        if until:
            clauses.append("time <= ?")
            params.append(until)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = (
            "SELECT node, sequence, time, type, reason, nf, revision, author, commit_time, message "
            f"FROM events {where} ORDER BY time DESC, id DESC LIMIT ?"
        )
        with self._lock:
            rows = self._db.execute(sql, [*params, max(1, min(limit or 500, 10_000))]).fetchall()
        events = [
            pb.Event(
                node=r[0],
                sequence=r[1],
                time=r[2],
                type=r[3],
                reason=r[4],
                nf=r[5],
                revision=r[6],
                author=r[7],
                commit_time=r[8],
                message=r[9],
            )
            for r in rows
        ]
        events.reverse()
        return events
