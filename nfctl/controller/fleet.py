"""The controller's in-memory view of the fleet: nodes, their sessions, event watchers.
Everything operators read comes from here (fast); the store only makes it durable.

Each node's latest status is replaced, never mutated (see `node`). Persistence is
write-behind (see `write_behind`): agents resend their whole state after a controller
restart, events are stored at the next flush and acknowledged to their agent only then
(EventsAck), and a graceful stop writes everything."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Iterable

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller import fleet_queries
from nfctl.controller.event_ledger import EventLedger
from nfctl.controller.node import NodeEntry
from nfctl.controller.session import Session
from nfctl.controller.staleness import heartbeat_interval, is_stale
from nfctl.controller.storage import Store, StoredNode
from nfctl.controller.watchers import Watcher, publish
from nfctl.controller.write_behind import WriteBehind

# NodeEntry is also imported from here by the rollout engine's modules
__all__ = ["Fleet", "NodeEntry"]

log = logging.getLogger(__name__)


class Fleet:
    """The controller's in-memory view of every node: sessions, statuses, events and watchers;
    operators read from it, and it writes behind to the store (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        stale_after: float = 60.0,
        persist_interval: float = 30.0,
        heartbeat: float | None = None,
        replica: str | None = None,
    ) -> None:
        self.store = store
        # this replica's name when several share the store; None for the only one
        self.replica = replica
        self.stale_after = stale_after
        self.heartbeat = heartbeat_interval(stale_after, heartbeat)
        self.nodes: dict[str, NodeEntry] = {}
        self.watchers: set[Watcher] = set()
        self.writes = WriteBehind(persist_interval, replica)
        self._command_ids = itertools.count(1)
        self._ordered: list[NodeEntry] | None = None  # by name; reset when a node is added
        self.connects = 0
        self.disconnects = 0
        for stored in store.load_nodes():
            self.nodes[stored.name] = NodeEntry(
                name=stored.name,
                status=stored.status,
                registered_at=stored.registered_at,
                last_seen=stored.last_seen,
                features=stored.features,
                holder=stored.holder if replica is not None else "",
                events=EventLedger(
                    stored.epoch, received=stored.acked, stored=stored.acked, acked=stored.acked
                ),
            )

    @property
    def pending_events(self) -> list[pb.Event]:
        """Events to write at the next flush (others append theirs: rollouts, leadership)."""
        return self.writes.events

    def merge(self, rows: Iterable[StoredNode]) -> None:
        """Take in nodes other replicas wrote to the shared store (their streams, their
        latest status and acknowledged events). A node whose stream this replica holds,
        or a row this replica wrote itself, is already newest in memory."""
        for row in rows:
            entry = self.nodes.get(row.name)
            if row.holder and row.holder == self.replica:
                continue
            if entry is not None and entry.session is not None:
                continue
            if entry is None:
                entry = NodeEntry(
                    name=row.name,
                    status=row.status,
                    registered_at=row.registered_at,
                    last_seen=row.last_seen,
                )
                self.nodes[row.name] = entry
                self._ordered = None
            elif row.last_seen < entry.last_seen:
                continue
            # what another replica saw later replaces what this one still meant to write
            self.writes.forget(row.name)
            entry.set_status(row.status)
            entry.persisted_key = entry.status_key
            entry.registered_at = row.registered_at
            entry.last_seen = row.last_seen
            entry.features = row.features
            entry.holder = row.holder
            ledger = entry.events
            if ledger.epoch != row.epoch or row.acked >= ledger.received:
                entry.events = EventLedger(
                    row.epoch, received=row.acked, stored=row.acked, acked=row.acked
                )

    # -- agent sessions ------------------------------------------------------------------
    def connect(
        self, register: pb.Register, peer: str
    ) -> tuple[NodeEntry, Session, Session | None]:
        now = time.time()
        entry = self.nodes.get(register.node)
        status = pb.NodeStatus(node=register.node)
        if entry is None:
            entry = NodeEntry(name=register.node, status=status, registered_at=now, last_seen=now)
            self.nodes[register.node] = entry
            self._ordered = None
        else:
            status.CopyFrom(entry.status)
        status.labels.clear()
        status.labels.update(register.labels)
        status.kernel = register.kernel
        status.agent_version = register.agent_version
        entry.set_status(status)
        entry.features = list(register.bpf_features)
        entry.last_seen = now
        ledger = entry.events
        if register.event_epoch != ledger.epoch:
            if ledger.epoch:  # a new event log (state dir wiped): its numbers start again
                entry.events = ledger = EventLedger(register.event_epoch)
            else:  # first epoch-aware registration: same numbers as the stored events
                ledger.epoch = register.event_epoch
        if register.first_event_sequence:
            missing = ledger.skip_to(register.first_event_sequence)
            if missing:
                log.warning(
                    "node %s: %d events were compacted away by the agent before they could "
                    "be sent; continuing from %d",
                    entry.name,
                    missing,
                    register.first_event_sequence,
                )
        ledger.acked = ledger.stored
        self.writes.mark_dirty(entry)
        previous = entry.session
        self.connects += 1
        session = Session(node=register.node, peer=peer)
        entry.session = session
        entry.holder = ""
        return entry, session, previous

    def disconnect(self, entry: NodeEntry, session: Session) -> None:
        session.close()
        self.disconnects += 1
        if entry.session is session:
            entry.session = None
            self.writes.mark_dirty(entry)

    def report_status(self, entry: NodeEntry, status: pb.NodeStatus) -> None:
        """Take over `status` (the received message: no copy); the caller must not touch
        it afterwards."""
        status.node = entry.name  # a node reports only as itself
        now = time.time()
        entry.last_seen = now
        if entry.set_status(status):
            self.writes.mark_dirty(entry)
        else:
            self.writes.mark_refreshed(entry, now)

    def add_events(self, entry: NodeEntry, events: Iterable[pb.Event]) -> list[pb.Event]:
        """New events (by epoch and sequence) are kept and sent to watchers; resends are
        dropped. Nothing is skipped: an event after a gap is kept, and the gap is resent
        from the acknowledged point when the agent reconnects."""
        fresh = []
        ledger = entry.events
        for event in sorted(events, key=lambda e: e.sequence):
            if event.sequence and not ledger.accept(event.sequence):
                continue
            event.node = entry.name
            event.epoch = ledger.epoch
            fresh.append(event)
        entry.last_seen = time.time()
        if fresh:
            self.writes.mark_dirty(entry)  # its acknowledged point is written with the events
            self.writes.events.extend(fresh)
            self.publish(fresh)
        else:
            self.writes.mark_refreshed(entry, entry.last_seen)
        return fresh

    def stored(self, nodes: list[StoredNode]) -> None:
        """A batch from take_dirty is in the database: tell each agent what is stored."""
        for n in nodes:
            entry = self.nodes.get(n.name)
            if entry is None or entry.events.epoch != n.epoch:
                continue
            ledger = entry.events
            ledger.stored = max(ledger.stored, n.acked)
            if entry.session is not None and ledger.stored > ledger.acked:
                ledger.acked = ledger.stored
                ack = pb.ControllerMessage(events_ack=pb.EventsAck(event_sequence=ledger.acked))
                entry.session.send(ack.SerializeToString())

    def publish(self, events: list[pb.Event]) -> None:
        publish(self.watchers, events)

    # -- persistence ---------------------------------------------------------------------
    def take_dirty(self, everything: bool = False) -> tuple[list[StoredNode], list[pb.Event]]:
        """What to write now (see WriteBehind.take)."""
        return self.writes.take(everything)

    def requeue(self, nodes: list[StoredNode], events: list[pb.Event]) -> None:
        """A batch from take_dirty could not be written: it goes into the next one."""
        entries = [self.nodes[n.name] for n in nodes if n.name in self.nodes]
        self.writes.requeue(entries, events)

    def flush(self, everything: bool = False) -> None:
        """Write what is due now, in the caller's thread, and acknowledge stored events."""
        nodes, events = self.take_dirty(everything)
        try:
            self.store.write(nodes, events)
        except BaseException:
            self.requeue(nodes, events)
            raise
        self.stored(nodes)

    async def flush_async(self) -> None:
        """flush() with the write in a worker thread: a slow database never stops the
        event loop (agent streams, heartbeats)."""
        nodes, events = self.take_dirty()
        if not nodes and not events:
            return
        try:
            await asyncio.to_thread(self.store.write, nodes, events)
        except BaseException:
            self.requeue(nodes, events)
            raise
        self.stored(nodes)

    # -- operator queries ------------------------------------------------------------------
    def ordered(self) -> list[NodeEntry]:
        """All entries by name (cached: sorting 10,000 names on every call adds up)."""
        if self._ordered is None or len(self._ordered) != len(self.nodes):
            self._ordered = sorted(self.nodes.values(), key=lambda e: e.name)
        return self._ordered

    def select(self, selector: pb.NodeSelector | None) -> list[NodeEntry]:
        return fleet_queries.select(self.ordered(), self.nodes, selector)

    def stale(self, now: float | None = None) -> list[NodeEntry]:
        now = now or time.time()
        return [e for e in self.nodes.values() if is_stale(e.last_seen, self.stale_after, now)]

    def functions(self, name: str = "") -> list[pb.FunctionSummary]:
        return fleet_queries.function_summaries(self.ordered(), name)

    def next_command_id(self) -> str:
        return f"cmd-{next(self._command_ids)}-{uuid.uuid4().hex[:6]}"
