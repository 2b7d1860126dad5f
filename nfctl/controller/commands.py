"""Commands across replicas. An operator call or webhook on any replica records the
command in the shared store with its target nodes and NOTIFYs every replica; each replica
delivers it to the targets whose streams it holds, after claiming (command, node) in the
store, so a node gets one command id once even while its stream moves between replicas.

Notifications only say "look": a replica reads every command after the last one it
handled, so one that was missed (listener reconnecting, PostgreSQL restarted) is still
delivered when the listener is back. An agent's answer (CommandResult) marks its delivery
done; when an agent (re)connects, the commands of the last DELIVERY_WINDOW seconds it has
not answered are sent again (its replica may have died with them in flight). The agent
ignores a command id it already executed, so a resend never runs one twice.

Each fan-out is timed on every replica that writes it to streams, and logged once its last
stream is written (see Delivery): where the time between an operator's call and the last
agent goes is the first thing to know at 10,000 agents."""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from dataclasses import dataclass, field

import psycopg

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller.fleet import Fleet
from nfctl.controller.node import NodeEntry
from nfctl.controller.store_pg import COMMANDS_CHANNEL, TCP_OPTIONS, PgStore

log = logging.getLogger(__name__)

# how long an unanswered command is sent again to its node when it reconnects: older
# ones are history (a reconcile is made good anyway: agents fetch Git on reconnect)
DELIVERY_WINDOW = 60.0


@dataclass
class Delivery:
    """One command's fan-out on this replica, in wall-clock seconds (`recorded` is the origin
    replica's clock: comparable across replicas as far as their clocks agree)."""

    command_id: str
    recorded: float  # the origin stored it (the operator call or webhook reached it)
    learned: float  # this replica started on it: that call here, or the NOTIFY woke it
    claimed: float = 0.0  # its deliveries claimed in the store
    queued: float = 0.0  # put on every target stream's outbox
    streams: int = 0
    written: list[float] = field(default_factory=list)  # each stream's write completed

    def summary(self) -> str:
        """One log line, offsets in seconds from `recorded` (parsed by
        benchmarks/controller_scale.py: keep the key=value form)."""
        done = sorted(self.written)
        p50 = statistics.median(done) if done else self.queued
        last = done[-1] if done else self.queued
        return (
            f"command fan-out {self.command_id}: streams={self.streams} "
            f"written={len(done)} recorded={self.recorded:.6f} "
            f"relay={self.learned - self.recorded:.4f} claim={self.claimed - self.recorded:.4f} "
            f"queue={self.queued - self.recorded:.4f} write_p50={p50 - self.recorded:.4f} "
            f"write_last={last - self.recorded:.4f}"
        )


class CommandFanout:
    """Commands through the shared store, so every replica delivers to the streams it holds
    and each node gets a command once (see the module docstring)."""

    def __init__(self, fleet: Fleet, store: PgStore) -> None:
        self.fleet = fleet
        self.store = store
        self.last_row = store.last_command()
        self.delivered = 0  # commands written to streams of this replica, for tests/metrics
        self.answered: list[tuple[str, str]] = []  # (command id, node), written by run_results
        # fan-outs with streams still to write, by the id of their one serialized message
        # (the same bytes object goes to every stream); the message is kept so that the id
        # cannot be reused while the entry lives
        self._writing: dict[int, tuple[bytes, Delivery]] = {}
        # nodes this replica claimed for a command it recorded itself: its own NOTIFY of
        # that command need not claim them again (thousands of rows that conflict)
        self._claimed_here: dict[str, set[str]] = {}

    async def send(
        self, entries: list[NodeEntry], command: pb.Command
    ) -> tuple[list[str], list[str]]:
        """Record and deliver; returns (nodes connected to some replica, offline nodes)."""
        local = [e.name for e in entries if e.session is not None]
        targets = [e.name for e in entries if e.connected]
        offline = [e.name for e in entries if not e.connected]
        message = pb.ControllerMessage(command=command).SerializeToString()
        now = time.time()
        delivery = Delivery(command.id, recorded=now, learned=now)
        # before the NOTIFY can wake this replica's own listener
        self._claimed_here[command.id] = set(local)
        try:
            claimed = await asyncio.to_thread(
                self.store.add_command, command.id, message, targets, local, now
            )
        except BaseException:
            self._claimed_here.pop(command.id, None)
            raise
        self._deliver(claimed, message, delivery)
        return targets, offline

    def _deliver(self, names: list[str], message: bytes, delivery: Delivery | None = None) -> None:
        sent = 0
        now = time.time()
        for name in names:
            entry = self.fleet.nodes.get(name)
            if entry is not None and entry.session is not None:
                entry.session.send(message)
                sent += 1
        self.delivered += sent
        if delivery is not None and sent:
            delivery.claimed, delivery.queued, delivery.streams = now, time.time(), sent
            self._expire_timings(delivery.queued)
            self._writing[id(message)] = (message, delivery)

    def written(self, message: bytes) -> None:
        """A stream's handler finished writing `message` (called for every message it
        writes: one dict look-up when it is not a fan-out being timed)."""
        pending = self._writing.get(id(message))
        if pending is None or pending[0] is not message:
            return
        delivery = pending[1]
        delivery.written.append(time.time())
        if len(delivery.written) >= delivery.streams:
            del self._writing[id(message)]
            log.info("%s", delivery.summary())

    def _expire_timings(self, now: float) -> None:
        """Streams that closed before their write never report it: log what was written."""
        for key, (_, delivery) in list(self._writing.items()):
            if now - delivery.queued > DELIVERY_WINDOW:
                del self._writing[key]
                log.info("%s (streams closed before the write)", delivery.summary())

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
        learned = time.time()
        for command in await asyncio.to_thread(self.store.commands_after, self.last_row):
            self.last_row = command.row
            delivery = Delivery(command.command_id, command.created, learned)
            done = self._claimed_here.pop(command.command_id, set())
            mine = [
                n
                for n in command.nodes
                if n not in done
                and (entry := self.fleet.nodes.get(n)) is not None
                and entry.session is not None
            ]
            if mine:
                claimed = await asyncio.to_thread(self.store.claim, command.command_id, mine)
                self._deliver(claimed, command.body, delivery)

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
