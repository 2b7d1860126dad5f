"""Controller scale: N SIMULATED agents against a real `nfctl controller`.

The controller is the real thing (`python -m nfctl controller`, a subprocess on loopback).
The agents are SIMULATED, for controller load only: real gRPC clients (grpc.aio), one
channel (TCP connection) and one AgentService.Connect stream each, spread over a few
worker processes. Each registers with a unique node name and realistic labels, sends a
realistic StatusReport (several NFs with attach points, maps, conditions; real protobuf
types) every few seconds (jittered), occasional events, and answers commands like the
real agent (nfctl/agent/controller_link.py): a CommandResult at once and, for "reconcile
now" with a revision, a status with that revision after a simulated apply delay. There is
no BPF, no Git and no datapath behind them.

Measured:
  connect       time until all N agents are registered (thundering herd: all start at once)
  visibility    a probe gives some agents a new lastAppliedRevision; an operator polls
                ListNodes (selector: those nodes) until it shows it; p50/p99 over many samples
  fan-out       an operator Reconcile to every node, until every agent has the Command
                (agents timestamp receipt, same clock); last / p50 / p99; with PostgreSQL,
                per round and replica where the time goes (`where_the_time_goes`, ms from
                the call): stored, relayed (NOTIFY), claimed, queued on every stream,
                p50 / last stream write completed (the controller's log of the command),
                then when that replica's agents saw it (`generator_ms`: last seen - last
                written, the load generator's share), and each worker's event-loop lag
  controller    RSS (peak and steady) and CPU (cores) from /proc/<pid>; errors/disconnects

Each worker process freezes its heap (gc.freeze) once its agents are connected, so that a
full garbage collection does not stall all of its agents at once (a real agent's heap is
its own); --worker-sessions gives each worker a scheduling group of its own.

The simulated fleet shares this machine's CPUs with the controller (real agents would not):
the controller runs in its own session, as a daemon would, so that with the kernel's
autogroup scheduling CPU is shared per process group rather than per thread (--same-session
to compare). Every CPU figure comes with what the load generator and other processes on
the (shared) machine used in the same window.

    .venv/bin/python -m benchmarks.controller_scale --agents 10000 --json
    .venv/bin/python -m benchmarks.controller_scale --quick --json          # 200 agents
    .venv/bin/python -m benchmarks.controller_scale --agents 10000 --tls --json
    .venv/bin/python -m benchmarks.controller_scale --agents 10000 --replicas 2 \
        --db postgresql --tls --json
    .venv/bin/python -m benchmarks.controller_scale --agents 10000 --replicas 2 \
        --db postgresql --tls --generator go --workers 2 --worker-sessions --json

--generator go runs the same simulated agents in Go (benchmarks/simagent: same messages,
behaviour and control protocol; built here with Debian's golang-go, golang-google-grpc-dev
and golang-google-protobuf-dev). A Python worker still prepares each agent, then execs the
Go program. It costs the shared CPUs less per message than grpc.aio, so at 10,000 agents the
fan-out measures the replicas rather than the load generator's backlog.

With --replicas 2 --db postgresql: a PostgreSQL server started here as the tests start it
(tests/pg_harness.py), two controller replicas sharing it, the simulated agents spread
over both (each knows both and moves to the other when its session fails). Visibility
probes poll the replicas in turn, so about half the samples ask the replica that does
not hold the agent's stream (reported apart as `other_replica`); fan-out rounds are
issued on the replicas in turn. Printed per replica: RSS, CPU, agents; for the store:
write transactions per status period (transaction ids PostgreSQL assigned: read-only
transactions get none), rows written, its processes' CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from benchmarks.common import REPO_ROOT, emit, machine, percentile, summary_ms
from nfctl import __version__
from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.api.nfctl.v1 import nfctl_pb2_grpc as pbg

SIMULATED_NOTE = (
    "Agents are SIMULATED for controller load only: real gRPC clients with one "
    "AgentService.Connect stream (own TCP connection) each and synthetic but realistic "
    "status/events; no BPF, Git or datapath behind them. The controller is the real "
    "`nfctl controller` process."
)
TARGETS = {"agents": 10_000, "visibility_p99_ms": 1000.0, "fanout_all_ms": 2000.0, "rss_mb": 1024}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
LAG_PERIOD = 0.01  # a simulator worker's event-loop lag probe (s)
# what a controller logs once a fan-out is written to all its streams (commands.Delivery)
FANOUT_LOG = re.compile(
    r"command fan-out (?P<id>\S+): streams=(?P<streams>\d+) written=(?P<written>\d+) "
    r"recorded=(?P<recorded>[\d.]+) relay=(?P<relay>[-\d.]+) claim=(?P<claim>[-\d.]+) "
    r"queue=(?P<queue>[-\d.]+) write_p50=(?P<write_p50>[-\d.]+) "
    r"write_last=(?P<write_last>[-\d.]+)"
)

# ------------------------------------------------------------------------------------------
# /proc readings
# ------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle (from /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (KiB) and Threads from /proc/<pid>/status."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def raise_nofile(want: int = 65536) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE (soft to hard; hard too when root). Children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want and os.geteuid() == 0:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            soft, hard = want, want
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def autogroup() -> bool:
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------------------------------
# Simulated agents (worker processes)
# ------------------------------------------------------------------------------------------

NF_CATALOG = [
    ("ddos-guard", "xdp", ["blocklist", "stats", "rate_cfg"]),
    ("l4-lb", "xdp", ["backends", "vips", "conntrack"]),
    ("acl-ingress", "tc-ingress", ["rules", "hits"]),
    ("egress-shaper", "tc-egress", ["classes", "stats"]),
    ("flow-stats", "tc-ingress", ["flows", "export_cfg"]),
    ("syn-proxy", "xdp", ["cookies", "stats"]),
    ("vlan-mirror", "tc-ingress", ["mirrors"]),
]
MAP_TYPES = {"stats": "percpu_array", "conntrack": "lru_hash", "flows": "lru_hash"}
INTERFACES = ["eth0", "eth1", "ens1f0", "ens1f1", "bond0"]
EVENT_REASONS = ["DriftCorrected", "Applied", "SourceFetched", "DriftDetected"]
VERIFIER_LOG = (
    "; R1=ctx(off=0,imm=0) R10=fp0\n0: (61) r2 = *(u32 *)(r1 +4)\n"
    "1: (61) r1 = *(u32 *)(r1 +0)\n2: (bf) r3 = r1\n3: (07) r3 += 14\n"
    "invalid access to packet, off=14 size=20, R3(id=0,off=14,r=0)\n"
    "R3 offset is outside of the packet\nprocessed 41 insns (limit 1000000)\n"
)


def sha(text: str, length: int = 40) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def node_name(index: int) -> str:
    return f"sim-node-{index:05d}"


def node_labels(index: int) -> dict[str, str]:
    region = ("eu-west", "eu-central", "us-east", "ap-south")[index % 4]
    return {
        "nfctl.io/simulated": "true",
        "topology.kubernetes.io/region": region,
        "topology.kubernetes.io/zone": f"{region}-{(index // 4) % 3 + 1}",
        "rack": f"r{(index // 40) % 250:03d}",
        "role": "edge" if index % 5 else "core",
        "nic": ("mlx5", "ice", "i40e")[index % 3],
    }


def build_status(index: int, revision: str, rng: random.Random) -> pb.NodeStatus:
    """What `nfctl status` of a busy node looks like, with real protobuf types."""
    name, labels, now = node_name(index), node_labels(index), time.time()
    status = pb.NodeStatus(
        node=name,
        labels=labels,
        kernel="6.1.0-28-amd64",
        agent_version=f"{__version__}+sim",
        last_applied_revision=revision,
        last_attempted_revision=revision,
        drift_mode="correct",
        observed_at=now,
        source=pb.SourceStatus(
            url="https://git.example.net/netops/network-functions.git",
            ref="main",
            path=f"sites/{labels['topology.kubernetes.io/region']}",
            last_fetched_revision=revision,
        ),
    )
    degraded = index % 50 == 7  # a few nodes are not all green
    failed = index % 97 == 13
    status.conditions.add(
        type="Ready",
        status=not failed,
        reason="ReconciliationFailed" if failed else "ReconciliationSucceeded",
        message=f"Applied revision main@sha1:{revision[:12]}",
        last_transition_time=now - rng.uniform(60, 86400),
    )
    status.conditions.add(
        type="Reconciling", status=False, reason="ReconciliationSucceeded", message=""
    )
    status.conditions.add(
        type="Stalled",
        status=failed,
        reason="BuildFailed" if failed else "",
        message="syn-proxy: verifier rejected the program" if failed else "",
    )
    for k, (nf, hook, maps) in enumerate(rng.sample(NF_CATALOG, rng.randint(4, 6))):
        state = "Applied"
        if failed and k == 0:
            state = "Failed"
        elif degraded and k == 1:
            state = "Degraded"
        fn = status.functions.add(
            name=nf,
            state=state,
            version=f"1.{rng.randint(0, 9)}.{rng.randint(0, 20)}",
            revision=revision,
            build_hash=sha(f"{nf}-{revision}", 64),
            program_id=rng.randint(100, 60_000),
            program_tag=sha(f"tag-{nf}-{index}", 16),
            hook=hook,
            applied_at=now - rng.uniform(0, 86_400),
        )
        for iface in rng.sample(INTERFACES, rng.randint(1, 3)):
            mode = rng.choice(("native", "native", "generic")) if hook == "xdp" else "tc"
            error = "XDP native mode not supported by driver" if state == "Degraded" else ""
            fn.attach_points.add(interface=iface, hook=hook, mode=mode, error=error)
        for map_name in maps:
            size = rng.choice((1024, 4096, 65_536, 262_144))
            fn.maps.add(
                name=map_name,
                type=MAP_TYPES.get(map_name, "hash"),
                entries=rng.randint(0, size // 2),
                max_entries=size,
                managed=map_name.endswith("cfg") or map_name in ("blocklist", "rules", "vips"),
            )
        if state == "Failed":
            fn.last_error.CopyFrom(
                pb.ErrorInfo(
                    message="the verifier rejected the program",
                    file=f"nfs/{nf}/{nf}.c",
                    line=rng.randint(20, 400),
                    log=VERIFIER_LOG * 4,
                    revision=revision,
                )
            )
    return status


@dataclass
class WorkerStats:
    registered: int = 0
    connect_errors: int = 0
    stream_errors: int = 0
    reconnects: int = 0
    statuses: int = 0
    events: int = 0
    results: int = 0
    status_bytes_sampled: int = 0
    status_samples: int = 0
    errors: list[str] = field(default_factory=list)

    def error(self, text: str) -> None:
        if len(self.errors) < 10:
            self.errors.append(text)


class SimAgent:
    """One simulated agent: its own channel and Connect stream, reconnecting with jittered
    backoff like the real one."""

    def __init__(self, index: int, worker: Worker) -> None:
        self.index = index
        self.name = node_name(index)
        self.worker = worker
        self.rng = random.Random(index)
        self.report = pb.AgentMessage()
        self.report.status.status.CopyFrom(build_status(index, sha("initial"), self.rng))
        self.status = self.report.status.status  # mutated in place; sent as is
        self.sequence = 0
        self.history: list[pb.Event] = []  # the agent's event log (resent after Registered)
        for nf in ("ddos-guard", "l4-lb", "acl-ingress", "flow-stats", "syn-proxy"):
            self.event("Applied", f"NF {nf} applied", nf=nf)
        self.writing = False  # one write at a time on a stream; others wait in `backlog`
        self.backlog: list[pb.AgentMessage] = []
        self.call: Any = None
        self.connected = False
        self.started_at = 0.0
        self.registered_at = 0.0
        self.task: asyncio.Task[None] | None = None
        self.ticker: asyncio.Task[None] | None = None
        # which controller replica: agents start spread over them and move to the next
        # one after a failed session, as real agents with several --controller endpoints
        self.endpoint = index % len(worker.config.endpoints)

    def channel(self) -> grpc.aio.Channel:
        options = [
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.max_receive_message_length", 16 << 20),
            ("grpc.http2.bdp_probe", 0),  # as nfctl/agent/controller_link.py
            # one TCP connection per agent, as with real agents on separate machines
            ("grpc.use_local_subchannel_pool", 1),
        ]
        cfg = self.worker.config
        target = cfg.endpoints[self.endpoint]
        if not cfg.pki:
            return grpc.aio.insecure_channel(target, options=options)
        creds = self.worker.credentials(self.name)
        return grpc.aio.secure_channel(target, creds, options=options)

    def event(self, reason: str, message: str, nf: str = "") -> pb.Event:
        self.sequence += 1
        event = pb.Event(
            time=time.time(),
            type="Normal",
            reason=reason,
            message=message,
            node=self.name,
            nf=nf,
            revision=self.status.last_applied_revision,
            author="NetOps Bot <netops@example.net>",
            commit_time=time.time() - 300,
            sequence=self.sequence,
        )
        self.history = [*self.history[-49:], event]
        return event

    async def send(self, message: pb.AgentMessage) -> None:
        call = self.call
        if call is None:
            return
        if self.writing:
            self.backlog.append(message)
            return
        self.writing = True
        try:
            await call.write(message)
            while self.backlog and self.call is call:
                await call.write(self.backlog.pop(0))
        finally:
            self.writing = False

    async def send_status(self) -> None:
        self.status.observed_at = time.time()
        draw = self.rng.random()
        fn = self.status.functions[int(draw * len(self.status.functions))]
        live = fn.maps[0]  # a live map: its entry count moves between reports
        live.entries = min(live.max_entries, max(0, live.entries + int(draw * 60) - 20))
        stats = self.worker.stats
        if stats.statuses % 64 == 0:
            stats.status_bytes_sampled += self.report.ByteSize()
            stats.status_samples += 1
        stats.statuses += 1
        await self.send(self.report)

    async def run(self) -> None:
        failures = 0
        self.started_at = time.time()
        while not self.worker.stopping:
            channel = self.channel()
            try:
                await self.session(channel)
                failures = 0
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                if self.worker.stopping:
                    break
                if self.connected:
                    self.worker.stats.stream_errors += 1
                else:
                    self.worker.stats.connect_errors += 1
                self.worker.stats.error(f"{self.name}: {exc.code().name} {exc.details()}")
            except Exception as exc:
                self.worker.stats.stream_errors += 1
                self.worker.stats.error(f"{self.name}: {exc!r}")
            finally:
                self.connected = False
                self.call = None
                if self.ticker is not None:
                    self.ticker.cancel()
                await channel.close(grace=None)
            if self.worker.stopping:
                break
            failures += 1
            self.worker.stats.reconnects += 1
            self.endpoint = (self.endpoint + 1) % len(self.worker.config.endpoints)
            delay = min(30.0, 0.5 * 2 ** min(failures, 8)) * self.rng.uniform(0.5, 1.0)
            await asyncio.sleep(delay)

    def register_message(self) -> pb.AgentMessage:
        return pb.AgentMessage(
            register=pb.Register(
                node=self.name,
                labels=node_labels(self.index),
                kernel=self.status.kernel,
                bpf_features=["xdp", "tc-clsact", "prog-array-chains", "btf"],
                agent_version=self.status.agent_version,
                last_event_sequence=self.sequence,
            )
        )

    async def session(self, channel: grpc.aio.Channel) -> None:
        stub = pbg.AgentServiceStub(channel)
        self.backlog.clear()
        self.call = call = stub.Connect()
        await call.write(self.register_message())
        first: Any = await call.read()
        if first is grpc.aio.EOF or first.WhichOneof("body") != "registered":
            raise RuntimeError(f"expected Registered, got {first!r}")
        self.connected = True
        if not self.registered_at:
            self.registered_at = time.time()
            self.worker.stats.registered += 1
        # like the real agent: resend what the controller has not stored yet
        acked = int(first.registered.acked_event_sequence)
        resend = [e for e in self.history if e.sequence > acked]
        if resend:
            await self.send(pb.AgentMessage(events=pb.EventReport(events=resend)))
            self.worker.stats.events += len(resend)
        await self.send_status()
        self.ticker = asyncio.create_task(self.tick())
        while True:
            message: Any = await call.read()
            if message is grpc.aio.EOF:
                raise RuntimeError("the controller ended the stream")
            if message.WhichOneof("body") == "command":
                await self.on_command(message.command)

    async def tick(self) -> None:
        cfg = self.worker.config
        await asyncio.sleep(self.rng.uniform(0, cfg.interval))
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
                await self.send_status()
                if self.rng.random() < cfg.event_probability:
                    fn = self.status.functions[0].name
                    reason = self.rng.choice(EVENT_REASONS)
                    event = self.event(reason, f"{reason}: {fn} on eth0", nf=fn)
                    await self.send(pb.AgentMessage(events=pb.EventReport(events=[event])))
                    self.worker.stats.events += 1
            await asyncio.sleep(cfg.interval * (0.8 + 0.4 * self.rng.random()))

    async def on_command(self, command: pb.Command) -> None:
        now = time.time()
        action = command.WhichOneof("action")
        if action == "reconcile":
            # with the replica it came from: the controller logs when each one wrote it
            self.worker.received.setdefault(command.reconcile.revision, []).append(
                (now, self.endpoint)
            )
            revision = command.reconcile.revision
            if revision and self.worker.config.apply_delay > 0:
                delay = self.rng.uniform(0.2, 1.0) * self.worker.config.apply_delay
                asyncio.get_running_loop().call_later(
                    delay, self.worker.spawn, self.apply(revision)
                )
        result = pb.CommandResult(command_id=command.id, ok=True, message="reconcile scheduled")
        await self.send(pb.AgentMessage(result=result))
        self.worker.stats.results += 1

    async def apply(self, revision: str) -> None:
        """What the real agent reports after fetching and applying a pushed revision."""
        if self.call is None:
            return
        self.status.last_applied_revision = revision
        self.status.last_attempted_revision = revision
        self.status.source.last_fetched_revision = revision
        for fn in self.status.functions:
            fn.revision = revision
        with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
            await self.send_status()

    async def probe(self, revision: str) -> float:
        """A status change the operator side must see: a new lastAppliedRevision."""
        self.status.last_applied_revision = revision
        self.status.last_attempted_revision = revision
        sent = time.time()
        await self.send_status()
        return sent


@dataclass
class WorkerConfig:
    index: int
    first: int
    count: int
    endpoints: list[str]  # the controller replicas' addresses
    interval: float
    event_probability: float
    apply_delay: float
    pki: str = ""
    nice: int = 0
    # a built benchmarks/simagent binary: the worker prepares its agents, then runs it
    simagent: str = ""


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.stats = WorkerStats()
        self.stopping = False
        self.received: dict[str, list[tuple[float, int]]] = {}
        # (when, how late) the event loop ran a timer due every LAG_PERIOD: how long a
        # received message can wait behind this process's other agents (a real agent, alone
        # on its machine, would not wait)
        self.loop_lag: deque[tuple[float, float]] = deque(maxlen=20_000)
        self.agents = [SimAgent(config.first + i, self) for i in range(config.count)]
        self.by_index = {a.index: a for a in self.agents}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ca = b""

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def watch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopping:
            due = loop.time() + LAG_PERIOD
            await asyncio.sleep(LAG_PERIOD)
            self.loop_lag.append((time.time(), max(0.0, loop.time() - due)))

    def prepare(self) -> None:
        """Certificates: one per simulated agent (CN = node name, O = nfctl-nodes)."""
        if not self.config.pki:
            return
        from nfctl.controller.auth import NODES_ORG
        from nfctl.controller.certs import issue

        folder = Path(self.config.pki)
        self._ca = (folder / "ca.crt").read_bytes()
        for agent in self.agents:
            if not (folder / f"{agent.name}.crt").exists():
                issue(folder, agent.name, agent.name, NODES_ORG)

    def credentials(self, name: str) -> grpc.ChannelCredentials:
        folder = Path(self.config.pki)
        return grpc.ssl_channel_credentials(
            root_certificates=self._ca,
            private_key=(folder / f"{name}.key").read_bytes(),
            certificate_chain=(folder / f"{name}.crt").read_bytes(),
        )

    async def handle(self, op: str, request: dict[str, Any]) -> Any:
        if op == "connect":
            self.spawn(self.watch_loop())
            for agent in self.agents:
                agent.task = asyncio.create_task(agent.run())
            return {"started": len(self.agents)}
        if op == "registered":
            return {
                "count": self.stats.registered,
                "times": [[a.started_at, a.registered_at] for a in self.agents if a.registered_at],
            }
        if op == "probe":
            sent = {}  # node: [sent at, index of the replica holding its stream]
            for index, revision in request["agents"]:
                agent = self.by_index[index]
                if agent.connected:
                    sent[agent.name] = [await agent.probe(revision), agent.endpoint]
            return sent
        if op == "fanout_count":
            return len(self.received.get(request["revision"], []))
        if op == "fanout_times":
            return self.received.get(request["revision"], [])
        if op == "settle":
            # Freeze what every agent holds once all are connected: a full collection then
            # scans only what changed since, not the state of this process's thousands of
            # agents (measured: 0.3-0.9 s stalls of every agent of a worker at 500 each; a
            # real agent's heap is its own)
            start = time.monotonic()
            gc.collect()
            gc.freeze()
            return {"frozen": gc.get_freeze_count(), "s": round(time.monotonic() - start, 2)}
        if op == "loop_lag":
            since, until = request["since"], request["until"]
            lags = [lag for t, lag in self.loop_lag if since <= t <= until]
            return {"max_ms": round(max(lags, default=0.0) * 1000, 1), "samples": len(lags)}
        if op == "stats":
            data = dict(self.stats.__dict__)
            data["connected"] = sum(1 for a in self.agents if a.connected)
            data["connected_per_replica"] = [
                sum(1 for a in self.agents if a.connected and a.endpoint == r)
                for r in range(len(self.config.endpoints))
            ]
            data["cpu_seconds"] = cpu_seconds(os.getpid())
            return data
        if op == "stop":
            self.stopping = True
            for agent in self.agents:
                if agent.task is not None:
                    agent.task.cancel()
            await asyncio.gather(
                *(a.task for a in self.agents if a.task is not None), return_exceptions=True
            )
            return {"stopped": True}
        raise ValueError(f"unknown op {op}")


def export_agents(worker: Worker, path: Path) -> None:
    """What each agent starts from, for the Go simulator (benchmarks/simagent): its
    Register (the Go agent sets its event sequence in it at each session), status report
    and event log as SimAgent builds them, so that both generators send the same messages."""

    def b64(message: Any) -> str:
        return base64.b64encode(message.SerializeToString()).decode()

    with path.open("w") as out:
        for agent in worker.agents:
            record = {
                "index": agent.index,
                "name": agent.name,
                "register": b64(agent.register_message()),
                "report": b64(agent.report),
                "history": [b64(event) for event in agent.history],
                "sequence": agent.sequence,
            }
            out.write(json.dumps(record) + "\n")


SIMAGENT_GO_PACKAGE = "nfctl.local/simagent/nfctlpb"  # where main.go imports the Go types from
GOCODE = Path("/usr/share/gocode/src")  # Debian's Go sources (golang-*-dev packages)


def build_simagent(folder: Path) -> Path:
    """Compile benchmarks/simagent with Debian's Go packages (GOPATH mode), its protobuf
    types generated from protos/ first (grpc_tools' protoc, Debian's protoc-gen-go)."""
    go = shutil.which("go")
    needed = [GOCODE / "google.golang.org/grpc", GOCODE / "google.golang.org/protobuf"]
    if go is None or not all(p.is_dir() for p in needed):
        raise SystemExit(
            "--generator go needs Go and Debian's Go gRPC and protobuf: apt-get install "
            "golang-go golang-google-grpc-dev golang-google-protobuf-dev"
        )
    gopath = folder / "gopath"
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": f"{GOCODE.parent}:{gopath}",
        "GOCACHE": str(folder / "go-cache"),
    }
    plugin = folder / "protoc-gen-go"
    subprocess.run(
        [go, "build", "-o", str(plugin), "google.golang.org/protobuf/cmd/protoc-gen-go"],
        env=env,
        check=True,
    )
    (gopath / "src").mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{REPO_ROOT / 'protos'}",
            f"--plugin=protoc-gen-go={plugin}",
            f"--go_out={gopath / 'src'}",
            f"--go_opt=Mnfctl/v1/nfctl.proto={SIMAGENT_GO_PACKAGE}",
            "nfctl/v1/nfctl.proto",
        ],
        check=True,
    )
    binary = folder / "simagent"
    subprocess.run(
        [go, "build", "-o", str(binary), "."],
        cwd=REPO_ROOT / "benchmarks" / "simagent",
        env=env,
        check=True,
    )
    return binary


def go_versions() -> str:
    """The Go toolchain and grpc-go the simulator was built with."""
    go = subprocess.run(["go", "version"], capture_output=True, text=True, check=False)
    source = (GOCODE / "google.golang.org/grpc/version.go").read_text()
    grpc_go = re.search(r'const Version = "([^"]+)"', source)
    return f"{go.stdout.strip()}, grpc-go {grpc_go.group(1) if grpc_go else '?'}"


async def worker_main(config: WorkerConfig) -> None:
    raise_nofile()
    if config.nice:
        os.nice(config.nice)
    worker = Worker(config)
    await asyncio.to_thread(worker.prepare)
    if config.simagent:
        agents_file = Path(config.simagent).parent / f"agents-{config.index}.jsonl"
        export_agents(worker, agents_file)
        sys.stdout.flush()
        os.execv(config.simagent, [config.simagent, json.dumps(config.__dict__), str(agents_file)])
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def reply(payload: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(payload) + "\n")
        sys.stdout.flush()

    async def serve(request: dict[str, Any]) -> None:
        try:
            result = await worker.handle(request["op"], request)
            reply({"id": request["id"], "result": result})
        except Exception as exc:
            reply({"id": request["id"], "error": repr(exc)})

    reply({"id": 0, "result": {"ready": True, "pid": os.getpid()}})
    while True:
        line = await reader.readline()
        if not line:
            break
        request = json.loads(line)
        worker.spawn(serve(request))
        if request["op"] == "stop":
            while worker._tasks:
                await asyncio.sleep(0.05)
            break


# ------------------------------------------------------------------------------------------
# The parent: controller process, workers, operator client, measurements
# ------------------------------------------------------------------------------------------


def fanout_log_line(path: Path, since: float) -> dict[str, Any] | None:
    """The first fan-out a controller logged for a command recorded after `since`."""
    for match in FANOUT_LOG.finditer(path.read_text(errors="replace")):
        fields: dict[str, Any] = {
            k: (v if k == "id" else float(v)) for k, v in match.groupdict().items()
        }
        if fields["recorded"] >= since:
            fields["streams"], fields["written"] = int(fields["streams"]), int(fields["written"])
            return fields
    return None


class WorkerHandle:
    def __init__(self, proc: asyncio.subprocess.Process, first: int, count: int) -> None:
        self.proc = proc
        self.first = first
        self.count = count
        self.pid = proc.pid
        self._ids = iter(range(1, 1 << 62))
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self.ready: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[0] = self.ready
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                break
            message = json.loads(line)
            future = self._pending.pop(message["id"], None)
            if future is None or future.done():
                continue
            if "error" in message:
                future.set_exception(RuntimeError(message["error"]))
            else:
                future.set_result(message["result"])
        for future in self._pending.values():
            if not future.done():
                future.set_exception(RuntimeError(f"worker {self.pid} exited"))

    async def call(self, op: str, timeout: float = 120.0, **kwargs: Any) -> Any:
        assert self.proc.stdin is not None
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        self.proc.stdin.write((json.dumps({"id": request_id, "op": op, **kwargs}) + "\n").encode())
        await self.proc.stdin.drain()
        return await asyncio.wait_for(future, timeout)


class Sampler:
    """Each controller's RSS/CPU, load-generator CPU and the machine's, four times a second."""

    def __init__(self, pids: list[int], workers: list[int]) -> None:
        self.pids = pids  # one per controller replica
        self.workers = [*workers, os.getpid()]  # the operator client runs in this process
        # t, RSS KiB per controller, CPU s per controller, load generator CPU s, machine CPU s
        self.samples: list[tuple[float, list[int], list[float], float, float]] = []
        self.peak_hwm = [0 for _ in pids]
        self.max_threads = 0
        self.max_fds = 0

    async def run(self) -> None:
        while True:
            statuses = [proc_status(pid) for pid in self.pids]
            if not all(statuses):
                return
            for i, status in enumerate(statuses):
                self.peak_hwm[i] = max(self.peak_hwm[i], status.get("VmHWM", 0))
                self.max_threads = max(self.max_threads, status.get("Threads", 0))
            self.max_fds = max(self.max_fds, *(open_fds(pid) for pid in self.pids))
            load = sum(cpu_seconds(w) for w in self.workers)
            self.samples.append(
                (
                    time.monotonic(),
                    [status.get("VmRSS", 0) for status in statuses],
                    [cpu_seconds(pid) for pid in self.pids],
                    load,
                    machine_busy_seconds(),
                )
            )
            await asyncio.sleep(0.25)

    def peak_mb(self, replica: int) -> float:
        seen = max((s[1][replica] for s in self.samples), default=0)
        return round(max(self.peak_hwm[replica], seen) / 1024, 1)

    def window(self, start: float, end: float) -> dict[str, Any]:
        """rss_mb / rss_max_mb: the largest replica's; cpu_cores: all replicas together;
        `replicas`: each one's."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:  # shorter than the sampling period
            return {"rss_mb": None, "cpu_cores": None, "load_generator_cpu_cores": None}
        span = inside[-1][0] - inside[0][0]
        first, last = inside[0], inside[-1]
        replicas = [
            {
                "rss_mb": round(statistics.fmean(s[1][i] for s in inside) / 1024, 1),
                "rss_max_mb": round(max(s[1][i] for s in inside) / 1024, 1),
                "cpu_cores": round((last[2][i] - first[2][i]) / span, 3),
            }
            for i in range(len(self.pids))
        ]
        controllers = sum(last[2]) - sum(first[2])
        load = last[3] - first[3]
        machine = last[4] - first[4]
        out: dict[str, Any] = {
            "rss_mb": max(r["rss_mb"] for r in replicas),
            "rss_max_mb": max(r["rss_max_mb"] for r in replicas),
            "cpu_cores": round(controllers / span, 3),
            "load_generator_cpu_cores": round(load / span, 3),
            # this machine is shared: what other processes took meanwhile (of os.cpu_count())
            # (with PostgreSQL, its processes are counted here too)
            "other_processes_cpu_cores": round(max(0.0, machine - controllers - load) / span, 3),
            "seconds": round(span, 1),
        }
        if len(replicas) > 1:
            out["replicas"] = replicas
        return out


@dataclass
class Plan:
    agents: int
    workers: int
    interval: float
    warmup: float
    steady: float
    probe_every: float
    probe_batch: int
    poll_interval: float
    fanout_rounds: int
    apply_delay: float
    event_probability: float
    tls: bool
    connect_timeout: float
    keep: bool
    worker_nice: int = 0
    same_session: bool = False
    # each simulator worker in a session of its own: with autogroup scheduling, its own
    # share of the CPUs (as the controller has), not one share for all the workers
    worker_sessions: bool = False
    split_cpus: bool = False  # controller on CPU 0, simulated agents on the other CPUs
    replicas: int = 1
    db: str = "sqlite"  # or "postgresql": a server started here as tests/pg_harness.py does
    generator: str = "python"  # or "go": the simulated agents of benchmarks/simagent


@dataclass
class ControllerProc:
    """One `nfctl controller` process: the only one with SQLite, a replica with PostgreSQL."""

    name: str
    log_path: Path
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    proc: asyncio.subprocess.Process | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class Bench:
    def __init__(self, plan: Plan, tmp: Path) -> None:
        self.plan = plan
        self.tmp = tmp
        self.controllers = [
            ControllerProc(f"r{i}", tmp / f"controller-r{i}.log") for i in range(plan.replicas)
        ]
        self.endpoints = [c.address for c in self.controllers]
        self.pki = tmp / "pki" if plan.tls else None
        self.workers: list[WorkerHandle] = []
        self.channels: list[grpc.aio.Channel] = []
        # the aio stubs, one per replica (the generated stubs are typed for sync)
        self.fleets: list[Any] = []
        self.sampler: Sampler | None = None
        self.postgres: Any = None  # tests.pg_harness.PgServer with --db postgresql
        self.db_url = ""
        # agents with a probe still awaited: a second probe would overwrite the revision the
        # first one waits for, and count as a miss of the controller's
        self.probing: set[int] = set()
        # ListNodes polls that failed and were asked again: reported, never a crash
        self.poll_errors: list[str] = []

    # -- setup -------------------------------------------------------------------------------
    def make_pki(self) -> None:
        from nfctl.controller.auth import OPERATORS_ORG
        from nfctl.controller.certs import ensure_ca, issue

        assert self.pki is not None
        ensure_ca(self.pki)
        issue(
            self.pki,
            "controller",
            "localhost",
            None,
            ["localhost", "127.0.0.1"],
            client=False,
            server=True,
        )
        issue(self.pki, "operator", "operator", OPERATORS_ORG)

    def _cpus(self, controller: bool) -> list[str]:
        """taskset prefix: with --split-cpus the controller gets CPU 0 to itself, as on a
        real deployment where agents run on other machines; the simulator the rest."""
        cpus = sorted(os.sched_getaffinity(0))
        if not self.plan.split_cpus or len(cpus) < 2:
            return []
        chosen = cpus[:1] if controller else cpus[1:]
        return ["taskset", "-c", ",".join(str(c) for c in chosen)]

    def start_postgres(self) -> None:
        """A PostgreSQL server in a temporary directory, as the tests start it (initdb,
        unix socket only, fsync off), and a fresh database for the replicas."""
        from tests.pg_harness import PgServer, _bin_dir

        bindir = _bin_dir()
        if bindir is None:
            raise SystemExit("PostgreSQL is not installed (apt-get install postgresql)")
        self.postgres = PgServer(bindir).start()
        self.db_url = self.postgres.create_database()

    async def start_controllers(self) -> None:
        if self.plan.db == "postgresql":
            await asyncio.to_thread(self.start_postgres)
        for controller in self.controllers:
            await self.start_controller(controller)

    async def start_controller(self, controller: ControllerProc) -> None:
        db = self.db_url or str(self.tmp / "controller.db")
        args = [
            *self._cpus(controller=True),
            sys.executable,
            "-m",
            "nfctl",
            "controller",
            "--listen",
            controller.address,
            "--db",
            db,
            "--webhook-addr",
            "",
            "--health-listen",
            "",
            "--metrics-addr",
            f"127.0.0.1:{controller.metrics_port}",
        ]
        if self.db_url:
            args += ["--replica", controller.name]
        if self.pki is None:
            args.append("--insecure")
        else:
            for flag, name in (
                ("--tls-ca", "ca.crt"),
                ("--tls-cert", "controller.crt"),
                ("--tls-key", "controller.key"),
            ):
                args += [flag, str(self.pki / name)]
        log = controller.log_path.open("w")
        # Its own session, as a daemon started by an init system would have: with the
        # kernel's autogroup scheduling, CPU is then shared fairly between the controller
        # and the simulated fleet (4 processes, ~40 gRPC threads) instead of per thread.
        controller.proc = proc = await asyncio.create_subprocess_exec(
            *args,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            cwd=REPO_ROOT,
            start_new_session=not self.plan.same_session,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if "controller listening" in controller.log_path.read_text():
                return
            if proc.returncode is not None:
                break
            await asyncio.sleep(0.1)
        raise RuntimeError(
            f"controller {controller.name} did not start:\n"
            + controller.log_path.read_text()[-3000:]
        )

    async def start_workers(self) -> None:
        plan = self.plan
        simagent = build_simagent(self.tmp) if plan.generator == "go" else None
        per = -(-plan.agents // plan.workers)
        for index in range(plan.workers):
            first = index * per
            count = max(0, min(per, plan.agents - first))
            if count == 0:
                break
            config = WorkerConfig(
                index=index,
                first=first,
                count=count,
                endpoints=self.endpoints,
                interval=plan.interval,
                event_probability=plan.event_probability,
                apply_delay=plan.apply_delay,
                pki=str(self.pki or ""),
                nice=plan.worker_nice,
                simagent=str(simagent or ""),
            )
            proc = await asyncio.create_subprocess_exec(
                *self._cpus(controller=False),
                sys.executable,
                "-m",
                "benchmarks.controller_scale",
                "--worker",
                json.dumps(config.__dict__),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=(self.tmp / f"worker-{index}.log").open("w"),
                cwd=REPO_ROOT,
                limit=1 << 26,
                start_new_session=plan.worker_sessions,
            )
            self.workers.append(WorkerHandle(proc, first, count))
        # issuing thousands of certificates takes a while (not measured)
        await asyncio.gather(*(asyncio.wait_for(w.ready, 1800) for w in self.workers))

    def operator_channel(self, target: str) -> grpc.aio.Channel:
        options = [("grpc.max_receive_message_length", 1 << 30)]
        if self.pki is None:
            return grpc.aio.insecure_channel(target, options=options)
        creds = grpc.ssl_channel_credentials(
            root_certificates=(self.pki / "ca.crt").read_bytes(),
            private_key=(self.pki / "operator.key").read_bytes(),
            certificate_chain=(self.pki / "operator.crt").read_bytes(),
        )
        return grpc.aio.secure_channel(target, creds, options=options)

    def worker_of(self, index: int) -> WorkerHandle:
        for worker in self.workers:
            if worker.first <= index < worker.first + worker.count:
                return worker
        raise KeyError(index)

    async def gather_stats(self) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(w.call("stats") for w in self.workers)))

    def controller_metric(self, controller: ControllerProc, name: str) -> float | None:
        url = f"http://127.0.0.1:{controller.metrics_port}/metrics"
        try:
            text = urllib.request.urlopen(url, timeout=30).read().decode()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{}"):
                return float(line.rsplit(" ", 1)[1])
        return None

    def store_counters(self) -> dict[str, float] | None:
        """PostgreSQL's own counters (None with SQLite): write transactions (transaction ids
        assigned; read-only ones get none), all commits, node and event rows written, and
        the CPU seconds of its processes."""
        if not self.db_url:
            return None
        import psycopg

        with psycopg.connect(self.db_url) as conn:
            xid = conn.execute(
                "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint"
            ).fetchone()
            commits = conn.execute(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
            ).fetchone()
            rows: dict[str, int] = dict(
                conn.execute(
                    "SELECT relname, n_tup_ins + n_tup_upd FROM pg_stat_user_tables "
                    "WHERE relname IN ('nodes', 'events')"
                ).fetchall()
            )
            size = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        assert xid is not None and commits is not None and size is not None
        return {
            "t": time.monotonic(),
            "write_xacts": float(xid[0]),
            "commits": float(commits[0]),
            "node_rows": float(rows.get("nodes", 0)),
            "event_rows": float(rows.get("events", 0)),
            "bytes": float(size[0]),
            "cpu_s": sum(cpu_seconds(pid) for pid in self.postgres.processes()),
        }

    def store_summary(
        self, before: dict[str, float] | None, after: dict[str, float] | None
    ) -> dict[str, Any]:
        if before is None or after is None:
            return {"db": "sqlite (one controller, its own file)"}
        span = after["t"] - before["t"]
        period = self.plan.interval

        def per_period(key: str) -> float:
            return round((after[key] - before[key]) / span * period, 1)

        return {
            "db": "postgresql (started here as tests/pg_harness.py does: unix socket, fsync off)",
            "window_s": round(span, 1),
            "status_period_s": period,
            "write_transactions_per_period": per_period("write_xacts"),
            "write_transactions_per_s": round(
                (after["write_xacts"] - before["write_xacts"]) / span, 1
            ),
            # pg_stat counters reach the statistics collector with a delay of up to ~1 s
            "commits_per_s": round((after["commits"] - before["commits"]) / span, 1),
            "node_rows_per_period": per_period("node_rows"),
            "event_rows_per_period": per_period("event_rows"),
            "database_mb": round(after["bytes"] / 2**20, 1),
            "postgres_cpu_cores": round((after["cpu_s"] - before["cpu_s"]) / span, 3),
        }

    # -- phases ------------------------------------------------------------------------------
    async def connect_all(self) -> dict[str, Any]:
        start = time.time()
        await asyncio.gather(*(w.call("connect") for w in self.workers))
        deadline = time.monotonic() + self.plan.connect_timeout
        count = 0
        while time.monotonic() < deadline:
            replies = await asyncio.gather(*(w.call("stats") for w in self.workers))
            count = sum(r["registered"] for r in replies)
            if count >= self.plan.agents:
                break
            await asyncio.sleep(0.25)
        replies = await asyncio.gather(*(w.call("registered") for w in self.workers))
        pairs = [tuple(p) for r in replies for p in r["times"]]
        last = max((reg for _, reg in pairs), default=start)
        return {
            "registered": len(pairs),
            "all_registered_s": round(last - start, 3) if len(pairs) >= self.plan.agents else None,
            "last_registered_s": round(last - start, 3),
            "per_agent_ms": summary_ms([reg - began for began, reg in pairs]),
        }

    async def probe_batch(
        self, rng: random.Random, seq: int, samples: list[tuple[float, bool]]
    ) -> int:
        """Probe a few agents and poll one replica (in turn) until it shows them; samples
        get (seconds, whether the polled replica is not the one holding the agent)."""
        polled = seq % len(self.fleets)
        idle = [i for i in range(self.plan.agents) if i not in self.probing]
        chosen = rng.sample(idle, min(self.plan.probe_batch, len(idle)))
        if not chosen:
            return 0
        self.probing.update(chosen)
        try:
            return await self._probe(chosen, seq, samples, polled)
        finally:
            self.probing.difference_update(chosen)

    async def _probe(
        self, chosen: list[int], seq: int, samples: list[tuple[float, bool]], polled: int
    ) -> int:
        revision = f"probe-{seq:06d}-" + sha(f"probe{seq}", 24)
        by_worker: dict[int, list[list[Any]]] = {}
        for index in chosen:
            by_worker.setdefault(self.workers.index(self.worker_of(index)), []).append(
                [index, revision]
            )
        sent_replies = await asyncio.gather(
            *(self.workers[w].call("probe", agents=agents) for w, agents in by_worker.items())
        )
        sent: dict[str, list[Any]] = {k: v for r in sent_replies for k, v in r.items()}
        seen: dict[str, float] = {}
        request = pb.ListNodesRequest(selector=pb.NodeSelector(nodes=list(sent)))
        deadline = time.time() + 30
        while len(seen) < len(sent) and time.time() < deadline:
            try:
                reply = await self.fleets[polled].ListNodes(request, timeout=30)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE):
                    raise
                # a broken connection (seen once: the TLS layer's TSI_DATA_CORRUPTED on
                # this operator channel): the channel reconnects, the poll is asked again
                self.poll_errors.append(f"{exc.code().name}: {exc.details()}")
                await asyncio.sleep(self.plan.poll_interval)
                continue
            now = time.time()
            for node in reply.nodes:
                name = node.status.node
                if name not in seen and node.status.last_applied_revision == revision:
                    seen[name] = now
            if len(seen) < len(sent):
                await asyncio.sleep(self.plan.poll_interval)
        for name, t_seen in seen.items():
            sent_at, holder = sent[name]
            samples.append((t_seen - sent_at, holder != polled))
        return len(sent) - len(seen)

    async def visibility(self, duration: float) -> dict[str, Any]:
        rng = random.Random(42)
        samples: list[tuple[float, bool]] = []
        missed = 0
        pending: set[asyncio.Task[int]] = set()
        end = time.monotonic() + duration
        seq = 0
        while time.monotonic() < end:
            seq += 1
            pending.add(asyncio.create_task(self.probe_batch(rng, seq, samples)))
            done = {t for t in pending if t.done()}
            missed += sum(t.result() for t in done)
            pending -= done
            await asyncio.sleep(self.plan.probe_every)
        if pending:
            missed += sum(await asyncio.gather(*pending))
        seconds = [t for t, _ in samples]
        out = {
            "method": (
                "probe: an agent sends a status with a new lastAppliedRevision; the operator "
                "polls ListNodes(selector.nodes=[probed]) every "
                f"{self.plan.poll_interval * 1000:.0f} ms until it shows it"
                + (" (each probe on the replicas in turn)" if len(self.fleets) > 1 else "")
            ),
            **summary_ms(seconds),
            "p99_9": round(percentile([s * 1000 for s in seconds], 99.9), 3),
            "max": round(max(seconds, default=0) * 1000, 3),
            "not_seen_within_30s": missed,
            "poll_errors": len(self.poll_errors),
            "poll_error_examples": sorted(set(self.poll_errors))[:3],
        }
        if len(self.fleets) > 1:
            # the hard case: the status reached replica A, the operator asks replica B
            cross = [t for t, other in samples if other]
            out["other_replica"] = {
                **summary_ms(cross),
                "max": round(max(cross, default=0) * 1000, 3),
            }
        return out

    async def fanout_round(self, round_no: int, connected: int) -> dict[str, Any]:
        """An operator Reconcile on one replica (in turn): with several, most agents are
        on the others and get it through the store (PostgreSQL NOTIFY)."""
        via = round_no % len(self.fleets)
        revision = sha(f"fanout-{round_no}-{time.time()}")
        start = time.time()
        reply = await self.fleets[via].Reconcile(pb.ReconcileRequest(revision=revision), timeout=60)
        rpc = time.time() - start
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            counts = await asyncio.gather(
                *(w.call("fanout_count", revision=revision) for w in self.workers)
            )
            if sum(counts) >= len(reply.nodes):
                break
            await asyncio.sleep(0.1)
        end = time.time()
        per_worker = await asyncio.gather(
            *(w.call("fanout_times", revision=revision) for w in self.workers)
        )
        lags = await asyncio.gather(
            *(w.call("loop_lag", since=start, until=end) for w in self.workers)
        )
        times = [t for r in per_worker for t, _ in r]
        delays = [t - start for t in times]
        out: dict[str, Any] = {
            "via_replica": self.controllers[via].name,
            "sent_to": len(reply.nodes),
            "offline": len(reply.offline),
            "connected_before": connected,
            "reached": len(times),
            "rpc_ms": round(rpc * 1000, 1),
            "last_ms": round(max(delays, default=0) * 1000, 1),
            "p50_ms": round(percentile(delays, 50) * 1000, 1),
            "p99_ms": round(percentile(delays, 99) * 1000, 1),
            # a tail in one worker only points at the load generator, not the controller
            "last_ms_per_worker": [
                round((max((t for t, _ in r), default=start) - start) * 1000) for r in per_worker
            ],
            # the longest a worker's event loop ran late in the round: a message received
            # then waited that long behind the process's other simulated agents
            "worker_loop_lag_max_ms": [lag["max_ms"] for lag in lags],
        }
        out["where_the_time_goes"] = await self.fanout_breakdown(start, per_worker)
        return out

    async def fanout_breakdown(
        self, start: float, per_worker: list[list[list[float]]]
    ) -> list[dict[str, Any]]:
        """Per replica, ms from the operator's call: the controller's side from its log
        line for the command (stored, relayed to this replica, claimed, queued on every
        stream, p50 and last stream write completed), then the load generator's (its agents
        saw it: p50 and last; `generator_ms`: last seen - last written)."""
        lines: list[dict[str, Any] | None] = [None] * len(self.controllers)
        # a replica logs a fan-out it wrote to streams of its own; only the PostgreSQL
        # fan-out (commands.CommandFanout) is timed
        holders = {int(held) for r in per_worker for _, held in r} if self.db_url else set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for i in holders:
                if lines[i] is None:
                    lines[i] = fanout_log_line(self.controllers[i].log_path, start)
            if all(lines[i] is not None for i in holders):
                break
            await asyncio.sleep(0.2)
        out = []
        for i, controller in enumerate(self.controllers):
            seen = sorted(t - start for r in per_worker for t, held in r if held == i)
            row: dict[str, Any] = {
                "replica": controller.name,
                "agents_seen_p50_ms": round(percentile(seen, 50) * 1000, 1) if seen else None,
                "agents_seen_last_ms": round(seen[-1] * 1000, 1) if seen else None,
            }
            line = lines[i]
            if line is not None:
                base = line["recorded"] - start

                def at(key: str, base: float = base, line: dict[str, Any] = line) -> float:
                    return round((base + float(line[key])) * 1000, 1)

                row.update(
                    streams=line["streams"],
                    written=line["written"],
                    stored_ms=round(base * 1000, 1),
                    relayed_ms=at("relay"),
                    claimed_ms=at("claim"),
                    queued_ms=at("queue"),
                    written_p50_ms=at("write_p50"),
                    written_last_ms=at("write_last"),
                )
                if seen:
                    row["generator_ms"] = round(row["agents_seen_last_ms"] - at("write_last"), 1)
            out.append(row)
        return out

    async def operator_queries(self) -> dict[str, Any]:
        fleet = self.fleets[0]
        out: dict[str, Any] = {}
        times, size = [], 0
        for _ in range(3):
            start = time.perf_counter()
            reply = await fleet.ListNodes(pb.ListNodesRequest(), timeout=120)
            times.append(time.perf_counter() - start)
            size = reply.ByteSize()
            count = len(reply.nodes)
        out["list_nodes_all"] = {
            "nodes": count,
            "bytes": size,
            "ms": [round(t * 1000, 1) for t in times],
        }
        if len(self.fleets) > 1:  # the whole fleet from every replica, connected or not
            views = await asyncio.gather(
                *(f.ListNodes(pb.ListNodesRequest(), timeout=120) for f in self.fleets)
            )
            out["list_nodes_all"]["nodes_per_replica"] = [len(v.nodes) for v in views]
            out["list_nodes_all"]["connected_per_replica"] = [
                sum(1 for n in v.nodes if n.connected) for v in views
            ]
        times = []
        for _ in range(3):
            start = time.perf_counter()
            functions = await fleet.ListFunctions(pb.ListFunctionsRequest(), timeout=120)
            times.append(time.perf_counter() - start)
        out["list_functions"] = {
            "functions": len(functions.functions),
            "ms": [round(t * 1000, 1) for t in times],
        }
        get = []
        for index in random.Random(7).sample(range(self.plan.agents), min(200, self.plan.agents)):
            start = time.perf_counter()
            await fleet.GetNode(pb.GetNodeRequest(name=node_name(index)), timeout=30)
            get.append(time.perf_counter() - start)
        out["get_node_ms"] = summary_ms(get)
        return out

    # -- the run -----------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        plan = self.plan
        nofile = raise_nofile()
        if self.pki is not None:
            await asyncio.to_thread(self.make_pki)
        try:
            await self.start_controllers()
            setup = time.monotonic()
            await self.start_workers()
            setup_s = time.monotonic() - setup
            pids = [c.proc.pid for c in self.controllers if c.proc is not None]
            self.sampler = Sampler(pids, [w.pid for w in self.workers])
            sampling = asyncio.create_task(self.sampler.run())
            self.channels = [self.operator_channel(c.address) for c in self.controllers]
            self.fleets = [pbg.FleetServiceStub(channel) for channel in self.channels]

            t_connect = time.monotonic()
            connect = await self.connect_all()
            connect_window = self.sampler.window(t_connect, time.monotonic())
            await asyncio.gather(*(w.call("settle", timeout=600) for w in self.workers))
            await asyncio.sleep(plan.warmup)

            t_steady = time.monotonic()
            store_before = await asyncio.to_thread(self.store_counters)
            visibility = await self.visibility(plan.steady)
            store_after = await asyncio.to_thread(self.store_counters)
            steady = self.sampler.window(t_steady, time.monotonic())
            stats = await self.gather_stats()
            connected_metrics = [
                await asyncio.to_thread(
                    self.controller_metric, c, "nfctl_controller_agents_connected"
                )
                for c in self.controllers
            ]
            connected = sum(s["connected"] for s in stats)

            t_fanout = time.monotonic()
            rounds = []
            for round_no in range(plan.fanout_rounds):
                rounds.append(await self.fanout_round(round_no, connected))
                await asyncio.sleep(plan.interval)
            fanout_window = self.sampler.window(t_fanout, time.monotonic())
            queries = await self.operator_queries()
            final = await self.gather_stats()
            sampling.cancel()
        finally:
            await self.shutdown()
        status_reports = sum(s["statuses"] for s in final)
        logs = [c.log_path.read_text(errors="replace") for c in self.controllers]
        codes = [c.proc.returncode if c.proc else None for c in self.controllers]
        result: dict[str, Any] = {
            "benchmark": "controller_scale",
            "simulated_agents": SIMULATED_NOTE,
            "generator": (
                "Go (benchmarks/simagent): the same agents and messages as the Python "
                f"workers; {go_versions()}"
                if plan.generator == "go"
                else f"Python (grpc.aio workers); grpcio {grpc.__version__}"
            ),
            "scheduling": (
                "controller in its own session"
                if not plan.same_session
                else "controller in the benchmark's session"
            )
            + f" (kernel autogroup {'on' if autogroup() else 'off'})"
            + (f"; simulated agents at nice {plan.worker_nice}" if plan.worker_nice else "")
            + ("; each simulator worker in its own session" if plan.worker_sessions else "")
            + (
                "; CPUs split: controller on CPU 0 alone, simulated agents on the others"
                if plan.split_cpus
                else "; controller and simulated agents share all CPUs"
            ),
            "transport": (
                "mTLS: a client certificate per simulated agent, node identity check on"
                if plan.tls
                else "plaintext (--insecure) on loopback; no TLS handshakes or record crypto"
            ),
            "store": self.store_summary(store_before, store_after),
            "agents": {
                "requested": plan.agents,
                "registered": connect["registered"],
                "connected_at_steady_end": connected,
                "controller_metric_agents_connected": (
                    None
                    if None in connected_metrics
                    else sum(m for m in connected_metrics if m is not None)
                ),
                "connected_per_replica": [
                    sum(s["connected_per_replica"][r] for s in stats)
                    for r in range(len(self.controllers))
                ],
                "workers": len(self.workers),
                "report_interval_s": plan.interval,
                "report_jitter": "+-20%",
                "status_bytes_mean": round(
                    sum(s["status_bytes_sampled"] for s in final)
                    / max(1, sum(s["status_samples"] for s in final))
                ),
                "events_per_status": plan.event_probability,
                "setup_s_not_measured": round(setup_s, 1),
            },
            "connect": {**connect, "controller_during_connect": connect_window},
            "visibility_ms": visibility,
            "fanout": {
                "method": (
                    "operator Reconcile(all nodes, revision) -> time until each simulated agent "
                    "received the Command (agents timestamp receipt; same machine clock). Agents "
                    "answer with a CommandResult and report the revision as applied after "
                    f"{plan.apply_delay * 0.2:.1f}-{plan.apply_delay:.1f} s, like real agents"
                ),
                "breakdown": (
                    "where_the_time_goes: per replica, ms from the operator call; stored .. "
                    "written_last_ms from that replica's log line for the command (wall clock, "
                    "same machine), agents_seen_* from the simulated agents holding a stream "
                    "to it; generator_ms = agents_seen_last_ms - written_last_ms (can be < 0: "
                    "an agent may read a message before its writer's completion is handled). "
                    "SQLite (one controller) logs no breakdown."
                ),
                "rounds": rounds,
                "worst_last_ms": max((r["last_ms"] for r in rounds), default=None),
                "worst_p99_ms": max((r["p99_ms"] for r in rounds), default=None),
                "all_reached": all(r["reached"] >= r["sent_to"] for r in rounds),
                "controller_during_fanout": fanout_window,
            },
            # with several replicas: RSS figures are the largest replica's, CPU all of them
            # together; each one's under "replicas"
            "controller": {
                "rss_peak_mb": max(self.sampler.peak_mb(i) for i in range(len(self.controllers))),
                "rss_steady_mb": steady.get("rss_mb"),
                "cpu_cores_steady": steady.get("cpu_cores"),
                "steady_window": steady,
                "threads_max": self.sampler.max_threads,
                "fds_max": self.sampler.max_fds,
                "exit_code": next((c for c in codes if c != 0), 0),
                "log_tracebacks": sum(text.count("Traceback") for text in logs),
                "log_stream_errors": sum(text.count("stream error") for text in logs),
                "replicas": [
                    {
                        "name": c.name,
                        "agents_connected_metric": connected_metrics[i],
                        "rss_peak_mb": self.sampler.peak_mb(i),
                        **{
                            f"{k}_steady": v for k, v in (steady.get("replicas") or [{}])[i].items()
                        },
                        "exit_code": codes[i],
                        "log_tracebacks": logs[i].count("Traceback"),
                    }
                    for i, c in enumerate(self.controllers)
                ],
            },
            "errors": {
                "connect_errors": sum(s["connect_errors"] for s in final),
                "stream_errors": sum(s["stream_errors"] for s in final),
                "reconnects": sum(s["reconnects"] for s in final),
                "examples": [e for s in final for e in s["errors"]][:10],
            },
            "load": {
                "status_reports": status_reports,
                "events": sum(s["events"] for s in final),
                "command_results": sum(s["results"] for s in final),
            },
            "operator_queries": queries,
            "rlimit_nofile": list(nofile),
            "plan": dict(plan.__dict__),
        }
        result["targets"] = self.targets(result)
        result["machine"] = machine()
        return result

    def targets(self, r: dict[str, Any]) -> dict[str, Any]:
        fan = r["fanout"]["worst_last_ms"]
        visibility = [r["visibility_ms"], *filter(None, [r["visibility_ms"].get("other_replica")])]
        return {
            **TARGETS,
            "met": {
                "agents": r["agents"]["registered"] >= TARGETS["agents"],
                # from either replica: also where the operator asks one that does not hold
                # the agent's stream
                "visibility_p99": all(
                    v["n"] > 0 and v["p99"] < TARGETS["visibility_p99_ms"] for v in visibility
                ),
                "fanout_all": fan is not None
                and fan < TARGETS["fanout_all_ms"]
                and r["fanout"]["all_reached"],
                "rss": r["controller"]["rss_peak_mb"] < TARGETS["rss_mb"],
            },
        }

    async def shutdown(self) -> None:
        for channel in self.channels:
            await channel.close()
        for worker in self.workers:
            with contextlib.suppress(Exception):
                await worker.call("stop", timeout=60)
        for worker in self.workers:
            try:
                await asyncio.wait_for(worker.proc.wait(), 30)
            except TimeoutError:
                worker.proc.kill()
                await worker.proc.wait()
        for controller in self.controllers:
            proc = controller.proc
            if proc is not None and proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for controller in self.controllers:
            proc = controller.proc
            if proc is None:
                continue
            try:
                await asyncio.wait_for(proc.wait(), 60)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self.postgres is not None:
            await asyncio.to_thread(self.postgres.remove)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=10_000, help="simulated agents")
    parser.add_argument("--quick", action="store_true", help="smoke test: 200 agents, short")
    parser.add_argument("--workers", type=int, default=4, help="load-generator processes")
    parser.add_argument("--interval", type=float, default=5.0, help="status period (s, +-20%%)")
    parser.add_argument("--warmup", type=float, default=None, help="after connect (s)")
    parser.add_argument("--steady", type=float, default=60.0, help="visibility window (s)")
    parser.add_argument("--probe-every", type=float, default=0.5, help="probe period (s)")
    parser.add_argument("--probe-batch", type=int, default=4, help="agents per probe")
    parser.add_argument("--poll-interval", type=float, default=0.02, help="ListNodes poll (s)")
    parser.add_argument("--fanout-rounds", type=int, default=3)
    parser.add_argument(
        "--apply-delay", type=float, default=3.0, help="simulated fetch+apply after reconcile (s)"
    )
    parser.add_argument(
        "--events-per-status", type=float, default=0.1, help="chance of an event per status"
    )
    parser.add_argument("--tls", action="store_true", help="mTLS with a certificate per agent")
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="controller replicas (needs --db postgresql when more than one); the simulated "
        "agents start spread over them and each knows every replica",
    )
    parser.add_argument(
        "--db",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="the controllers' store: a SQLite file, or a PostgreSQL server started here "
        "(as tests/pg_harness.py does) that the replicas share",
    )
    parser.add_argument(
        "--worker-nice",
        type=int,
        default=0,
        help="run the simulated agents at this nice level (they share this machine's CPUs "
        "with the controller; real agents run on other machines)",
    )
    parser.add_argument(
        "--same-session",
        action="store_true",
        help="run the controller in this session (one scheduling group with the simulated "
        "agents) instead of its own",
    )
    parser.add_argument(
        "--worker-sessions",
        action="store_true",
        help="start each simulator worker in a session of its own: with the kernel's "
        "autogroup scheduling each then gets a CPU share like a controller replica, instead "
        "of all workers (and this process) sharing one",
    )
    parser.add_argument(
        "--split-cpus",
        action="store_true",
        help="pin the controller to CPU 0 and the simulated agents to the other CPUs",
    )
    parser.add_argument(
        "--generator",
        choices=["python", "go"],
        default="python",
        help="the simulated agents' implementation: the Python workers, or the same agents "
        "in Go (benchmarks/simagent; a load generator that costs the shared CPUs less per "
        "message)",
    )
    parser.add_argument("--connect-timeout", type=float, default=300.0)
    parser.add_argument("--keep", action="store_true", help="keep logs in the temp folder")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.replicas < 1 or (args.replicas > 1 and args.db != "postgresql"):
        parser.error("--replicas > 1 needs --db postgresql (SQLite serves one controller)")
    if args.worker:
        asyncio.run(worker_main(WorkerConfig(**json.loads(args.worker))))
        return
    if args.quick:
        args.agents = min(args.agents, 200)
        args.steady = min(args.steady, 10.0)
        args.interval = min(args.interval, 2.0)
        args.fanout_rounds = min(args.fanout_rounds, 2)
    plan = Plan(
        agents=args.agents,
        workers=max(1, min(args.workers, args.agents)),
        interval=args.interval,
        warmup=args.warmup if args.warmup is not None else min(2 * args.interval, 10.0),
        steady=args.steady,
        probe_every=args.probe_every,
        probe_batch=args.probe_batch,
        poll_interval=args.poll_interval,
        fanout_rounds=args.fanout_rounds,
        apply_delay=args.apply_delay,
        event_probability=args.events_per_status,
        tls=args.tls,
        connect_timeout=args.connect_timeout,
        keep=args.keep,
        worker_nice=args.worker_nice,
        same_session=args.same_session,
        worker_sessions=args.worker_sessions,
        split_cpus=args.split_cpus,
        replicas=args.replicas,
        db=args.db,
        generator=args.generator,
    )
    tmp = Path(tempfile.mkdtemp(prefix="nfctl-scale-"))
    try:
        result = asyncio.run(Bench(plan, tmp).run())
    except BaseException:
        print(f"logs kept in {tmp}", file=sys.stderr)
        raise
    if plan.keep:
        result["logs"] = str(tmp)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    emit(result, args.json)


if __name__ == "__main__":
    main()
