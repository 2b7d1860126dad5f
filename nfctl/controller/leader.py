"""One leader among replicas for the singletons (stale streams, event retention), chosen
by a PostgreSQL session advisory lock held on a dedicated connection: it is released by
the server when the leader's connection ends (process killed, host gone, network cut),
and any other replica takes it at its next try. The leader checks its connection every
`every` seconds and steps down as soon as it fails."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from nfctl.controller.store_pg import TCP_OPTIONS

log = logging.getLogger(__name__)

LEADER_LOCK = 0x6E66_6374_6C01  # "nfctl\1": pg_try_advisory_lock key


class LeaderElection:
    """Campaign for, hold and give up the replicas' leadership (see the module docstring);
    runs `duty` while leading."""

    def __init__(
        self,
        url: str,
        on_change: Callable[[bool], None],
        duty: Callable[[], Awaitable[None]],
        every: float = 1.0,
    ) -> None:
        self.url = url
        self.on_change = on_change
        self.duty = duty  # the singletons' work, run every `every` seconds while leading
        self.every = every
        self.leader = False

    def _set(self, leader: bool) -> None:
        if leader != self.leader:
            self.leader = leader
            self.on_change(leader)

    async def run(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.url, autocommit=True, connect_timeout=5, **TCP_OPTIONS
                ) as conn:
                    await self._campaign(conn)
            except asyncio.CancelledError:
                self._set(False)
                raise
            except Exception as exc:
                log.warning("leader election: %s", exc)
            self._set(False)
            await asyncio.sleep(self.every)

    async def _campaign(self, conn: psycopg.AsyncConnection[tuple[Any, ...]]) -> None:
        while True:
            if not self.leader:
                cur = await asyncio.wait_for(
                    conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,)), self.every * 5
                )
                row = await cur.fetchone()
                self._set(bool(row and row[0]))
            else:
                # still connected, so still holding the lock
                await asyncio.wait_for(conn.execute("SELECT 1"), self.every * 5)
            if self.leader:
                try:
                    await self.duty()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("leader duty failed: %s", exc)
            await asyncio.sleep(self.every)
