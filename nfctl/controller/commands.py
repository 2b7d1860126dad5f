"""Commands across replicas. An operator call or webhook on any replica records the
command in the shared store with its target nodes and NOTIFYs every replica; each replica
delivers it to the targets whose streams it holds, after claiming (command, node) in the
store, so a node gets one command id once even while its stream moves between replicas.

Notifications only say "look": a replica reads every command after the last one it
handled, so one that was missed (listener reconnecting, PostgreSQL restarted) is still
delivered when the listener is back. An agent's answer (CommandResult) marks its delivery
done; when an agent (re)connects, the commands of the last DELIVERY_WINDOW seconds it has
not answered are sent again (its replica may have died with them in flight). The agent
ignores a command id it already executed, so a resend never runs one twice."""

from __future__ import annotations

import asyncio
import logging
import time

import psycopg

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller.fleet import Fleet
from nfctl.controller.node import NodeEntry
from nfctl.controller.store_pg import COMMANDS_CHANNEL, TCP_OPTIONS, PgStore

log = logging.getLogger(__name__)

# how long an unanswered command is sent again to its node when it reconnects: older
# ones are history (a reconcile is made good anyway: agents fetch Git on reconnect)
DELIVERY_WINDOW = 60.0


class CommandFanout:
    """Commands through the shared store, so every replica delivers to the streams it holds
    and each node gets a command once (see the module docstring)."""

    def __init__(self, fleet: Fleet, store: PgStore) -> None:
        self.fleet = fleet
        self.store = store
        self.last_row = store.last_command()
        self.delivered = 0  # commands written to streams of this replica, for tests/metrics
        self.answered: list[tuple[str, str]] = []  # (command id, node), written by run_results

    async def send(
        self, entries: list[NodeEntry], command: pb.Command
    ) -> tuple[list[str], list[str]]:
        """Record and deliver; returns (nodes connected to some replica, offline nodes)."""
        local = [e.name for e in entries if e.session is not None]
        targets = [e.name for e in entries if e.connected]
        offline = [e.name for e in entries if not e.connected]
        message = pb.ControllerMessage(command=command).SerializeToString()
        claimed = await asyncio.to_thread(
            self.store.add_command, command.id, message, targets, local, time.time()
        )
        self._deliver(claimed, message)
        return targets, offline

    def _deliver(self, names: list[str], message: bytes) -> None:
        for name in names:
            entry = self.fleet.nodes.get(name)
            if entry is not None and entry.session is not None:
                entry.session.send(message)
                self.delivered += 1

    def answer(self, command_id: str, node: str) -> None:
        self.answered.append((command_id, node))

    async def redeliver(self, entry: NodeEntry) -> None:
        """A node connected here: send what it has not answered yet."""
        try:
            pending = await asyncio.to_thread(
                self.store.unanswered, entry.name, time.time() - DELIVERY_WINDOW
            )
        except Exception as exc:
            log.warning("node %s: cannot look up unanswered commands: %s", entry.name, exc)
            return
        for command in pending:
            self._deliver([entry.name], command.body)

    async def run_results(self, every: float = 0.5) -> None:
        """Write the agents' answers in batches (a fan-out answers 10,000 at once)."""
        while True:
            await asyncio.sleep(every)
            batch, self.answered = self.answered, []
            try:
                await asyncio.to_thread(self.store.done, batch)
            except Exception as exc:
                log.warning("recording command results failed (%s); will retry", exc)
                self.answered[:0] = batch

    async def catch_up(self) -> None:
        """Deliver every command recorded since the last one handled here."""
        for command in await asyncio.to_thread(self.store.commands_after, self.last_row):
            self.last_row = command.row
            mine = [
                n
                for n in command.nodes
                if (entry := self.fleet.nodes.get(n)) is not None and entry.session is not None
            ]
            if mine:
                claimed = await asyncio.to_thread(self.store.claim, command.command_id, mine)
                self._deliver(claimed, command.body)

    async def run(self, retry: float = 1.0) -> None:
        """LISTEN on a dedicated connection; reconnect (and catch up) when it fails."""
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.store.url, autocommit=True, connect_timeout=5, **TCP_OPTIONS
                ) as conn:
                    await conn.execute(f"LISTEN {COMMANDS_CHANNEL}")
                    await self.catch_up()
                    async for _ in conn.notifies():
                        await self.catch_up()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("command listener: %s; retrying in %.0f s", exc, retry)
            await asyncio.sleep(retry)
