"""What the rollout engine persists with each rollout besides the proto (`Detail`), and
the vocabulary its modules share: the active states, the event node, figure snapshots."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

from nfctl.controller.rollout.plan import Figures

ACTIVE = ("Progressing", "Paused", "Halted")
EVENT_NODE = "controller/rollout"

Snapshot = dict[str, dict[str, Figures]]  # node -> NF -> (dropped, packets)


class RolloutError(RuntimeError):
    """An operator action that does not apply (no such rollout, wrong state)."""


@dataclass
class Detail:
    """The engine's bookkeeping for one rollout, persisted with it (JSON)."""

    approved: dict[str, int] = field(default_factory=dict)  # node -> wave it got R in
    rolled_back: list[str] = field(default_factory=list)
    rollout_start: Snapshot = field(default_factory=dict)
    wave_start: Snapshot = field(default_factory=dict)
    bake_start: Snapshot = field(default_factory=dict)
    bake_started: float = 0.0
    last_eval: float = 0.0
    events: int = 0  # sequence of the rollout's last event
    policy_revision: str = ""  # the revision whose RolloutPolicy judges this rollout

    def dump(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def load(cls, text: str) -> Detail:
        data = json.loads(text or "{}")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("rollout_start", "wave_start", "bake_start"):
            if key in known:
                known[key] = {
                    n: {nf: (int(f[0]), int(f[1])) for nf, f in per.items()}
                    for n, per in known[key].items()
                }
        return cls(**known)

    def copy(self) -> Detail:
        """A copy a decision may change. Snapshots are replaced whole, never changed in
        place, so they are shared (megabytes at 10,000 nodes)."""
        return replace(self, approved=dict(self.approved), rolled_back=list(self.rolled_back))
