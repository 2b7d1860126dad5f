"""The controller's in-memory view of the fleet: nodes, their sessions, event watchers.
Everything operators read comes from here (fast); the store only makes it durable."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller.store import ControllerStore, StoredNode


@dataclass(eq=False)
class Session:
    node: str
    peer: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    commands: asyncio.Queue[pb.Command] = field(default_factory=asyncio.Queue)
    closed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class NodeEntry:
    name: str
    status: pb.NodeStatus
    registered_at: float
    last_seen: float
    features: list[str] = field(default_factory=list)
    session: Session | None = None
    max_event_sequence: int = 0
    dirty: bool = True

    @property
    def connected(self) -> bool:
        return self.session is not None

    def to_proto(self, stale_after: float, now: float | None = None) -> pb.Node:
        now = now or time.time()
        return pb.Node(
            status=self.status,
            connected=self.connected,
            stale=now - self.last_seen > stale_after,
            last_seen=self.last_seen,
            registered_at=self.registered_at,
            peer=self.session.peer if self.session else "",
            bpf_features=self.features,
        )


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
    def __init__(self, store: ControllerStore, stale_after: float = 60.0) -> None:
        self.store = store
        self.stale_after = stale_after
        self.nodes: dict[str, NodeEntry] = {}
        self.watchers: set[Watcher] = set()
        self.pending_events: list[pb.Event] = []
        self._command_ids = itertools.count(1)
        sequences = store.max_sequences()
        for stored in store.load_nodes():
            self.nodes[stored.name] = NodeEntry(
                name=stored.name,
                status=stored.status,
                registered_at=stored.registered_at,
                last_seen=stored.last_seen,
                features=stored.features,
                max_event_sequence=sequences.get(stored.name, 0),
                dirty=False,
            )

    # -- agent sessions ------------------------------------------------------------------
    def connect(
        self, register: pb.Register, peer: str
    ) -> tuple[NodeEntry, Session, Session | None]:
        now = time.time()
        entry = self.nodes.get(register.node)
        if entry is None:
            entry = NodeEntry(
                name=register.node,
                status=pb.NodeStatus(node=register.node),
                registered_at=now,
                last_seen=now,
            )
            self.nodes[register.node] = entry
        entry.status.labels.clear()
        entry.status.labels.update(register.labels)
        entry.status.kernel = register.kernel
        entry.status.agent_version = register.agent_version
        entry.features = list(register.bpf_features)
        entry.last_seen = now
        entry.dirty = True
        previous = entry.session
        session = Session(node=register.node, peer=peer)
        entry.session = session
        return entry, session, previous

    def disconnect(self, entry: NodeEntry, session: Session) -> None:
        session.closed.set()
        if entry.session is session:
            entry.session = None
            entry.dirty = True

    def report_status(self, entry: NodeEntry, status: pb.NodeStatus) -> None:
        entry.status.CopyFrom(status)
        entry.status.node = entry.name  # a node reports only as itself
        entry.last_seen = time.time()
        entry.dirty = True

    def add_events(self, entry: NodeEntry, events: Iterable[pb.Event]) -> list[pb.Event]:
        """New events (by agent sequence) are kept and sent to watchers; resends dropped."""
        fresh = []
        for event in sorted(events, key=lambda e: e.sequence):
            if event.sequence and event.sequence <= entry.max_event_sequence:
                continue
            event.node = entry.name
            entry.max_event_sequence = max(entry.max_event_sequence, event.sequence)
            fresh.append(event)
        entry.last_seen = time.time()
        entry.dirty = True
        if fresh:
            self.pending_events.extend(fresh)
            self.publish(fresh)
        return fresh

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
    def take_dirty(self) -> tuple[list[StoredNode], list[pb.Event]]:
        nodes = []
        for entry in self.nodes.values():
            if entry.dirty:
                entry.dirty = False
                snapshot = pb.NodeStatus()
                snapshot.CopyFrom(entry.status)
                nodes.append(
                    StoredNode(
                        entry.name, snapshot, entry.registered_at, entry.last_seen, entry.features
                    )
                )
        events, self.pending_events = self.pending_events, []
        return nodes, events

    # -- operator queries ------------------------------------------------------------------
    def select(self, selector: pb.NodeSelector | None) -> list[NodeEntry]:
        entries = sorted(self.nodes.values(), key=lambda e: e.name)
        if selector is None or (not selector.labels and not selector.nodes):
            return entries
        names = set(selector.nodes)
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
        for entry in sorted(self.nodes.values(), key=lambda e: e.name):
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
