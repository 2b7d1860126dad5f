"""What the agent-facing and the operator-facing services both hold."""

from __future__ import annotations

from nfctl.controller.auth import AuthPolicy
from nfctl.controller.commands import CommandFanout
from nfctl.controller.fleet import Fleet
from nfctl.controller.metrics import ControllerMetrics
from nfctl.controller.rollout.engine import RolloutEngine


class ServiceBase:
    """The fleet, the authorisation policy, the metrics, the shared command fan-out (several
    replicas: commands go through the store) and the rollout engine (set when the controller
    has --source)."""

    def __init__(
        self,
        fleet: Fleet,
        auth: AuthPolicy,
        metrics: ControllerMetrics,
        fanout: CommandFanout | None = None,
    ) -> None:
        self.fleet = fleet
        self.auth = auth
        self.metrics = metrics
        self.fanout = fanout
        self.rollouts: RolloutEngine | None = None
