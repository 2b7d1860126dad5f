"""The controller's in-memory view of the fleet: nodes, their sessions, event watchers.
Everything operators read comes from here (fast); the store only makes it durable.

A node's status message is never changed after it is stored in its entry: a new report
(or a registration) replaces it. That keeps reports cheap (no copy; python-protobuf's upb
arenas never give back memory when one message is overwritten again and again), lets the
flush thread read a snapshot without copying, and lets the serialized form be cached.

Persistence is write-behind. A status that changed in a way an operator would call a
change (see `significant`), a registration or a disconnect is written at the next flush;
a report that only refreshes counters and observed_at (heartbeats: most of the 2,000
reports a second of 10,000 agents) is written at most every `persist_interval` seconds per
node. Agents resend their whole state after a controller restart, events are stored at the
next flush and acknowledged to their agent only then (EventsAck), and a graceful stop writes
everything."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller.storage import Store, StoredNode

log = logging.getLogger(__name__)

# A node is stale after missing this many heartbeats in a row (by default the heartbeat is
# stale_after divided by it): one late or lost message never makes a healthy node stale.
HEARTBEATS_PER_STALE = 3


class Outbox:
    """What to send on one agent stream: serialized ControllerMessages, then None when the
    session ends. A deque and one future: half the cost of an asyncio.Queue per message,
    which counts when a fan-out wakes 10,000 streams at once."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[bytes | None] = deque()
        self._waiter: asyncio.Future[bytes | None] | None = None

    def put(self, item: bytes | None) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(item)
        else:
            self._items.append(item)

    async def get(self) -> bytes | None:
        if self._items:
            return self._items.popleft()
        self._waiter = asyncio.get_running_loop().create_future()
        return await self._waiter


@dataclass(eq=False)
class Session:
    """One agent stream. Its handler waits on `outbox` alone: messages to send, or None
    once the session is closed (a newer stream of the node, or the agent went away)."""

    node: str
    peer: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    outbox: Outbox = field(default_factory=Outbox)
    closed: bool = False

    def send(self, message: bytes) -> None:
        """Queue a serialized ControllerMessage."""
        if not self.closed:
            self.outbox.put(message)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.outbox.put(None)


@dataclass
class EventLedger:
    """Which events of one agent epoch the controller has: `received` is the highest
    sequence up to which every event was accepted (a later one that arrives first waits in
    `above`); `stored` the same for what is in the database; `acked` what the agent was
    told. A resend of anything at or below `received`, or in `above`, is a duplicate."""

    epoch: str
    received: int = 0
    stored: int = 0
    acked: int = 0
    above: set[int] = field(default_factory=set)
    lost: int = 0  # sequences the agent no longer had when it could send them

    def accept(self, sequence: int) -> bool:
        """True for an event not seen before; advances `received` over what is complete."""
        if sequence <= self.received or sequence in self.above:
            return False
        self.above.add(sequence)
        while self.received + 1 in self.above:
            self.received += 1
            self.above.discard(self.received)
        return True

    def skip_to(self, first_available: int) -> int:
        """The agent's log starts at first_available: what is missing below it can never
        come. Returns how many sequences are given up."""
        floor = first_available - 1
        if floor <= self.received:
            return 0
        missing = sum(1 for s in range(self.received + 1, floor + 1) if s not in self.above)
        self.above = {s for s in self.above if s > floor}
        self.received = floor
        while self.received + 1 in self.above:
            self.received += 1
            self.above.discard(self.received)
        self.lost += missing
        return missing


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

    def _node_fields(self, stale_after: float, now: float) -> pb.Node:
        return pb.Node(
            connected=self.connected,
            stale=now - self.last_seen > stale_after,
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
            + _varint(len(blob))
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


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def repeated_field(number: int, items: Iterable[bytes]) -> bytes:
    """Serialized messages as a repeated message field `number` (wire type 2)."""
    tag = _varint(number << 3 | 2)
    return b"".join(tag + _varint(len(item)) + item for item in items)


@dataclass(eq=False)
class Watcher:
    request: pb.WatchEventsRequest
    queue: asyncio.Queue[pb.Event] = field(default_factory=lambda: asyncio.Queue(maxsize=10_000))

    def wants(self, event: pb.Event) -> bool:
        r = self.request
        return (
            (not r.node or r.node == event.node)
            and (not r.nf or r.nf == event.nf)
            and (not r.reason or r.reason == event.reason)
        )


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
        self.heartbeat = heartbeat or stale_after / HEARTBEATS_PER_STALE
        self.persist_interval = persist_interval
        self.nodes: dict[str, NodeEntry] = {}
        self.watchers: set[Watcher] = set()
        self.pending_events: list[pb.Event] = []
        self._command_ids = itertools.count(1)
        self._ordered: list[NodeEntry] | None = None  # by name; reset when a node is added
        self.connects = 0
        self.disconnects = 0
        self._dirty: dict[str, NodeEntry] = {}  # to write at the next flush
        # refreshed only (counters, observed_at, last_seen): name -> (entry, since), oldest first
        self._refreshed: OrderedDict[str, tuple[NodeEntry, float]] = OrderedDict()
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
            self._dirty.pop(row.name, None)
            self._refreshed.pop(row.name, None)
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

    def mark_dirty(self, entry: NodeEntry) -> None:
        """Write this node at the next flush."""
        self._dirty[entry.name] = entry
        self._refreshed.pop(entry.name, None)

    def mark_refreshed(self, entry: NodeEntry, now: float) -> None:
        """Write this node within persist_interval (nothing significant changed)."""
        if entry.name not in self._dirty and entry.name not in self._refreshed:
            self._refreshed[entry.name] = (entry, now)

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
        self.mark_dirty(entry)
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
            self.mark_dirty(entry)

    def report_status(self, entry: NodeEntry, status: pb.NodeStatus) -> None:
        """Take over `status` (the received message: no copy); the caller must not touch
        it afterwards."""
        status.node = entry.name  # a node reports only as itself
        now = time.time()
        entry.last_seen = now
        if entry.set_status(status):
            self.mark_dirty(entry)
        else:
            self.mark_refreshed(entry, now)

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
            self.mark_dirty(entry)  # its acknowledged point is written with the events
            self.pending_events.extend(fresh)
            self.publish(fresh)
        else:
            self.mark_refreshed(entry, entry.last_seen)
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
        for watcher in list(self.watchers):
            for event in events:
                if watcher.wants(event):
                    try:
                        watcher.queue.put_nowait(event)
                    except asyncio.QueueFull:
                        self.watchers.discard(watcher)  # too slow: its stream ends
                        break

    # -- persistence ---------------------------------------------------------------------
    def take_dirty(self, everything: bool = False) -> tuple[list[StoredNode], list[pb.Event]]:
        """What to write now: node snapshots (significant changes, refreshes older than
        persist_interval, or every change with `everything`) and new events. Statuses are
        replaced, never mutated, so the flush thread can read them without a copy."""
        changed, self._dirty = self._dirty, {}
        refreshed, cutoff = self._refreshed, time.time() - self.persist_interval
        while refreshed:
            name, (entry, since) = next(iter(refreshed.items()))
            if since > cutoff and not everything:
                break
            refreshed.popitem(last=False)
            changed.setdefault(name, entry)
        nodes = []
        for e in changed.values():
            e.persisted_key = e.status_key
            nodes.append(
                StoredNode(
                    e.name,
                    e.status,
                    e.registered_at,
                    e.last_seen,
                    e.features,
                    e._blob,
                    epoch=e.events.epoch,
                    acked=e.events.received,
                    holder=(self.replica or "") if e.session is not None else "",
                )
            )
        events, self.pending_events = self.pending_events, []
        return nodes, events

    def requeue(self, nodes: list[StoredNode], events: list[pb.Event]) -> None:
        """A batch from take_dirty could not be written: it goes into the next one."""
        for n in nodes:
            entry = self.nodes.get(n.name)
            if entry is not None:
                self.mark_dirty(entry)
        self.pending_events[:0] = events

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
        if selector is None or (not selector.labels and not selector.nodes):
            return list(self.ordered())
        names = set(selector.nodes)
        if not selector.labels:  # by name only: look them up
            return [self.nodes[name] for name in sorted(names) if name in self.nodes]
        entries = self.ordered()
        labels = dict(selector.labels)
        out = []
        for entry in entries:
            by_name = entry.name in names
            by_labels = bool(labels) and all(
                entry.status.labels.get(k) == v for k, v in labels.items()
            )
            if by_name or by_labels:
                out.append(entry)
        return out

    def stale(self, now: float | None = None) -> list[NodeEntry]:
        now = now or time.time()
        return [e for e in self.nodes.values() if now - e.last_seen > self.stale_after]

    def functions(self, name: str = "") -> list[pb.FunctionSummary]:
        summaries: dict[str, pb.FunctionSummary] = {}
        versions: dict[tuple[str, str, str, str], pb.FunctionVersion] = {}
        for entry in self.ordered():
            for fn in entry.status.functions:
                if name and fn.name != name:
                    continue
                summary = summaries.get(fn.name)
                if summary is None:
                    summary = pb.FunctionSummary(name=fn.name)
                    summaries[fn.name] = summary
                summary.nodes += 1
                key = (fn.name, fn.version, fn.revision, fn.build_hash)
                version = versions.get(key)
                if version is None:
                    version = summary.versions.add(
                        version=fn.version, revision=fn.revision, build_hash=fn.build_hash
                    )
                    versions[key] = version
                version.nodes += 1
                version.states[fn.state] = version.states.get(fn.state, 0) + 1
                if fn.state in ("Failed", "Degraded", "Pending"):
                    failure = summary.failing.add(node=entry.name, state=fn.state)
                    if fn.HasField("last_error"):
                        failure.error.CopyFrom(fn.last_error)
        return [summaries[k] for k in sorted(summaries)]

    def next_command_id(self) -> str:
        return f"cmd-{next(self._command_ids)}-{uuid.uuid4().hex[:6]}"
