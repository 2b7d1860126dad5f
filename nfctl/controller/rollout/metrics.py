"""The rollout engine's Prometheus metrics, on the controller's metrics endpoint.

Gauges describe the newest rollout as the leader last stepped it (each tick, every
`--rollout-tick` seconds) and are computed at scrape time; a replica that is not the
leader exports none of them (no samples rather than stale figures). Counters count what
this replica's engine did while it led: sum them over replicas for the fleet's total."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller.fleet import Fleet
from nfctl.controller.rollout.decide import Decision
from nfctl.controller.rollout.state import Detail

NODE_STATES = ("approved", "applied", "pending")


def result_label(ok: bool | None) -> str:
    return "pass" if ok else "fail" if ok is False else "undecided"


class RolloutMetrics:
    def __init__(
        self, registry: CollectorRegistry, fleet: Fleet, is_leader: Callable[[], bool]
    ) -> None:
        self.fleet = fleet
        self.is_leader = is_leader
        self.halts = Counter(
            "nfctl_rollout_halts_total",
            "Rollouts stopped by a failed gate (rolled back or halted), by gate.",
            ["gate"],
            registry=registry,
        )
        self.evaluations = Counter(
            "nfctl_rollout_gate_evaluations_total",
            "Gate evaluations by gate and result (pass, fail, undecided).",
            ["gate", "result"],
            registry=registry,
        )
        self.current: tuple[pb.Rollout, Detail] | None = None
        self.seen_at = 0.0
        registry.register(_RolloutCollector(self))

    def seen(self, rollout: pb.Rollout, detail: Detail) -> None:
        """The newest rollout as the leader just read or stored it."""
        self.current, self.seen_at = (rollout, detail), time.time()

    def applied(self, decision: Decision) -> None:
        """A step was stored and carried out: count its gate evaluations and halt."""
        for outcome in decision.evaluated:
            self.evaluations.labels(outcome.result.name, result_label(outcome.ok)).inc()
        if decision.halted_by:
            self.halts.labels(decision.halted_by).inc()


def node_counts(rollout: pb.Rollout, detail: Detail, fleet: Fleet) -> dict[str, int]:
    """The rollout's nodes: running its revision (applied), approved it and not yet running
    it (approved), not approved yet (pending). Rolled-back nodes are in none."""
    counts = dict.fromkeys(NODE_STATES, 0)
    back = set(detail.rolled_back)
    for node in detail.approved:
        if node in back:
            continue
        entry = fleet.nodes.get(node)
        applied = entry is not None and entry.status.last_applied_revision == rollout.revision
        counts["applied" if applied else "approved"] += 1
    for wave in rollout.waves:
        counts["pending"] += sum(1 for n in wave.nodes if n not in detail.approved)
    return counts


class _RolloutCollector:
    def __init__(self, metrics: RolloutMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "nfctl_rollout_info",
            "1 for the newest rollout, with its id, revision and state (leader only).",
            labels=["rollout", "revision", "state"],
        )
        wave = GaugeMetricFamily(
            "nfctl_rollout_wave",
            "Index (from 0) of the newest rollout's current wave; = nfctl_rollout_waves "
            "once every wave passed (leader only).",
        )
        waves = GaugeMetricFamily("nfctl_rollout_waves", "Waves of the newest rollout.")
        nodes = GaugeMetricFamily(
            "nfctl_rollout_nodes",
            "Nodes of the newest rollout: applied (running its revision), approved (not yet "
            "running it), pending (not approved yet) (leader only).",
            labels=["state"],
        )
        seen = GaugeMetricFamily(
            "nfctl_rollout_observed_timestamp_seconds",
            "When the leader last read or stepped the newest rollout.",
        )
        current = self.metrics.current
        if current is not None and self.metrics.is_leader():
            rollout, detail = current
            info.add_metric([rollout.id, rollout.revision, rollout.state], 1)
            wave.add_metric([], rollout.current_wave)
            waves.add_metric([], len(rollout.waves))
            for state, count in node_counts(rollout, detail, self.metrics.fleet).items():
                nodes.add_metric([state], count)
            seen.add_metric([], self.metrics.seen_at)
        yield from (info, wave, waves, nodes, seen)
