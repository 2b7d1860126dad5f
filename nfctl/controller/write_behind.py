"""Write-behind bookkeeping: which nodes and events go to the store at the next flush.

A status that changed in a way an operator would call a change (see `node.significant`), a
registration or a disconnect is written at the next flush; a report that only refreshes
counters and observed_at (heartbeats: most of the 2,000 reports a second of 10,000 agents)
is written at most every `persist_interval` seconds per node."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller.node import NodeEntry
from nfctl.controller.storage import StoredNode


class WriteBehind:
    """The nodes and events due to be written, and when: significant changes and events at
    the next flush, refreshes within persist_interval (see the module docstring)."""

    def __init__(self, persist_interval: float, replica: str | None = None) -> None:
        self.persist_interval = persist_interval
        # this replica's name when several share the store; None for the only one
        self.replica = replica
        self.events: list[pb.Event] = []  # new events, written at the next flush
        self._dirty: dict[str, NodeEntry] = {}  # to write at the next flush
        # refreshed only (counters, observed_at, last_seen): name -> (entry, since), oldest first
        self._refreshed: OrderedDict[str, tuple[NodeEntry, float]] = OrderedDict()

    def mark_dirty(self, entry: NodeEntry) -> None:
        """Write this node at the next flush."""
        self._dirty[entry.name] = entry
        self._refreshed.pop(entry.name, None)

    def mark_refreshed(self, entry: NodeEntry, now: float) -> None:
        """Write this node within persist_interval (nothing significant changed)."""
        if entry.name not in self._dirty and entry.name not in self._refreshed:
            self._refreshed[entry.name] = (entry, now)

    def forget(self, name: str) -> None:
        """Write nothing of this node: a newer copy is already in the store."""
        self._dirty.pop(name, None)
        self._refreshed.pop(name, None)

    def take(self, everything: bool = False) -> tuple[list[StoredNode], list[pb.Event]]:
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
            nodes.append(e.stored_form((self.replica or "") if e.session is not None else ""))
        events, self.events = self.events, []
        return nodes, events

    def requeue(self, entries: Iterable[NodeEntry], events: list[pb.Event]) -> None:
        """A batch from take could not be written: it goes into the next one."""
        for entry in entries:
            self.mark_dirty(entry)
        self.events[:0] = events
