"""Controller metrics: connected/stale agents, nodes by condition, NFs by state and
revision (computed from the fleet at scrape time), RPC latency, webhook deliveries."""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric

from nfctl.controller.fleet import Fleet
from nfctl.controller.staleness import is_stale
from nfctl.wire.convert import is_ready


class ControllerMetrics:
    def __init__(self, fleet: Fleet) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.rpc_seconds = Histogram(
            "nfctl_controller_rpc_duration_seconds",
            "Latency of operator RPCs.",
            ["method", "code"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.webhooks = Counter(
            "nfctl_controller_webhook_deliveries_total",
            "Webhook deliveries by provider and result.",
            ["provider", "result"],
            registry=self.registry,
        )
        self.reports = Counter(
            "nfctl_controller_status_reports_total",
            "Status reports received.",
            registry=self.registry,
        )
        self.events = Counter(
            "nfctl_controller_events_total",
            "Events stored (after de-duplication).",
            registry=self.registry,
        )
        self.commands = Counter(
            "nfctl_controller_commands_total",
            "Commands sent to agents.",
            ["kind"],
            registry=self.registry,
        )
        self.leader = Gauge(
            "nfctl_controller_leader",
            "1 on the replica running the singletons (stale streams, retention), else 0; "
            "1 on a controller that shares its store with no other.",
            registry=self.registry,
        )
        self.registry.register(_FleetCollector(fleet))


class _FleetCollector:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        nodes = list(self.fleet.nodes.values())
        connected = GaugeMetricFamily(
            "nfctl_controller_agents_connected", "Agents with an open stream to this replica."
        )
        connected.add_metric([], sum(1 for n in nodes if n.session is not None))
        stale = GaugeMetricFamily(
            "nfctl_controller_agents_stale", "Nodes with no report within the stale timeout."
        )
        stale.add_metric(
            [], sum(1 for n in nodes if is_stale(n.last_seen, self.fleet.stale_after, now))
        )
        ready = GaugeMetricFamily(
            "nfctl_controller_nodes", "Nodes by Ready condition.", labels=["ready"]
        )
        tally = Tally("true" if is_ready(n.status) else "false" for n in nodes)
        for value in ("true", "false"):
            ready.add_metric([value], tally.get(value, 0))
        functions = GaugeMetricFamily(
            "nfctl_controller_functions",
            "Nodes per NF, state and revision.",
            labels=["nf", "state", "revision", "version"],
        )
        per = Tally(
            (fn.name, fn.state, fn.revision[:12], fn.version)
            for n in nodes
            for fn in n.status.functions
        )
        for (name, state, revision, version), count in sorted(per.items()):
            functions.add_metric([name, state, revision, version], count)
        yield from (connected, stale, ready, functions)
