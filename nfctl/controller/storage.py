"""What the controller needs from its database, whichever it is: SQLite (embedded, one
replica, the default) or PostgreSQL (shared by several replicas). `open_store` picks the
backend from `--db`: a postgresql:// URL, or a file path for SQLite."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb


@dataclass
class StoredNode:
    name: str
    status: pb.NodeStatus
    registered_at: float
    last_seen: float
    features: list[str]
    blob: bytes | None = None  # the serialized status, when already at hand
    epoch: str = ""  # the agent's event epoch
    acked: int = 0  # every event of the epoch up to this sequence is stored
    holder: str = ""  # the replica holding the node's stream ('' when none)


@dataclass(frozen=True)
class StoredApproval:
    """The revision the rollout engine approved for a node (one row per node)."""

    node: str
    revision: str
    rollout_id: str
    wave: int
    reason: str
    time: float

    def to_proto(self) -> pb.ApproveRevision:
        return pb.ApproveRevision(
            revision=self.revision, rollout_id=self.rollout_id, wave=self.wave, reason=self.reason
        )


@dataclass(frozen=True)
class StoredRollout:
    rollout: pb.Rollout
    detail: str  # the engine's own bookkeeping (JSON): snapshots, approved nodes


class Store(Protocol):
    def close(self) -> None: ...

    def ping(self) -> None:
        """Raise unless the database answers."""

    def load_nodes(self) -> list[StoredNode]: ...

    def load_node(self, name: str) -> StoredNode | None: ...

    def write(self, nodes: list[StoredNode], events: list[pb.Event]) -> None:
        """One transaction for a batch of node snapshots and new events; events already
        stored (same node, epoch and sequence) are ignored."""

    def history(
        self,
        node: str = "",
        nf: str = "",
        revision: str = "",
        reason: str = "",
        since: float = 0.0,
        until: float = 0.0,
        limit: int = 500,
    ) -> list[pb.Event]: ...

    def save_rollout(
        self, rollout: pb.Rollout, detail: str, approvals: list[StoredApproval]
    ) -> None:
        """One transaction: the rollout's state and the approvals of its step, so a new
        leader never sends an approval twice nor misses one it recorded."""

    def load_rollouts(self, limit: int = 20, rollout_id: str = "") -> list[StoredRollout]:
        """Newest first (or the one with rollout_id)."""

    def load_approvals(self, node: str = "") -> list[StoredApproval]:
        """Every node's approval (or one node's)."""


HISTORY_COLUMNS = (
    "node, sequence, time, type, reason, nf, revision, author, commit_time, message, epoch"
)


def history_query(
    mark: str,
    node: str = "",
    nf: str = "",
    revision: str = "",
    reason: str = "",
    since: float = 0.0,
    until: float = 0.0,
    limit: int = 500,
) -> tuple[str, list[object]]:
    """The audit-trail query both backends run, newest first; mark is the driver's
    parameter placeholder (? or %s). A revision is a prefix: LIKE wildcards in it are
    escaped."""
    clauses: list[str] = []
    params: list[object] = []
    for column, value in (("node", node), ("nf", nf), ("reason", reason)):
        if value:
            clauses.append(f"{column} = {mark}")
            params.append(value)
    if revision:
        clauses.append(f"revision LIKE {mark} ESCAPE '\\'")
        params.append(revision.replace("\\", "\\\\").replace("%", r"\%").replace("_", r"\_") + "%")
    if since:
        clauses.append(f"time >= {mark}")
        params.append(since)
    if until:
        clauses.append(f"time <= {mark}")
        params.append(until)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    sql = f"SELECT {HISTORY_COLUMNS} FROM events {where} ORDER BY time DESC, id DESC LIMIT {mark}"
    return sql, [*params, max(1, min(limit or 500, 10_000))]


def event_row(e: pb.Event) -> tuple[object, ...]:
    """An event as the events table's columns (node, epoch, sequence, time, type, reason,
    nf, revision, author, commit_time, message), for both stores' inserts."""
    return (
        e.node,
        e.epoch,
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


def event_from_row(r: Sequence[Any]) -> pb.Event:
    """A row of history_query as the API's event."""
    return pb.Event(
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
        epoch=r[10],
    )


APPROVAL_COLUMNS = "node, revision, rollout_id, wave, reason, time"


def approval_row(a: StoredApproval) -> tuple[object, ...]:
    return (a.node, a.revision, a.rollout_id, a.wave, a.reason, a.time)


def rollout_from_row(r: Sequence[Any]) -> StoredRollout:
    """(body, detail) of the rollouts table."""
    return StoredRollout(pb.Rollout.FromString(bytes(r[0])), str(r[1]))


class StoreUnavailable(RuntimeError):
    """The database cannot be opened (unreachable, refused, wrong credentials)."""


def is_postgres_url(db: str) -> bool:
    return db.startswith(("postgresql://", "postgres://"))


def open_store(db: str | Path, replica: str = "") -> Store:
    text = str(db)
    if is_postgres_url(text):
        from nfctl.controller.store_pg import PgStore

        return PgStore(text, replica=replica)
    from nfctl.controller.store import ControllerStore

    return ControllerStore(Path(text))
