"""The agent process: timers, signals, interface events, metrics server, lock.

SIGTERM/SIGINT: exit without touching the datapath (programs stay attached).
SIGHUP: reconcile now (also sent by `nfctl reconcile --local` and `nfctl suspend`).

`--once` (run_once) with a controller: the node may run only an approved revision, as the
long-running agent: a fresh approval from the controller if one arrives within
APPROVAL_WAIT_SECONDS, else the one persisted in the state dir (fail-static), else none
and the node stays on the revision it runs.
"""

from __future__ import annotations

import logging
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from nfctl import kernel_headers
from nfctl.agent.config import AgentConfig
from nfctl.agent.health import Heartbeat, serve_health
from nfctl.agent.k8s_node import KubeApi, NodeClient, NodeLabelWatcher
from nfctl.agent.metrics import AgentMetrics, ExportedValue, VerdictSample, serve
from nfctl.agent.reconcile.kernel import KernelDatapath
from nfctl.agent.reconciler import AgentSettings, Reconciler
from nfctl.agent.source import GitSource, Revision, SourceSettings, redact
from nfctl.agent.store import StateStore
from nfctl.builder.dispatcher import compile_dispatcher
from nfctl.compiler.client import standby as compile_standby
from nfctl.datapath.datapath import Datapath
from nfctl.datapath.dispatcher import TcSettings
from nfctl.nftest.build import reap_stale_scratch
from nfctl.wire.status import ConditionType

if TYPE_CHECKING:
    from nfctl.agent.approval import ApprovalGate
    from nfctl.agent.controller_link import ControllerLink

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 300.0
# --once under a rollout policy: how long to wait for the controller's answer (Registered
# carries this node's approval) before using the approval persisted in the state dir
APPROVAL_WAIT_SECONDS = 10.0
# --once: how long the controller gets to store this pass's events before the link closes
FLUSH_SECONDS = 3.0


@dataclass(frozen=True)
class OnceResult:
    """What one `nfctl agent --once` pass did."""

    ready: bool
    # under a rollout policy, no approved revision to apply: why (the node stayed where it was)
    unapproved: str | None = None


class Agent:
    """One node agent process: owns the state folder, datapath, Git source, reconciler,
    metrics and controller link, and drives them from timers, signals and interface events."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.store = StateStore(config.state_dir)
        self.metrics = AgentMetrics()
        self.datapath = Datapath(
            config.bpffs_dir,
            config.state_dir,
            tc_settings=TcSettings(prio=config.tc_priority),
            dispatcher_compiler=compile_dispatcher,
        )
        self.source = GitSource(
            SourceSettings(
                url=config.repo,
                ref=config.ref,
                timeout=config.timeout,
                https_token_file=config.https_token_file,
                ssh_key_file=config.ssh_key_file,
                verify_signatures=config.verify_signatures,
                trusted_keys=config.trusted_keys,
            ),
            config.state_dir,
        )
        kernel = KernelDatapath(self.datapath)
        self.reconciler = Reconciler(
            AgentSettings(
                node=config.node,
                labels=config.all_labels(),
                repo_url=config.repo,
                ref=config.ref,
                path=config.path,
                drift_mode=config.drift,
                verify_signatures=config.verify_signatures,
            ),
            kernel,
            kernel,
            self.source,
            self.store,
            self.metrics,
        )
        self.metrics.register_exports(self._exports)
        self.metrics.register_verdicts(self._verdicts)
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.sync_requested = threading.Event()
        self.links_changed = threading.Event()
        self._failures = 0
        self._suspend_mtime = 0.0
        self.controller: Any = None
        self.heartbeat = Heartbeat(config.liveness_stall)
        self.adopted = threading.Event()  # the first pass since start has completed
        self.node_watcher: NodeLabelWatcher | None = None
        self.labels_known = threading.Event()
        if config.kube_node_labels:
            self.node_watcher = NodeLabelWatcher(
                NodeClient(self._kube_api(), config.node), self.set_node_labels
            )
        else:
            self.labels_known.set()

    def _kube_api(self) -> KubeApi:
        api = KubeApi.in_cluster(self.config.kube_api)
        return KubeApi(
            api.url,
            self.config.kube_token_file or api.token_file,
            self.config.kube_ca_file or api.ca_file,
        )

    def set_node_labels(self, node_labels: dict[str, str]) -> None:
        """New labels on our Node: re-plan (NFs whose nodeSelector now matches are attached,
        the others detached). Flags and the labels file still win over the Node's labels."""
        labels = {**node_labels, **self.config.all_labels()}
        with self.reconciler.lock:  # not in the middle of a pass; events stay in order
            old = self.reconciler.settings.labels
            self.reconciler.settings.labels = labels
            self.reconciler.status.labels = dict(labels)
            if labels != old and self.labels_known.is_set():
                changes = sorted(
                    f"{k}={old.get(k, '')}->{labels.get(k, '')}"
                    for k in old.keys() | labels.keys()
                    if old.get(k) != labels.get(k)
                )
                self.reconciler.event(
                    "NodeLabelsChanged", f"node labels changed ({', '.join(changes)}): re-planning"
                )
        self.labels_known.set()
        self.request_sync()

    # -- triggers ----------------------------------------------------------------------
    def request_sync(self) -> None:
        self.sync_requested.set()
        self.wake.set()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            log.info("SIGHUP: reconciling now")
            self.request_sync()
        else:
            log.info("signal %d: exiting; attached programs stay in place", signum)
            self.stop()

    def _watch_links(self) -> None:
        """Interfaces that appear or vanish are reconciled at once, not at the next tick."""
        try:
            from pyroute2 import IPRoute
            from pyroute2.netlink.rtnl import RTMGRP_LINK

            with IPRoute() as ipr:
                ipr.bind(groups=RTMGRP_LINK)
                while not self.stopping.is_set():
                    for msg in ipr.get():
                        if msg.get("event") in ("RTM_NEWLINK", "RTM_DELLINK"):
                            self.links_changed.set()
                            self.wake.set()
        except Exception as exc:  # polling in the drift loop still catches changes
            log.debug("link watcher stopped: %s", exc)

    # -- exported NF counters ----------------------------------------------------------------
    def _verdicts(self) -> Iterator[VerdictSample]:
        for key, counts in self.datapath.verdict_counts().items():
            try:
                interface = socket.if_indextoname(key.ifindex)
            except OSError:
                interface = f"ifindex-{key.ifindex}"  # the interface is gone
            yield key.nf, key.hook.value, interface, counts

    def _exports(self) -> Iterator[ExportedValue]:
        for name, applied in list(self.reconciler.applied.items()):
            nf = applied.nf
            loaded = self.reconciler.loaded.get(name)
            if loaded is None:
                continue
            percpu = {m.name for m in loaded.record.maps if "percpu" in m.map_type.lower()}
            for map_name, spec in nf.spec.maps.items():
                if not spec.export:
                    continue
                for key, value in self.datapath.map_entries(loaded, map_name):
                    for export in spec.export:
                        number = _export_number(value, export.field, map_name in percpu)
                        if number is not None:
                            yield (
                                export.metric,
                                export.type,
                                export.help,
                                name,
                                map_name,
                                key,
                                number,
                            )

    # -- loop ------------------------------------------------------------------------------
    def readiness(self) -> tuple[bool, str]:
        if not self.labels_known.is_set():
            return False, "waiting for this node's labels from the Kubernetes API"
        if not self.adopted.is_set():
            return False, "adopting the datapath (first reconcile since start)"
        status = self.reconciler.status
        cond = next((c for c in status.conditions if c.type.value == "Ready"), None)
        detail = f"; Ready={cond.status} {cond.reason}: {cond.message}" if cond else ""
        return True, "datapath adopted" + detail

    def _next_interval(self) -> float:
        """The next fetch: one interval after this pass started; after a failed fetch a
        quick retry instead (1 s, doubling up to 5 min) with wide jitter, so a fleet that
        hit a busy Git server at once does not come back at once."""
        if self.reconciler.source_error is not None and self._failures > 0:
            retry = min(self.config.interval, 1.0) * 2.0 ** min(self._failures - 1, 16)
            return min(MAX_BACKOFF_SECONDS, retry) * random.uniform(0.8, 1.2)
        base = self.config.interval
        return base * (1 + random.uniform(-self.config.jitter, self.config.jitter))

    def run_once(self) -> OnceResult:
        if self.node_watcher is not None:
            labels, _ = self.node_watcher.client.get()
            self.set_node_labels(labels)
        self.store.lock()
        link: ControllerLink | None = None
        try:
            if not self.config.controller:
                return OnceResult(self.reconciler.sync())
            link, gate, gated = self._once_link()
            link.start()
            ready = self.reconciler.sync()
            self._flush(link)
            return OnceResult(ready, self._unapproved(link, gate) if gated.is_set() else None)
        finally:
            if link is not None:
                link.stop()
            self.store.unlock()
            self.datapath.close()
            self.source.close()

    def _once_link(self) -> tuple[ControllerLink, ApprovalGate, threading.Event]:
        """The controller link for one pass, and the approval gate waiting (only when a
        rollout policy is in force) for the controller's answer before it decides.
        The event is set when the gate decided under a policy."""
        from nfctl.agent.controller_link import ControllerLink
        from nfctl.agent.link_port import AgentPort

        port = AgentPort(self)
        link = ControllerLink(port, port, self.config)
        gate = port.approvals
        gated = threading.Event()

        def decide(fetched: Revision | None) -> Revision | None:
            running = self.reconciler.status.last_applied_revision
            if gate.has_policy(fetched.sha if fetched else None) or gate.has_policy(running):
                gated.set()
                if not link.connected.wait(APPROVAL_WAIT_SECONDS):
                    log.warning(
                        "controller %s did not answer within %.0f s: using the approval "
                        "persisted in %s, if any",
                        self.config.controller,
                        APPROVAL_WAIT_SECONDS,
                        self.store.dir,
                    )
            return gate(fetched)

        self.reconciler.revision_gate = decide
        return link, gate, gated

    def _unapproved(self, link: ControllerLink, gate: ApprovalGate) -> str | None:
        if gate.held_revision is not None:
            return None
        cond = next(
            (c for c in self.reconciler.status.conditions if c.type is ConditionType.APPROVED),
            None,
        )
        if link.sessions > 0:
            answer = f"controller {link.endpoint} had no approval node {self.config.node} may take"
        else:
            answer = f"controller unreachable within {APPROVAL_WAIT_SECONDS:.0f} s"
        why = cond.message if cond is not None else "rollout policy in force"
        return f"{why}; {answer}, and none is persisted in {self.store.dir}"

    def _flush(self, link: ControllerLink) -> None:
        """The controller sees what this pass did (events, then the status after them)."""
        if not link.connected.is_set():
            return
        events = self.store.events()
        last = events[-1].sequence if events else 0
        deadline = time.monotonic() + FLUSH_SECONDS
        while link.acked_event_sequence < last and time.monotonic() < deadline:
            time.sleep(0.05)

    def run(self) -> None:
        self.store.lock()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        for folder in reap_stale_scratch():
            log.info("removed %s: test scratch pins of a process that died", folder)
        headers = kernel_headers.activate()
        if headers.fallback:
            self.reconciler.event("KernelHeadersFallback", headers.message, warning=True)
        http = serve(self.config.metrics_addr, self.metrics) if self.config.metrics_addr else None
        health = (
            serve_health(self.config.health_addr, self.heartbeat.alive, self.readiness)
            if self.config.health_addr
            else None
        )
        if self.node_watcher is not None:
            self.node_watcher.start()
        threading.Thread(target=self._watch_links, name="link-watch", daemon=True).start()
        if self.config.compile_standby:
            compile_standby.enable()  # a worker with BCC loaded waits for the next commit
        if self.config.controller:
            from nfctl.agent.controller_link import ControllerLink
            from nfctl.agent.link_port import AgentPort

            port = AgentPort(self)
            self.controller = ControllerLink(port, port, self.config)
            self.controller.start()
        log.info(
            "agent %s: %s %s path %s every %.1fs, drift %s",
            self.config.node,
            redact(self.source.settings.url),
            self.config.ref,
            self.config.path,
            self.config.interval,
            self.config.drift,
        )
        next_sync = 0.0
        next_drift = time.monotonic() + self.config.drift_interval
        try:
            while not self.stopping.is_set():
                self.heartbeat.beat()
                now = time.monotonic()
                if not self.labels_known.is_set():
                    pass  # planning without the Node's labels would detach selected NFs
                elif self.sync_requested.is_set() or now >= next_sync or self._suspend_changed():
                    self.sync_requested.clear()
                    self._guarded(self.reconciler.sync)
                    self.adopted.set()
                    self._failures = self._failures + 1 if self.reconciler.source_error else 0
                    # every interval from the start of a pass, not from its end: a commit
                    # waits at most one interval before a fetch sees it
                    next_sync = max(time.monotonic(), now + self._next_interval())
                    next_drift = time.monotonic() + self.config.drift_interval
                elif self.links_changed.is_set() or now >= next_drift:
                    self.links_changed.clear()
                    self._guarded(self.reconciler.check_drift)
                    next_drift = time.monotonic() + self.config.drift_interval
                timeout = max(0.0, min(next_sync, next_drift) - time.monotonic())
                self.wake.wait(timeout=min(timeout, 1.0))
                self.wake.clear()
        finally:
            if self.node_watcher is not None:
                self.node_watcher.stop()
            if self.controller is not None:
                self.controller.stop()
            compile_standby.disable()
            for server in (http, health):
                if server is not None:
                    server.shutdown()
            self.datapath.close()
            self.source.close()
            self.store.unlock()
            log.info("agent stopped")

    def _guarded(self, step: Callable[[], object]) -> None:
        """A bug in one pass must not take the agent (and its reporting) down: the
        datapath keeps running regardless, and the next pass may succeed."""
        try:
            step()
        except Exception as exc:
            log.exception("reconcile pass failed")
            try:
                self.reconciler.event(
                    "InternalError", f"reconcile pass failed: {exc!r}", warning=True
                )
            except Exception:
                log.exception("cannot record the failure")

    def _suspend_changed(self) -> bool:
        path: Path = self.store.dir / "suspend.json"
        try:
            mtime = path.stat().st_mtime
        except OSError:
            mtime = 0.0
        if mtime != self._suspend_mtime:
            self._suspend_mtime = mtime
            return True
        return False


def _export_number(value: Any, field: str | None, percpu: bool) -> int | float | None:
    """The number an export reads from a decoded map value: the value itself or one field
    of a struct; per-CPU maps decode to one value per CPU (summed here)."""
    if percpu and isinstance(value, list):
        parts = [_export_number(v, field, False) for v in value]
        numbers = [p for p in parts if p is not None]
        return sum(numbers) if numbers and len(numbers) == len(parts) else None
    if isinstance(value, dict) and field:
        value = value.get(field)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value
