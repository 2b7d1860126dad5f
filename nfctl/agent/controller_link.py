"""The agent's stream to the controller, in its own thread: register, send status
snapshots (on change, plus a heartbeat on a timer of its own) and events, obey commands.
Reconnects with jittered backoff; reconciling from Git never depends on it.

Several controller replicas: `--controller a:9443,b:9443` lists them; the agent starts at
a random one (a fleet spreads over the replicas) and moves to the next whenever a stream
ends or a connection fails. A DNS name with several addresses needs nothing here: gRPC's
resolver tries each address in turn.

Events are delivered at least once and stored exactly once: they are persisted in the
state dir first (the agent's event log is the outbox), each stream sends them from the
point the controller acknowledged as stored (Registered, then EventsAck), and the
controller drops by (node, epoch, sequence) what it already has."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from nfctl import __version__
from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.api.nfctl.v1 import nfctl_pb2_grpc as pbg
from nfctl.system import kernel_release
from nfctl.wire.channel import open_channel
from nfctl.wire.convert import event_to_proto, status_to_proto
from nfctl.wire.status import Event, NodeStatus

if TYPE_CHECKING:
    from nfctl.agent.config import AgentConfig

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 10.0
# Reconnect attempts: 0.25 s doubling, jittered, at most 4 s apart, so an agent is back
# within ~5 s of the controller (the jitter spreads a fleet's reconnect storm).
MAX_BACKOFF_SECONDS = 4.0
EVENT_BATCH = 200


class EventOutbox(Protocol):
    """The agent's persisted event log, numbered within an epoch."""

    @property
    def event_epoch(self) -> str: ...

    def events(self, since: int = 0) -> list[Event]: ...


class StatusProvider(Protocol):
    """What the link reads of the node. `status_snapshot` returns a status the link may
    read at leisure (nobody rewrites it); `subscribe` tells the link when a new status was
    published or an event appended (called from the agent's threads: must not block)."""

    @property
    def outbox(self) -> EventOutbox: ...

    def status_snapshot(self) -> NodeStatus: ...

    def subscribe(self, on_status: Callable[[], None], on_event: Callable[[], None]) -> None: ...


class CommandCallbacks(Protocol):
    """What the controller may ask of the node. Each returns the message of its
    CommandResult, or raises CommandRefused. A new command is one more method here and
    one more entry in ControllerLink._handlers."""

    def reconcile_now(self, reason: str, revision: str) -> str: ...

    def set_suspended(self, nf: str | None, suspended: bool) -> str: ...

    def approve(self, revision: str, rollout_id: str, wave: int, reason: str) -> str:
        """Under a RolloutPolicy: the revision this node may run (checked when applied)."""

    def reconnected(self) -> None:
        """Back after a break: anything the controller could not deliver meanwhile."""


class CommandRefused(Exception):
    """A command the node will not carry out; its message goes back to the controller."""


def _comparable(status: pb.NodeStatus) -> bytes:
    """A status without its timestamp: what decides whether it changed."""
    copy = pb.NodeStatus()
    copy.CopyFrom(status)
    copy.observed_at = 0
    return copy.SerializeToString(deterministic=True)


def endpoints(controller: str) -> list[str]:
    """The controller replicas of `--controller`, comma separated."""
    return [part.strip() for part in controller.split(",") if part.strip()]


def bpf_features() -> list[str]:
    features = ["xdp", "tc-clsact", "prog-array-chains"]
    if Path("/sys/kernel/btf/vmlinux").exists():
        features.append("btf")
    return features


class Stream:
    """One Connect call's send side. Its request generator runs in a gRPC thread and ends
    as soon as the stream does (`close`): a generator of a dead stream must not live on,
    let alone take work meant for the next one. Events are not queued here: the agent's
    event log is the outbox, read from the controller's acknowledged point."""

    def __init__(self) -> None:
        self.wake = threading.Event()
        self.closed = False
        self.results: deque[pb.CommandResult] = deque()
        self.resend_from: int | None = None  # set by Registered: send events after it
        self.events_due = False  # the event log may have something not sent yet

    def poke(self) -> None:
        self.wake.set()

    def new_events(self) -> None:
        self.events_due = True
        self.wake.set()

    def close(self) -> None:
        self.closed = True
        self.wake.set()


class ControllerLink:
    """The stream to the controller (see the module docstring). It knows the node only
    through `node` (status snapshots, event log) and `commands` (what it may be asked)."""

    def __init__(
        self, node: StatusProvider, commands: CommandCallbacks, config: AgentConfig
    ) -> None:
        self.node = node
        self.commands = commands
        self.config = config
        self.stopping = threading.Event()
        self.connected = threading.Event()
        self._call: Any = None
        self._stream: Stream | None = None
        self._thread = threading.Thread(target=self._run, name="controller-link", daemon=True)
        self._status_dirty = True
        self.heartbeat = HEARTBEAT_SECONDS
        self.acked_event_sequence = 0
        self.sessions = 0  # registrations so far
        self.failures = 0  # connection attempts failed in a row
        self.endpoints = endpoints(config.controller or "") or [""]
        # command ids executed lately: a replica resends what it has no answer for
        self._executed: deque[str] = deque(maxlen=1000)
        self._endpoint_index = random.randrange(len(self.endpoints))
        self._handlers: dict[str, Callable[[pb.Command], str]] = {
            "reconcile": self._reconcile,
            "suspend": self._suspend,
            "approve": self._approve,
        }
        node.subscribe(self._on_status, self._on_event)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()
        stream = self._stream
        if stream is not None:
            stream.close()
        call = self._call
        if call is not None:
            call.cancel()
        self._thread.join(timeout=5)

    # -- from the node ---------------------------------------------------------------------
    def _on_event(self) -> None:
        stream = self._stream
        if stream is not None:
            stream.new_events()

    def _on_status(self) -> None:
        self._status_dirty = True
        stream = self._stream
        if stream is not None:
            stream.poke()

    # -- stream ----------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """The replica this agent connects (or is connected) to."""
        return self.endpoints[self._endpoint_index]

    def _next_endpoint(self) -> None:
        self._endpoint_index = (self._endpoint_index + 1) % len(self.endpoints)

    def _channel(self) -> grpc.Channel:
        options = [
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.max_receive_message_length", 16 << 20),
            # commands are a few bytes: no flow-control window probing (each probe is a
            # PING the controller must answer, 10,000 at once on a fleet-wide reconcile)
            ("grpc.http2.bdp_probe", 0),
            # _run paces reconnects (a fresh channel per attempt); gRPC's own backoff inside
            # one attempt must not wait longer than that
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", int(MAX_BACKOFF_SECONDS * 1000)),
        ]
        return open_channel(
            self.endpoint,
            insecure=self.config.insecure,
            ca=self.config.tls_ca,
            cert=self.config.tls_cert,
            key=self.config.tls_key,
            options=options,
        )

    def _run(self) -> None:
        while not self.stopping.is_set():
            stream = Stream()
            self._stream = stream
            try:
                with self._channel() as channel:
                    stub = pbg.AgentServiceStub(channel)
                    self._call = stub.Connect(self._requests(stream))
                    for message in self._call:
                        self._handle(message, stream)
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
                stream.close()  # its request generator returns; nothing is taken from it
                self.connected.clear()
                self._call = None
            if self.stopping.is_set():
                break
            self._next_endpoint()
            self.failures += 1
            delay = min(MAX_BACKOFF_SECONDS, 0.25 * 2 ** min(self.failures, 8))
            delay *= random.uniform(0.5, 1)
            self.stopping.wait(delay)

    def _status(self) -> pb.StatusReport:
        return pb.StatusReport(status=status_to_proto(self.node.status_snapshot()))

    def _register(self) -> pb.AgentMessage:
        store = self.node.outbox
        events = store.events()
        last = events[-1].sequence if events else 0
        status = self.node.status_snapshot()
        return pb.AgentMessage(
            register=pb.Register(
                node=self.config.node,
                labels=status.labels,
                kernel=status.kernel or kernel_release(),
                bpf_features=bpf_features(),
                agent_version=__version__,
                last_event_sequence=last,
                event_epoch=store.event_epoch,
                first_event_sequence=events[0].sequence if events else last + 1,
                approved_revision=status.approved_revision or "",
            )
        )

    def _requests(self, stream: Stream) -> Iterator[pb.AgentMessage]:
        """Register, then whatever is due, until the stream closes: events after the last
        one sent (from the controller's acknowledged point after Registered), a status when
        it changed, a heartbeat (a status) whenever nothing was sent for `heartbeat`
        seconds whatever else happens, command results."""
        store = self.node.outbox
        yield self._register()
        sent_upto: int | None = None  # unknown until Registered says what is stored
        last_status = b""
        last_sent = 0.0
        while not stream.closed and not self.stopping.is_set():
            stream.wake.clear()
            if stream.resend_from is not None:
                sent_upto, stream.resend_from = stream.resend_from, None
                stream.events_due = True
            if sent_upto is not None and stream.events_due:
                stream.events_due = False  # before reading: an event appended later sets it
                backlog = [event_to_proto(e) for e in store.events(since=sent_upto)]
                for start in range(0, len(backlog), EVENT_BATCH):
                    if stream.closed:
                        return
                    batch = backlog[start : start + EVENT_BATCH]
                    yield pb.AgentMessage(events=pb.EventReport(events=batch))
                    sent_upto = batch[-1].sequence
                    last_sent = time.monotonic()
            while stream.results and not stream.closed:
                yield pb.AgentMessage(result=stream.results.popleft())
                last_sent = time.monotonic()
            heartbeat_due = time.monotonic() - last_sent >= self.heartbeat
            if self._status_dirty or heartbeat_due:
                self._status_dirty = False
                report = self._status()
                blob = _comparable(report.status)
                if heartbeat_due or blob != last_status:
                    last_status = blob
                    yield pb.AgentMessage(status=report)
                    last_sent = time.monotonic()
            wait = self.heartbeat - (time.monotonic() - last_sent)
            stream.wake.wait(max(0.0, wait))

    def _handle(self, message: pb.ControllerMessage, stream: Stream) -> None:
        kind = message.WhichOneof("body")
        if kind == "registered":
            if message.registered.heartbeat_seconds > 0:
                self.heartbeat = min(HEARTBEAT_SECONDS, message.registered.heartbeat_seconds)
            self.acked_event_sequence = message.registered.acked_event_sequence
            stream.resend_from = self.acked_event_sequence
            stream.poke()
            self.sessions += 1
            apart = self.sessions > 1 or self.failures > 0
            self.failures = 0
            log.info(
                "connected to controller %s (session %s, events stored up to %d)",
                self.endpoint,
                message.registered.session_id,
                self.acked_event_sequence,
            )
            approval = message.registered.approval
            if message.registered.HasField("approval") and approval.revision:
                self.commands.approve(
                    approval.revision, approval.rollout_id, approval.wave, approval.reason
                )
            # after the approval is offered: `nfctl agent --once` waits for this to decide
            self.connected.set()
            if apart:
                self.commands.reconnected()
        elif kind == "events_ack":
            self.acked_event_sequence = message.events_ack.event_sequence
        elif kind == "command":
            command = message.command
            if command.id and command.id in self._executed:
                result = pb.CommandResult(command_id=command.id, ok=True, message="already done")
            else:
                result = self._execute(command)
                self._executed.append(command.id)
            stream.results.append(result)
            stream.poke()

    def _execute(self, command: pb.Command) -> pb.CommandResult:
        action = command.WhichOneof("action") or ""
        handler = self._handlers.get(action)
        if handler is None:
            return pb.CommandResult(
                command_id=command.id, ok=False, message=f"unknown command {action!r}"
            )
        try:
            message = handler(command)
        except CommandRefused as exc:
            return pb.CommandResult(command_id=command.id, ok=False, message=str(exc))
        return pb.CommandResult(command_id=command.id, ok=True, message=message)

    def _reconcile(self, command: pb.Command) -> str:
        order = command.reconcile
        return self.commands.reconcile_now(order.reason or "controller", order.revision)

    def _suspend(self, command: pb.Command) -> str:
        order = command.suspend
        return self.commands.set_suspended(order.nf or None, order.suspended)

    def _approve(self, command: pb.Command) -> str:
        order = command.approve
        return self.commands.approve(order.revision, order.rollout_id, order.wave, order.reason)
