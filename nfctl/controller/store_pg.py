"""PostgreSQL backend of storage.Store, shared by several controller replicas, and what
they coordinate through it: which replica holds which node's stream (nodes.holder), the
rows changed since a replica last looked (nodes.change), and commands for every replica
to deliver to the agents it holds, each (command, node) claimed once (deliveries)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller.pg_schema import MIGRATION_LOCK, MIGRATIONS
from nfctl.controller.storage import (
    APPROVAL_COLUMNS,
    StoredApproval,
    StoredNode,
    StoredRollout,
    StoreUnavailable,
    approval_row,
    event_from_row,
    event_row,
    history_query,
    rollout_from_row,
)

log = logging.getLogger(__name__)

COMMANDS_CHANNEL = "nfctl_commands"
# TCP: notice a database that went silent (partition, dead host) within ~15 s instead of
# the kernel's retransmission timeout (many minutes), so writes fail and are retried and
# the leader steps down. Ignored on unix sockets.
TCP_OPTIONS: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 15_000,
}
NODE_COLUMNS = "name, status, registered_at, last_seen, features, epoch, acked, holder"
# A snapshot from a replica that saw the node last wins: a replica that lost a node's
# stream to another (or noticed the disconnect late) never overwrites the newer holder.
UPSERT_NODE = """
INSERT INTO nodes (name, status, registered_at, last_seen, features, epoch, acked, holder)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (name) DO UPDATE SET
    status = excluded.status, last_seen = excluded.last_seen, features = excluded.features,
    acked = CASE WHEN nodes.epoch = excluded.epoch
                 THEN GREATEST(nodes.acked, excluded.acked) ELSE excluded.acked END,
    epoch = excluded.epoch, holder = excluded.holder, change = pg_current_xact_id()
WHERE nodes.last_seen <= excluded.last_seen
"""
INSERT_EVENT = """
INSERT INTO events (node, epoch, sequence, time, type, reason, nf, revision, author,
                    commit_time, message)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (node, epoch, sequence) DO NOTHING
"""


class _Stale(Exception):
    """The rollout changed since it was read: roll the transaction back."""


@dataclass
class StoredCommand:
    row: int  # commands.id: the order replicas read them in
    command_id: str
    body: bytes  # a serialized ControllerMessage
    nodes: list[str]
    created: float = 0.0  # when the origin replica recorded it (its clock)


def migrate(conn: psycopg.Connection[Any]) -> int:
    """Apply the migrations this database lacks; returns the version it is at."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        current = int(row[0]) if row and row[0] is not None else 0
        for version, sql in MIGRATIONS:
            if version > current:
                log.info("database schema: applying migration %d", version)
                conn.execute(sql)  # our own constant SQL
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
                current = version
    return current


class PgStore:
    """storage.Store on PostgreSQL: a small connection pool; writes from the flush thread,
    reads from operator calls."""

    def __init__(self, url: str, replica: str = "", timeout: float = 10.0) -> None:
        self.url = url
        self.replica = replica
        self.pool = open_pool(url, timeout, max_size=4)
        with self.pool.connection() as conn:
            self.version = migrate(conn)

    def close(self) -> None:
        self.pool.close()

    def ping(self) -> None:
        with self.pool.connection() as conn:
            conn.execute("SELECT 1").fetchone()

    # -- nodes -------------------------------------------------------------------------------
    def _nodes(self, where: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
        with self.pool.connection() as conn:
            return conn.execute(
                f"SELECT {NODE_COLUMNS} FROM nodes {where}",
                params,
            ).fetchall()

    def load_nodes(self) -> list[StoredNode]:
        return [_node(r) for r in self._nodes("", ())]

    def load_node(self, name: str) -> StoredNode | None:
        rows = self._nodes("WHERE name = %s", (name,))
        return _node(rows[0]) if rows else None

    def changed_nodes(self, since: int) -> tuple[list[StoredNode], int]:
        """Rows written by transactions from id `since` on, and where to look from next
        time: the oldest transaction still running now (its rows, and those of any later
        one, are not visible yet). A row may come twice; merging it again is harmless."""
        with self.pool.connection() as conn, conn.transaction():
            mark = conn.execute(
                "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
            ).fetchone()
            rows = conn.execute(
                f"SELECT {NODE_COLUMNS} FROM nodes WHERE change >= %s::text::xid8",
                (str(since),),
            ).fetchall()
        return [_node(r) for r in rows], int(mark[0]) if mark else since

    def write(self, nodes: list[StoredNode], events: list[pb.Event]) -> None:
        if not nodes and not events:
            return
        features: dict[tuple[str, ...], str] = {}
        for n in nodes:
            features.setdefault(tuple(n.features), json.dumps(n.features))
        with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            if nodes:
                cur.executemany(
                    UPSERT_NODE,
                    [
                        (
                            n.name,
                            n.blob if n.blob is not None else n.status.SerializeToString(),
                            n.registered_at,
                            n.last_seen,
                            features[tuple(n.features)],
                            n.epoch,
                            n.acked,
                            n.holder,
                        )
                        for n in nodes
                    ],
                )
            if events:
                cur.executemany(
                    INSERT_EVENT,
                    [event_row(e) for e in events],
                )

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
        sql, params = history_query("%s", node, nf, revision, reason, since, until, limit)
        with self.pool.connection() as conn:
            rows = conn.execute(sql, params).fetchall()
        return [event_from_row(r) for r in reversed(rows)]

    def release_stale(self, cutoff: float) -> list[str]:
        """Nodes still shown as held by a replica although none reported since `cutoff`
        (their replica died): shown as disconnected from now on."""
        with self.pool.connection() as conn:
            rows = conn.execute(
                "UPDATE nodes SET holder = '', change = pg_current_xact_id() "
                "WHERE holder <> '' AND last_seen < %s RETURNING name",
                (cutoff,),
            ).fetchall()
        return [r[0] for r in rows]

    def expire(self, before: float) -> tuple[int, int]:
        """Retention: delete events and commands (with their deliveries) older than
        `before`; returns how many events and deliveries."""
        with self.pool.connection() as conn, conn.transaction():
            events = conn.execute("DELETE FROM events WHERE time < %s", (before,)).rowcount
            deliveries = conn.execute(
                "WITH gone AS (DELETE FROM commands WHERE created < %s RETURNING command_id) "
                "DELETE FROM deliveries WHERE command_id IN (SELECT command_id FROM gone)",
                (before,),
            ).rowcount
        return events, deliveries

    # -- commands ----------------------------------------------------------------------------
    def add_command(
        self, command_id: str, body: bytes, nodes: list[str], claim: list[str], created: float
    ) -> list[str]:
        """Record a command for `nodes` and tell every replica (NOTIFY, sent at commit),
        then claim `claim` (nodes this replica holds) in a second transaction, so that the
        other replicas start on theirs meanwhile (claims of one node exclude each other
        either way). Returns the claimed nodes: deliver the command to these, and only
        these."""
        with self.pool.connection() as conn:
            with conn.transaction():
                row = conn.execute(
                    "INSERT INTO commands (command_id, body, nodes, origin, created) "
                    "VALUES (%s, %s, %s, %s, %s) RETURNING id",
                    (command_id, body, nodes, self.replica, created),
                ).fetchone()
                conn.execute(
                    "SELECT pg_notify(%s, %s)", (COMMANDS_CHANNEL, str(row[0] if row else 0))
                )
            with conn.transaction():
                return self._claim(conn, command_id, claim)

    def claim(self, command_id: str, nodes: list[str]) -> list[str]:
        """The nodes of `nodes` no replica has taken this command for yet, now taken."""
        with self.pool.connection() as conn:
            return self._claim(conn, command_id, nodes)

    def _claim(self, conn: psycopg.Connection[Any], command_id: str, nodes: list[str]) -> list[str]:
        if not nodes:
            return []
        rows = conn.execute(
            "INSERT INTO deliveries (command_id, node, replica) "
            "SELECT %s, n, %s FROM unnest(%s::text[]) AS n "
            "ON CONFLICT DO NOTHING RETURNING node",
            (command_id, self.replica, nodes),
        ).fetchall()
        return [r[0] for r in rows]

    def done(self, results: list[tuple[str, str]]) -> None:
        """(command id, node) pairs the agents answered: never delivered again."""
        if not results:
            return
        # one statement per batch: a fan-out's answers arrive by the thousand while the
        # fan-out is still being written, and an UPDATE per answer costs PostgreSQL and
        # this process (GIL) that much more at that moment
        commands, nodes = [c for c, _ in results], [n for _, n in results]
        with self.pool.connection() as conn:
            conn.execute(
                "UPDATE deliveries SET done = true FROM unnest(%s::text[], %s::text[]) "
                "AS answered(command_id, node) WHERE deliveries.command_id = "
                "answered.command_id AND deliveries.node = answered.node",
                (commands, nodes),
            )

    def unanswered(self, node: str, since: float) -> list[StoredCommand]:
        """Commands for `node` recorded since `since` that it has not answered (never
        delivered, or sent by a replica that died before the answer came), now claimed
        by this replica, oldest first."""
        with self.pool.connection() as conn, conn.transaction():
            rows = conn.execute(
                "SELECT id, command_id, body, nodes FROM commands "
                "WHERE created >= %s AND %s = ANY(nodes) ORDER BY id",
                (since, node),
            ).fetchall()
            out = []
            for r in rows:
                taken = conn.execute(
                    "INSERT INTO deliveries (command_id, node, replica) VALUES (%s, %s, %s) "
                    "ON CONFLICT (command_id, node) DO UPDATE SET replica = excluded.replica "
                    "WHERE NOT deliveries.done RETURNING node",
                    (r[1], node, self.replica),
                ).fetchone()
                if taken:
                    out.append(StoredCommand(int(r[0]), r[1], bytes(r[2]), list(r[3])))
        return out

    def last_command(self) -> int:
        with self.pool.connection() as conn:
            row = conn.execute("SELECT coalesce(max(id), 0) FROM commands").fetchone()
        return int(row[0]) if row else 0

    def commands_after(self, row: int) -> list[StoredCommand]:
        with self.pool.connection() as conn:
            rows = conn.execute(
                "SELECT id, command_id, body, nodes, created FROM commands WHERE id > %s "
                "ORDER BY id",
                (row,),
            ).fetchall()
        return [StoredCommand(int(r[0]), r[1], bytes(r[2]), list(r[3]), r[4]) for r in rows]

    # -- rollouts ----------------------------------------------------------------------------
    def save_rollout(
        self,
        rollout: pb.Rollout,
        detail: str,
        approvals: list[StoredApproval],
        expected: float | None = None,
    ) -> bool:
        body = rollout.SerializeToString()
        with self.pool.connection() as conn:
            try:
                with conn.transaction():
                    if expected is None:
                        cur = conn.execute(
                            "INSERT INTO rollouts (id, started_at, updated_at, body, detail) "
                            "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
                            (rollout.id, rollout.started_at, rollout.updated_at, body, detail),
                        )
                    else:
                        cur = conn.execute(
                            "UPDATE rollouts SET body = %s, detail = %s, updated_at = %s "
                            "WHERE id = %s AND updated_at = %s",
                            (body, detail, rollout.updated_at, rollout.id, expected),
                        )
                    if cur.rowcount != 1:
                        raise _Stale
                    with conn.cursor() as many:
                        many.executemany(
                            f"INSERT INTO approvals ({APPROVAL_COLUMNS}) "
                            "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (node) DO UPDATE SET "
                            "revision = excluded.revision, rollout_id = excluded.rollout_id, "
                            "wave = excluded.wave, reason = excluded.reason, time = excluded.time",
                            [approval_row(a) for a in approvals],
                        )
            except _Stale:
                return False
        return True

    def load_rollouts(self, limit: int = 20, rollout_id: str = "") -> list[StoredRollout]:
        where, params = ("WHERE id = %s", [rollout_id]) if rollout_id else ("", [])
        with self.pool.connection() as conn:
            rows = conn.execute(
                f"SELECT body, detail FROM rollouts {where} ORDER BY started_at DESC LIMIT %s",
                [*params, max(1, limit)],
            ).fetchall()
        return [rollout_from_row(r) for r in rows]

    def load_approvals(self, node: str = "") -> list[StoredApproval]:
        where, params = ("WHERE node = %s", [node]) if node else ("", [])
        with self.pool.connection() as conn:
            rows = conn.execute(
                f"SELECT {APPROVAL_COLUMNS} FROM approvals {where}", params
            ).fetchall()
        return [StoredApproval(*r) for r in rows]


def _node(row: tuple[Any, ...]) -> StoredNode:
    name, blob, registered_at, last_seen, features, epoch, acked, holder = row
    status = pb.NodeStatus()
    status.ParseFromString(bytes(blob))
    return StoredNode(
        name,
        status,
        registered_at,
        last_seen,
        json.loads(features),
        epoch=epoch,
        acked=int(acked),
        holder=holder,
    )


def open_pool(url: str, timeout: float, max_size: int) -> ConnectionPool[psycopg.Connection[Any]]:
    """A pool of autocommit connections to the store, opened and checked."""
    try:  # one plain connection first: its error says what is wrong, the pool's does not
        psycopg.connect(url, connect_timeout=max(1, int(timeout))).close()
    except psycopg.Error as exc:
        raise StoreUnavailable(f"cannot open the PostgreSQL store: {exc}".strip()) from exc
    pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
        url,
        min_size=1,
        max_size=max_size,
        kwargs={"autocommit": True, "connect_timeout": max(1, int(timeout)), **TCP_OPTIONS},
        timeout=timeout,
        # a connection that died with the server (restart, failover) is replaced
        # before use instead of failing the next write
        check=ConnectionPool.check_connection,
        open=False,
    )
    pool.open(wait=True, timeout=timeout)
    return pool
