"""Pacing Python's cyclic garbage collector for a process holding thousands of streams."""

from __future__ import annotations

import asyncio
import gc
import logging
import time

log = logging.getLogger(__name__)


async def gc_loop(freeze_interval: float, compact_interval: float) -> None:
    """Keep Python's cyclic GC from stopping every stream for up to a second.

    Each agent stream always has a pending read (about a dozen tracked objects: the
    coroutine, its future, gRPC's batch operation and callback) plus its last status;
    these live for one report interval, so 10,000 agents keep 150,000+ young objects
    that every collection walks (50-400 ms of CPU, then more in full collections of
    the million long-lived objects); a fan-out renews all of them within a second.
    Freezing (O(1)) every 0.1 s hides what exists from the collector, so a collection
    only walks the survivors of the last 0.1 s. Frozen objects are still freed by
    reference counting; only cyclic garbage among them (rare: a few objects per ended
    stream) waits for the compaction: unfreeze, one full collection."""
    gc.freeze()
    last_compaction = time.monotonic()
    while True:
        await asyncio.sleep(freeze_interval)
        if time.monotonic() - last_compaction >= compact_interval:
            start = time.perf_counter()
            gc.unfreeze()
            collected = gc.collect()
            last_compaction = time.monotonic()
            log.info(
                "gc compaction: %d objects collected in %.0f ms",
                collected,
                (time.perf_counter() - start) * 1000,
            )
        gc.freeze()
