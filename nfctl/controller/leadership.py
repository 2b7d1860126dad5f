"""What leading the replicas means (see leader.py for how the leader is chosen): the
singletons the leader runs (releasing nodes whose replica went quiet, event retention),
and the event and metric that say which replica leads."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Protocol

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller.fleet import Fleet
from nfctl.controller.metrics import ControllerMetrics

log = logging.getLogger(__name__)


class SingletonStore(Protocol):
    """What the leader's singletons need of the shared store (PgStore)."""

    def release_stale(self, cutoff: float) -> list[str]: ...

    def expire(self, before: float) -> tuple[int, int]: ...


class Leadership:
    """One replica's part in leadership: `changed` is the election's on_change (event and
    metric), `duty` the singletons' work it runs while this replica leads."""

    def __init__(
        self,
        replica: str,
        fleet: Fleet,
        metrics: ControllerMetrics,
        store: SingletonStore,
        stale_after: float,
        event_retention: float,
    ) -> None:
        self.replica = replica
        self.fleet = fleet
        self.metrics = metrics
        self.store = store
        self.stale_after = stale_after
        self.event_retention = event_retention  # seconds; 0 keeps everything
        self._epoch = uuid.uuid4().hex[:12]
        self._events = 0

    def changed(self, leader: bool) -> None:
        self.metrics.leader.set(1 if leader else 0)
        reason = "LeaderElected" if leader else "LeadershipLost"
        message = (
            f"replica {self.replica} now runs the singletons (stale streams, retention)"
            if leader
            else f"replica {self.replica} no longer leads"
        )
        log.warning("%s", message)
        self._events += 1
        event = pb.Event(
            node=f"controller/{self.replica}",
            epoch=self._epoch,
            sequence=self._events,
            time=time.time(),
            type="Normal" if leader else "Warning",
            reason=reason,
            message=message,
        )
        self.fleet.pending_events.append(event)
        self.fleet.publish([event])

    async def duty(self) -> None:
        now = time.time()
        released = await asyncio.to_thread(self.store.release_stale, now - self.stale_after)
        if released:
            log.warning(
                "%d nodes had no report for %.0f s from the replica holding them: shown as "
                "disconnected",
                len(released),
                self.stale_after,
            )
        if self.event_retention > 0:
            await asyncio.to_thread(self.store.expire, now - self.event_retention)
