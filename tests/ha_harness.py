"""Controller replicas on a shared PostgreSQL, and simulated agents for them: real
controller processes, real gRPC with mTLS on loopback; each agent keeps an event log and
resends from the acknowledged point after every reconnect, moving to the next replica of
its list whenever a stream ends (like nfctl/agent/controller_link.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import grpc

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.api.nfctl.v1 import nfctl_pb2_grpc as pbg
from nfctl.lab.process import REPO_ROOT, Process, controller_command, tls_flags, wait_until
from tests import loopback_controller
from tests.loopback_controller import free_port

PY = sys.executable


def make_pki(folder: Path, nodes: list[str]) -> Path:
    return loopback_controller.make_pki(folder, nodes, ["operator"])


class Replica(Process):
    """`nfctl controller --db postgresql://...` as its own process."""

    def __init__(self, name: str, db_url: str, pki: Path, workdir: Path, *extra: str) -> None:
        self.name = name
        self.port, self.metrics_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.pki = pki
        command = controller_command(
            self.address, db_url, pki, "--replica", name, "--webhook-addr", "",
            "--metrics-addr", f"127.0.0.1:{self.metrics_port}", "--health-listen", "", *extra,
        )  # fmt: skip
        super().__init__(command, workdir / f"controller-{name}.log")

    def start(self, ready: str | None = "controller listening", timeout: float = 30) -> Self:
        super().start(ready, timeout)
        return self

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 20) -> int:
        return super().stop(signum, timeout)

    def metric(self, name: str) -> float | None:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
            ) as response:
                text = response.read().decode()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None

    def reconcile(self) -> pb.ReconcileResponse:
        """FleetService.Reconcile for every node, as an operator (mTLS), over gRPC."""
        creds = grpc.ssl_channel_credentials(
            root_certificates=(self.pki / "ca.crt").read_bytes(),
            private_key=(self.pki / "operator.key").read_bytes(),
            certificate_chain=(self.pki / "operator.crt").read_bytes(),
        )
        with grpc.secure_channel(self.address, creds) as channel:
            response: pb.ReconcileResponse = pbg.FleetServiceStub(channel).Reconcile(
                pb.ReconcileRequest(
                    revision="",
                ),
                timeout=30,
            )
        return response

    def operator(self, *args: str, as_json: bool = True) -> Any:
        """The nfctl CLI against this replica; parsed JSON output (else the text)."""
        proc = subprocess.run(
            [PY, "-m", "nfctl", *args, "--controller", self.address,
             *tls_flags(self.pki, "operator"), *(["-o", "json"] if as_json else [])],
            capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
        )  # fmt: skip
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed: {proc.stdout}{proc.stderr}")
        return json.loads(proc.stdout) if as_json else proc.stdout


@dataclass
class SimAgent:
    name: str
    endpoints: list[str]
    pki: Path
    sequence: int = 0
    log: list[pb.Event] = field(default_factory=list)
    commands: list[tuple[str, float]] = field(default_factory=list)  # (id, executed at)
    repeats: int = 0  # a command id received again (resent): answered, not executed
    connected_to: str = ""
    sessions: int = 0
    index: int = 0
    _call: Any = None

    def add_event(self, reason: str) -> None:
        self.sequence += 1
        self.log.append(
            pb.Event(node=self.name, sequence=self.sequence, time=time.time(), type="Normal",
                     reason=reason, message=f"{reason} {self.sequence}")
        )  # fmt: skip

    def _credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=(self.pki / "ca.crt").read_bytes(),
            private_key=(self.pki / f"{self.name}.key").read_bytes(),
            certificate_chain=(self.pki / f"{self.name}.crt").read_bytes(),
        )

    async def run(self, stopping: asyncio.Event) -> None:
        failures = 0
        while not stopping.is_set():
            target = self.endpoints[self.index % len(self.endpoints)]
            channel = grpc.aio.secure_channel(target, self._credentials())
            try:
                await self._session(channel, target)
                failures = 0
            except (grpc.aio.AioRpcError, RuntimeError):
                failures += 1
            finally:
                self.connected_to = ""
                self._call = None
                await channel.close(grace=None)
            self.index += 1
            await asyncio.sleep(min(2.0, 0.2 * 2 ** min(failures, 4)) * random.uniform(0.5, 1.0))

    async def _session(self, channel: grpc.aio.Channel, target: str) -> None:
        call = pbg.AgentServiceStub(channel).Connect()
        await call.write(
            pb.AgentMessage(register=pb.Register(
                node=self.name, event_epoch="sim", kernel="6.18", agent_version="sim",
                last_event_sequence=self.sequence,
                first_event_sequence=self.log[0].sequence if self.log else 1,
            ))
        )  # fmt: skip
        first: Any = await call.read()
        if first is grpc.aio.EOF or first.WhichOneof("body") != "registered":
            raise RuntimeError("no Registered")
        acked = first.registered.acked_event_sequence
        self._call = call
        self.connected_to = target
        self.sessions += 1
        resend = [e for e in self.log if e.sequence > acked]
        if resend:
            await call.write(pb.AgentMessage(events=pb.EventReport(events=resend)))
        status = pb.NodeStatus(node=self.name, last_applied_revision="r1", observed_at=time.time())
        await call.write(pb.AgentMessage(status=pb.StatusReport(status=status)))
        while True:
            message: Any = await call.read()
            if message is grpc.aio.EOF:
                raise RuntimeError("stream ended")
            if message.WhichOneof("body") == "command":
                # like the real agent: a command id already executed is only answered
                if any(cid == message.command.id for cid, _ in self.commands):
                    self.repeats += 1
                else:
                    self.commands.append((message.command.id, time.time()))
                result = pb.CommandResult(command_id=message.command.id, ok=True)
                await call.write(pb.AgentMessage(result=result))

    async def send_status(self, revision: str) -> None:
        """A status with a new applied revision: a significant change, stored at the next
        flush."""
        call = self._call
        if call is not None:
            status = pb.NodeStatus(
                node=self.name, last_applied_revision=revision, observed_at=time.time()
            )
            with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
                await call.write(pb.AgentMessage(status=pb.StatusReport(status=status)))

    async def send_new_events(self, count: int, reason: str) -> None:
        for _ in range(count):
            self.add_event(reason)
        call = self._call
        if call is not None:
            with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
                await call.write(pb.AgentMessage(events=pb.EventReport(events=self.log[-count:])))


class AgentPool:
    """Simulated agents on an asyncio loop in a thread of the test process."""

    def __init__(self, agents: list[SimAgent]) -> None:
        self.agents = agents
        self.loop = asyncio.new_event_loop()
        self.stopping = asyncio.Event()
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            await asyncio.gather(*(a.run(self.stopping) for a in self.agents))

        with contextlib.suppress(Exception, asyncio.CancelledError):
            self.loop.run_until_complete(main())

    def call(self, fn: Callable[[], Any], timeout: float = 30) -> Any:
        async def wrapped() -> Any:
            result = fn()
            return await result if asyncio.iscoroutine(result) else result

        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stopping.set)
        for agent in self.agents:
            call = agent._call
            if call is not None:
                self.loop.call_soon_threadsafe(call.cancel)
        self.thread.join(timeout=20)


def wait_for(check: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    return wait_until(check, timeout, every, what)
