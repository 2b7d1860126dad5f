"""Which events of one agent the controller has received, stored and acknowledged."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EventLedger:
    """Which events of one agent epoch the controller has: `received` is the highest
    sequence up to which every event was accepted (a later one that arrives first waits in
    `above`); `stored` the same for what is in the database; `acked` what the agent was
    told. A resend of anything at or below `received`, or in `above`, is a duplicate."""

    epoch: str
    received: int = 0
    stored: int = 0
    acked: int = 0
    above: set[int] = field(default_factory=set)
    lost: int = 0  # sequences the agent no longer had when it could send them

    def accept(self, sequence: int) -> bool:
        """True for an event not seen before; advances `received` over what is complete."""
        if sequence <= self.received or sequence in self.above:
            return False
        self.above.add(sequence)
        while self.received + 1 in self.above:
            self.received += 1
            self.above.discard(self.received)
        return True

    def skip_to(self, first_available: int) -> int:
        """The agent's log starts at first_available: what is missing below it can never
        come. Returns how many sequences are given up."""
        floor = first_available - 1
        if floor <= self.received:
            return 0
        missing = sum(1 for s in range(self.received + 1, floor + 1) if s not in self.above)
        self.above = {s for s in self.above if s > floor}
        self.received = floor
        while self.received + 1 in self.above:
            self.received += 1
            self.above.discard(self.received)
        self.lost += missing
        return missing
