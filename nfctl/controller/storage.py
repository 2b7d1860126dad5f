"""What the controller needs from its database, whichever it is: SQLite (embedded, one
replica, the default) or PostgreSQL (shared by several replicas). `open_store` picks the
backend from `--db`: a postgresql:// URL, or a file path for SQLite."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

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
