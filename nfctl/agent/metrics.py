"""Prometheus metrics of the agent and NF map counters exported at scrape time, served on
/metrics (the probes have their own local-only port: nfctl.agent.health)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from nfctl.bpf.codec import render_key
from nfctl.datapath.counters import VerdictCounts
from nfctl.wire.status import NFState, NodeStatus

log = logging.getLogger(__name__)

_FAST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class AgentMetrics:
    """The agent's Prometheus registry: reconcile, fetch and compile timings, fetch failures,
    drift, and the NF map values the manifests export (read at scrape time)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)
        r = self.registry
        self.reconcile_seconds = Histogram(
            "nfctl_agent_reconcile_duration_seconds",
            "Duration of a full reconcile (fetch, build, apply).",
            ["result"],
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.fetch_seconds = Histogram(
            "nfctl_agent_git_fetch_duration_seconds",
            "Duration of Git fetches.",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.fetch_failures = Counter(
            "nfctl_agent_git_fetch_failures_total", "Failed Git fetches.", registry=r
        )
        self.compile_seconds = Histogram(
            "nfctl_agent_compile_duration_seconds",
            "Time to compile, verify and load one NF version.",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.functions = Gauge(
            "nfctl_agent_functions",
            "Network functions on this node by state.",
            ["state"],
            registry=r,
        )
        self.function_info = Gauge(
            "nfctl_agent_function_info",
            "One per NF applied on this node, with its version, revision and build.",
            ["nf", "version", "revision", "build", "hook", "state"],
            registry=r,
        )
        self.drift_total = Counter(
            "nfctl_agent_drift_total",
            "Drift found between the kernel and the desired state.",
            ["kind", "action"],
            registry=r,
        )
        self.ready = Gauge("nfctl_agent_ready", "1 when the node is Ready.", registry=r)
        self.shadowed = Gauge(
            "nfctl_agent_shadowed_attach_points",
            "Attach points where another tool's program can end processing before our chain.",
            ["hook"],
            registry=r,
        )
        self.last_status: NodeStatus | None = None

    def fetch(self, seconds: float, ok: bool) -> None:
        self.fetch_seconds.observe(seconds)
        if not ok:
            self.fetch_failures.inc()

    def compile(self, seconds: float) -> None:
        self.compile_seconds.observe(seconds)

    def reconcile(self, seconds: float, ok: bool) -> None:
        self.reconcile_seconds.labels(result="ready" if ok else "not_ready").observe(seconds)

    def drift(self, kind: str, corrected: bool) -> None:
        self.drift_total.labels(kind=kind, action="corrected" if corrected else "detected").inc()

    def update(self, status: NodeStatus) -> None:
        self.last_status = status
        self.ready.set(1 if status.ready else 0)
        counts = {state: 0 for state in NFState}
        self.function_info.clear()
        for nf in status.functions:
            counts[nf.state] += 1
            self.function_info.labels(
                nf=nf.name,
                version=nf.version or "",
                revision=(nf.revision or "")[:12],
                build=(nf.build_hash or "")[:12],
                hook=nf.hook or "",
                state=nf.state.value,
            ).set(1)
        for state, count in counts.items():
            self.functions.labels(state=state.value).set(count)
        shadowed = {
            (ap.interface, ap.hook)
            for nf in status.functions
            for ap in nf.attach_points
            if ap.shadowed_by
        }
        for hook in ("xdp", "tc-ingress", "tc-egress"):
            self.shadowed.labels(hook=hook).set(sum(1 for _, h in shadowed if h == hook))

    def register_exports(self, source: Callable[[], Iterator[ExportedValue]]) -> None:
        self.registry.register(_ExportCollector(source))

    def register_verdicts(self, source: Callable[[], Iterable[VerdictSample]]) -> None:
        self.registry.register(_VerdictCollector(source))


# nf, hook, interface, counts: one attach point's counters, read at scrape time
VerdictSample = tuple[str, str, str, VerdictCounts]


class _VerdictCollector:
    """The per-NF verdict counters kept by the chain wrapper (nfctl.datapath.counters).

    `mode` says whether the verdict was applied (enforce) or only counted (monitor: the
    packet went on as if passed); a series never resets when an NF's version changes."""

    def __init__(self, source: Callable[[], Iterable[VerdictSample]]) -> None:
        self.source = source

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        try:
            samples = list(self.source())
        except Exception:
            log.exception("reading verdict counters failed")
            return
        packets = CounterMetricFamily(
            "nfctl_nf_packets",
            "Packets an NF returned each verdict for, per attach point and mode.",
            labels=["nf", "hook", "interface", "verdict", "mode"],
        )
        errors = CounterMetricFamily(
            "nfctl_nf_chain_errors",
            "Packets after an NF whose tail call to the next NF of the chain failed.",
            labels=["nf", "hook", "interface"],
        )
        for nf, hook, interface, counts in samples:
            for mode, by_verdict in counts.by_mode().items():
                for verdict, value in by_verdict.items():
                    packets.add_metric([nf, hook, interface, verdict, mode], float(value))
            errors.add_metric([nf, hook, interface], float(counts.errors))
        yield packets
        yield errors


ExportedValue = tuple[str, str, str, str, str, str, Any]  # metric, type, help, nf, map, key, value


class _ExportCollector:
    """NF map counters declared in manifests (spec.maps.<m>.export), read at scrape time."""

    def __init__(self, source: Callable[[], Iterator[ExportedValue]]) -> None:
        self.source = source

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        try:
            values = list(self.source())
        except Exception:
            log.exception("reading exported NF maps failed")
            return
        for metric, kind, help_text, nf, map_name, key, value in values:
            family = families.get(metric)
            if family is None:
                name = metric.removesuffix("_total") if kind == "counter" else metric
                cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                family = cls(
                    name,
                    help_text or f"exported from NF map {map_name}",
                    labels=["nf", "map", "key"],
                )
                families[metric] = family
            family.add_metric([nf, map_name, render_key(key)], float(value))
        yield from families.values()


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body = generate_latest(self.server.metrics.registry)
            self._send(200, body, CONTENT_TYPE_LATEST)
        else:
            self._send(404, b"not found\n", "text/plain")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], metrics: AgentMetrics) -> None:
        super().__init__(address, _Handler)
        self.metrics = metrics


def parse_address(text: str, default_port: int) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not _:
        return text or "0.0.0.0", default_port
    return host or "0.0.0.0", int(port)


def serve(address: str, metrics: AgentMetrics) -> ThreadingHTTPServer:
    server = _Server(parse_address(address, 9101), metrics)
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return server
