"""One agent's stream as the controller holds it: the session and its outbox of messages."""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from dataclasses import dataclass, field


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
