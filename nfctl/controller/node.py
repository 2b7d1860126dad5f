"""One node as the controller holds it (its latest status, stream and event bookkeeping),
and what counts as a significant change of its status.

A node's status message is never changed after it is stored in its entry: a new report
(or a registration) replaces it. That keeps reports cheap (no copy; python-protobuf's upb
arenas never give back memory when one message is overwritten again and again), lets the
flush thread read a snapshot without copying, and lets the serialized form be cached."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller.event_ledger import EventLedger
from nfctl.controller.pbwire import varint
from nfctl.controller.session import Session
from nfctl.controller.staleness import is_stale
from nfctl.controller.storage import StoredNode


@dataclass
class NodeEntry:
    """One node as the controller holds it: its latest status (replaced, never mutated), its
    stream if this replica holds it, and the bookkeeping of its events."""

    name: str
    status: pb.NodeStatus
    registered_at: float
    last_seen: float
    features: list[str] = field(default_factory=list)
    session: Session | None = None
    holder: str = ""  # another replica holding the node's stream (shared store only)
    # Event bookkeeping, per agent epoch (see EventLedger)
    events: EventLedger = field(default_factory=lambda: EventLedger(""))
    _blob: bytes | None = field(default=None, repr=False)
    status_key: int | None = field(default=None, repr=False)
    persisted_key: int | None = field(default=None, repr=False)

    @property
    def connected(self) -> bool:
        return self.session is not None or bool(self.holder)

    def set_status(self, status: pb.NodeStatus) -> bool:
        """Replace the status (never mutate the stored one: see the module docstring).
        True when it differs from the last one written to the store in a significant way."""
        self.status = status
        self._blob = None
        self.status_key = significant(status)
        return self.status_key != self.persisted_key

    def status_bytes(self) -> bytes:
        """The serialized status, cached until the next report."""
        blob = self._blob
        if blob is None:
            blob = self._blob = self.status.SerializeToString()
        return blob

    def stored_form(self, holder: str) -> StoredNode:
        """This node as a row of the store, with the serialized status if it is cached."""
        return StoredNode(
            self.name,
            self.status,
            self.registered_at,
            self.last_seen,
            self.features,
            self._blob,
            epoch=self.events.epoch,
            acked=self.events.received,
            holder=holder,
        )

    def _node_fields(self, stale_after: float, now: float) -> pb.Node:
        return pb.Node(
            connected=self.connected,
            stale=is_stale(self.last_seen, stale_after, now),
            last_seen=self.last_seen,
            registered_at=self.registered_at,
            peer=self.session.peer if self.session else "",
            bpf_features=self.features,
        )

    def to_proto(self, stale_after: float, now: float | None = None) -> pb.Node:
        node = self._node_fields(stale_after, now or time.time())
        node.status.CopyFrom(self.status)
        return node

    def to_bytes(self, stale_after: float, now: float) -> bytes:
        """This node as a serialized pb.Node, without building message objects: the
        cached status (field 1, serialized first as protobuf does) + the other fields."""
        blob = self.status_bytes()
        return (
            b"\x0a"
            + varint(len(blob))
            + blob
            + self._node_fields(stale_after, now).SerializeToString()
        )


def significant(status: pb.NodeStatus) -> int:
    """A hash of what an operator would call a change of a node's status: revisions,
    suspension, conditions, and per NF its state, revision, program and suspension; not
    observed_at or live counters (map entries). Labels, kernel and agent version come with a
    registration, which is written anyway. A hash rather than the tuple: 10,000 nested tuples
    would cost ~100 MB and GC time; a collision only delays a write to the next refresh."""
    return hash(
        (
            status.last_applied_revision,
            status.last_attempted_revision,
            status.suspended,
            status.drift_mode,
            tuple((c.type, c.status, c.reason) for c in status.conditions),
            tuple(
                (f.name, f.state, f.revision, f.program_id, f.suspended) for f in status.functions
            ),
        )
    )
