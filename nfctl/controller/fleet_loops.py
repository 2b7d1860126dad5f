"""The fleet's periodic work on a replica: writing behind to the store, taking in what
other replicas wrote, and a summary log line of agent sessions."""

from __future__ import annotations

import asyncio
import logging

from nfctl.controller.fleet import Fleet
from nfctl.controller.store_pg import PgStore

log = logging.getLogger(__name__)


async def flush_loop(fleet: Fleet, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        try:
            await fleet.flush_async()
        except Exception as exc:
            log.error("writing to the store failed (%s); will retry", exc)


async def sync_loop(fleet: Fleet, store: PgStore, every: float) -> None:
    """Shared store: take in the nodes other replicas wrote, so any replica shows the
    whole fleet."""
    change = 0
    while True:
        try:
            rows, change = await asyncio.to_thread(store.changed_nodes, change)
            fleet.merge(rows)
        except Exception as exc:
            log.warning("reading the fleet from the store failed: %s", exc)
        await asyncio.sleep(every)


async def session_log_loop(fleet: Fleet, every: float = 10.0) -> None:
    """One line per interval instead of one per agent (10,000 agents reconnecting)."""
    seen = (0, 0)
    while True:
        await asyncio.sleep(every)
        now = (fleet.connects, fleet.disconnects)
        if now != seen:
            log.info(
                "agents: %d connected (+%d, -%d in the last %.0f s)",
                sum(1 for e in fleet.nodes.values() if e.session is not None),
                now[0] - seen[0],
                now[1] - seen[1],
                every,
            )
            seen = now
