"""Operators watching events: what each watch wants, and handing new events to them."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb


@dataclass(eq=False)
class Watcher:
    """One operator's WatchEvents stream: its filter and the events queued for it."""

    request: pb.WatchEventsRequest
    queue: asyncio.Queue[pb.Event] = field(default_factory=lambda: asyncio.Queue(maxsize=10_000))

    def wants(self, event: pb.Event) -> bool:
        r = self.request
        return (
            (not r.node or r.node == event.node)
            and (not r.nf or r.nf == event.nf)
            and (not r.reason or r.reason == event.reason)
        )


def publish(watchers: set[Watcher], events: Sequence[pb.Event]) -> None:
    """Queue each event for the watchers that want it; a watcher whose queue is full is
    too slow and is dropped (its stream ends)."""
    for watcher in list(watchers):
        for event in events:
            if watcher.wants(event):
                try:
                    watcher.queue.put_nowait(event)
                except asyncio.QueueFull:
                    watchers.discard(watcher)  # too slow: its stream ends
                    break
