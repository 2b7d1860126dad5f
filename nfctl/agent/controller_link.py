"""The agent's stream to the controller, in its own thread: register, send status
snapshots (on change, plus a heartbeat) and events (resending what the controller has
not stored), obey commands. Reconnects with jittered backoff; reconciling from Git never
depends on it."""

from __future__ import annotations

import logging
import queue
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from nfctl import __version__
from nfctl.agent.status import Event, NodeStatus
from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.api.nfctl.v1 import nfctl_pb2_grpc as pbg
from nfctl.controller.auth import channel_credentials
from nfctl.controller.convert import event_to_proto, status_to_proto
from nfctl.system import kernel_release

if TYPE_CHECKING:
    from nfctl.agent.config import AgentConfig
    from nfctl.agent.runner import Agent

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 10.0
MAX_BACKOFF_SECONDS = 30.0
_STOP = object()


def bpf_features() -> list[str]:
    features = ["xdp", "tc-clsact", "prog-array-chains"]
    if Path("/sys/kernel/btf/vmlinux").exists():
        features.append("btf")
    return features


class ControllerLink:
    def __init__(self, agent: Agent, config: AgentConfig) -> None:
        self.agent = agent
        self.config = config
        self.outbox: queue.Queue[Any] = queue.Queue()
        self.stopping = threading.Event()
        self.connected = threading.Event()
        self._call: Any = None
        self._thread = threading.Thread(target=self._run, name="controller-link", daemon=True)
        self._last_sent: bytes = b""
        self.heartbeat = HEARTBEAT_SECONDS
        agent.reconciler.listeners.append(self._on_event)
        agent.reconciler.status_listeners.append(self._on_status)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.outbox.put(_STOP)
        if self._call is not None:
            self._call.cancel()
        self._thread.join(timeout=5)

    # -- from the reconciler -------------------------------------------------------------------
    def _on_event(self, event: Event) -> None:
        self.outbox.put(("event", event))

    def _on_status(self, status: NodeStatus) -> None:
        self.outbox.put(("status", None))

    # -- stream ----------------------------------------------------------------------------
    def _channel(self) -> grpc.Channel:
        options = [
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.max_receive_message_length", 16 << 20),
            # commands are a few bytes: no flow-control window probing (each probe is a
            # PING the controller must answer, 10,000 at once on a fleet-wide reconcile)
            ("grpc.http2.bdp_probe", 0),
        ]
        target = self.config.controller or ""
        if self.config.insecure:
            return grpc.insecure_channel(target, options=options)
        creds = channel_credentials(self.config.tls_ca, self.config.tls_cert, self.config.tls_key)
        return grpc.secure_channel(target, creds, options=options)

    def _run(self) -> None:
        failures = 0
        while not self.stopping.is_set():
            try:
                with self._channel() as channel:
                    stub = pbg.AgentServiceStub(channel)
                    self._call = stub.Connect(self._requests())
                    for message in self._call:
                        failures = 0
                        self._handle(message)
            except grpc.RpcError as exc:
                if not self.stopping.is_set():
                    code = exc.code() if hasattr(exc, "code") else None
                    log.warning(
                        "controller stream ended: %s %s",
                        code,
                        getattr(exc, "details", lambda: "")(),
                    )
            except Exception:
                log.exception("controller link failed")
            finally:
                self.connected.clear()
                self._call = None
            if self.stopping.is_set():
                break
            failures += 1
            delay = min(MAX_BACKOFF_SECONDS, 0.5 * 2 ** min(failures, 8)) * random.uniform(0.5, 1.0)
            self.stopping.wait(delay)

    def _status(self) -> pb.StatusReport:
        return pb.StatusReport(status=status_to_proto(self.agent.reconciler.status))

    def _requests(self) -> Iterator[pb.AgentMessage]:
        store = self.agent.store
        events = store.events()
        yield pb.AgentMessage(
            register=pb.Register(
                node=self.config.node,
                labels=self.agent.reconciler.settings.labels,
                kernel=kernel_release(),
                bpf_features=bpf_features(),
                agent_version=__version__,
                last_event_sequence=events[-1].sequence if events else 0,
            )
        )
        self._last_sent = b""
        yield from self._maybe_status(force=True)
        while not self.stopping.is_set():
            try:
                item = self.outbox.get(timeout=self.heartbeat)
            except queue.Empty:
                yield from self._maybe_status(force=True)
                continue
            if item is _STOP:
                return
            kind, payload = item
            if kind == "status":
                yield from self._maybe_status(force=False)
            elif kind == "event":
                yield pb.AgentMessage(events=pb.EventReport(events=[event_to_proto(payload)]))
            elif kind == "resend":
                backlog = [event_to_proto(e) for e in store.events(since=payload)]
                for start in range(0, len(backlog), 200):
                    yield pb.AgentMessage(
                        events=pb.EventReport(events=backlog[start : start + 200])
                    )
            elif kind == "result":
                yield pb.AgentMessage(result=payload)

    def _maybe_status(self, force: bool) -> Iterator[pb.AgentMessage]:
        report = self._status()
        comparable = pb.NodeStatus()
        comparable.CopyFrom(report.status)
        comparable.observed_at = 0
        blob = comparable.SerializeToString(deterministic=True)
        if force or blob != self._last_sent:
            self._last_sent = blob
            yield pb.AgentMessage(status=report)

    def _handle(self, message: pb.ControllerMessage) -> None:
        kind = message.WhichOneof("body")
        if kind == "registered":
            if message.registered.heartbeat_seconds > 0:
                self.heartbeat = min(HEARTBEAT_SECONDS, message.registered.heartbeat_seconds)
            self.connected.set()
            log.info(
                "connected to controller %s (session %s)",
                self.config.controller,
                message.registered.session_id,
            )
            self.outbox.put(("resend", message.registered.acked_event_sequence))
        elif kind == "command":
            self.outbox.put(("result", self._execute(message.command)))

    def _execute(self, command: pb.Command) -> pb.CommandResult:
        action = command.WhichOneof("action")
        if action == "reconcile":
            why = command.reconcile.reason or "controller"
            rev = command.reconcile.revision[:12]
            log.info("controller: reconcile now (%s%s)", why, f", revision {rev}" if rev else "")
            self.agent.request_sync()
            return pb.CommandResult(command_id=command.id, ok=True, message="reconcile scheduled")
        if action == "suspend":
            nf = command.suspend.nf or None
            current = self.agent.store.set_suspended(nf, command.suspend.suspended)
            verb = "suspended" if command.suspend.suspended else "resumed"
            self.agent.reconciler.event(
                verb.capitalize(), f"{'NF ' + nf if nf else 'node'} {verb} by the controller", nf=nf
            )
            self.agent.request_sync()
            return pb.CommandResult(
                command_id=command.id, ok=True, message=f"node={current.node} nfs={current.nfs}"
            )
        return pb.CommandResult(
            command_id=command.id, ok=False, message=f"unknown command {action}"
        )
