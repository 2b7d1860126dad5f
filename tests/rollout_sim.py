"""Controller-side rollout tests: a real controller (in this process, gRPC on loopback, a
real store), a real Git repository it mirrors, and simulated agents speaking the real
agent protocol. A simulated agent applies what it is approved (as a real agent does after
its own reachability and signature checks) and reports verdict counters for one NF whose
drop share depends on the revision it runs: the test decides which commits are harmful."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.api.nfctl.v1 import nfctl_pb2_grpc as pbg
from nfctl.controller.config import ControllerConfig
from nfctl.controller.server import Controller

NF = "guard"
PACKETS_PER_REPORT = 1000


def git(repo: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30, check=True
    )
    return out.stdout.strip()


class Repo:
    """A real Git repository with a RolloutPolicy and an NF manifest."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True)
        git(path, "init", "-q", "-b", "main")
        git(path, "config", "user.email", "rollouts@example.org")
        git(path, "config", "user.name", "Rollout Test")
        git(path, "config", "commit.gpgsign", "false")

    def commit(self, message: str, files: dict[str, str | None]) -> str:
        for rel, text in files.items():
            target = self.path / rel
            if text is None:
                target.unlink()
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        git(self.path, "add", "-A")
        git(self.path, "commit", "-q", "--allow-empty", "-m", message)
        return git(self.path, "rev-parse", "HEAD")


def policy_yaml(
    gates: str = "",
    on_failure: str = "rollback",
    bake: str = "1s",
    deadline: str = "20s",
    interval: str = "0.3s",
    waves: str = "",
) -> str:
    waves = (
        waves
        or f"""
    - name: canary
      selector: {{role: canary}}
      bake: {bake}
    - name: half
      count: 50%
      bake: {bake}
    - name: all
      bake: {bake}
"""
    )
    return f"""apiVersion: nfctl.io/v1alpha1
kind: RolloutPolicy
metadata:
  name: fleet
spec:
  onFailure: {on_failure}
  progressDeadline: {deadline}
  interval: {interval}
  waves:{waves}
  gates:
{gates or DEFAULT_GATES}
"""


DEFAULT_GATES = f"""    - kind: verdict
      nf: {NF}
      maxIncrease: 0.05
"""


@dataclass
class SimAgent:
    name: str
    labels: dict[str, str]
    address: str
    drop_share: Callable[[str], float]
    refuse: set[str] = field(default_factory=set)  # revisions it cannot make Ready
    lose_once: set[str] = field(default_factory=set)  # approvals lost on the way, once
    packets: int = PACKETS_PER_REPORT  # packets through the NF between two reports
    applied: str = ""
    approved: str = ""
    # (time, revision, reason, command id | "registered") of every approval received
    history: list[tuple[float, str, str, str]] = field(default_factory=list)
    ever_ran: set[str] = field(default_factory=set)
    passed: int = 0
    dropped: int = 0
    _call: Any = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _channel: grpc.aio.Channel | None = None
    # grpc.aio allows one write in flight per stream: the reader (answers) and the
    # traffic loop (status) take turns
    _writing: asyncio.Lock = field(default_factory=asyncio.Lock)

    def status(self) -> pb.NodeStatus:
        ready = bool(self.applied) and self.applied not in self.refuse
        return pb.NodeStatus(
            node=self.name,
            labels=self.labels,
            last_applied_revision=self.applied,
            last_attempted_revision=self.approved,
            approved_revision=self.approved,
            conditions=[pb.Condition(type="Ready", status=ready)],
            functions=[
                pb.FunctionStatus(
                    name=NF,
                    state="Applied" if ready else "Pending",
                    revision=self.applied,
                    verdicts=pb.VerdictTotals(
                        enforce=pb.Verdicts(passed=self.passed, dropped=self.dropped)
                    ),
                )
            ],
            observed_at=time.time(),
        )

    async def start(self) -> SimAgent:
        self._channel = grpc.aio.insecure_channel(self.address)
        self._call = pbg.AgentServiceStub(self._channel).Connect()
        await self._call.write(
            pb.AgentMessage(
                register=pb.Register(
                    node=self.name, labels=self.labels, approved_revision=self.approved
                )
            )
        )
        self._tasks = [
            asyncio.create_task(self._read()),
            asyncio.create_task(self._traffic()),
        ]
        return self

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._call is not None:
            self._call.cancel()
        if self._channel is not None:
            await self._channel.close()

    def commands(self, revision: str) -> list[float]:
        """When approve commands for `revision` first arrived, one per command id (the
        fan-out delivers at least once: a command not yet answered when a controller
        stopped is sent again with its id, which an agent runs once)."""
        first: dict[str, float] = {}
        for t, rev, _, how in self.history:
            if rev == revision and how != "registered":
                first.setdefault(how, t)
        return sorted(first.values())

    def _apply(self, approval: pb.ApproveRevision, how: str) -> None:
        if not approval.revision:
            return
        self.history.append((time.time(), approval.revision, approval.reason, how))
        self.approved = approval.revision
        self.applied = approval.revision
        self.ever_ran.add(approval.revision)

    async def _read(self) -> None:
        while True:
            message = await self._call.read()
            if message is grpc.aio.EOF:
                return
            kind = message.WhichOneof("body")
            if kind == "registered" and message.registered.HasField("approval"):
                self._apply(message.registered.approval, "registered")
            elif kind == "command" and message.command.WhichOneof("action") == "approve":
                if message.command.approve.revision in self.lose_once:
                    self.lose_once.discard(message.command.approve.revision)
                    continue
                self._apply(message.command.approve, message.command.id)
                await self._write(
                    pb.AgentMessage(result=pb.CommandResult(command_id=message.command.id, ok=True))
                )
                await self._report()

    async def _write(self, message: pb.AgentMessage) -> None:
        async with self._writing:
            await self._call.write(message)

    async def _report(self) -> None:
        await self._write(pb.AgentMessage(status=pb.StatusReport(status=self.status())))

    async def _traffic(self, every: float = 0.1) -> None:
        while True:
            share = self.drop_share(self.applied) if self.applied else 0.0
            drops = round(self.packets * share)
            self.dropped += drops
            self.passed += self.packets - drops
            await self._report()
            await asyncio.sleep(every)


class Lab:
    """A controller following `repo` and simulated agents; all in this event loop."""

    def __init__(self, tmp: Path, repo: Repo, db: str | None = None, **config: Any) -> None:
        self.tmp = tmp
        self.repo = repo
        self.db = db or str(tmp / "controller.db")
        self.config = config
        self.controller: Controller | None = None
        self.agents: dict[str, SimAgent] = {}
        self.bad: set[str] = set()

    def drop_share(self, revision: str) -> float:
        return 0.3 if revision in self.bad else 0.01

    async def start_controller(self, port: int = 0) -> Controller:
        settings: dict[str, Any] = {
            "webhook_addr": None,
            "metrics_addr": None,
            "health_addr": None,
            "source_url": str(self.repo.path),
            "source_ref": "main",
            "source_interval": 0.2,
            "rollout_tick": 0.1,
            "repo_dir": self.tmp / "mirror",
            **self.config,
        }
        cfg = ControllerConfig(listen=f"127.0.0.1:{port}", insecure=True, db=self.db, **settings)
        self.controller = Controller(cfg)
        await self.controller.start()
        return self.controller

    async def stop_controller(self) -> None:
        if self.controller is not None:
            await self.controller.stop()
            self.controller = None

    @property
    def address(self) -> str:
        assert self.controller is not None
        return f"127.0.0.1:{self.controller.ports['grpc']}"

    async def add_agent(self, name: str, **labels: str) -> SimAgent:
        agent = SimAgent(name, labels, self.address, self.drop_share)
        self.agents[name] = agent
        return await agent.start()

    async def reconnect_agents(self) -> None:
        for agent in self.agents.values():
            await agent.stop()
            agent._tasks = []
            agent.address = self.address
            await agent.start()

    async def close(self) -> None:
        for agent in self.agents.values():
            await agent.stop()
        await self.stop_controller()

    async def rollout(self, revision: str) -> pb.Rollout | None:
        assert self.controller is not None and self.controller.rollouts is not None
        for r in await self.controller.rollouts.list(50):
            if r.revision == revision:
                return r
        return None

    async def wait_rollout(
        self, revision: str, states: tuple[str, ...], timeout: float = 60.0
    ) -> pb.Rollout:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = await self.rollout(revision)
            if last is not None and last.state in states:
                return last
            await asyncio.sleep(0.1)
        raise AssertionError(f"rollout of {revision[:12]} not in {states}: {last}")

    async def wait(
        self, predicate: Callable[[], bool], timeout: float = 30.0, what: str = ""
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")


@contextlib.asynccontextmanager
async def lab(tmp: Path, repo: Repo, db: str | None = None, **config: Any) -> AsyncIterator[Lab]:
    the_lab = Lab(tmp, repo, db, **config)
    try:
        yield the_lab
    finally:
        await the_lab.close()


async def fleet(the_lab: Lab, workers: int = 3) -> None:
    """One canary and `workers` other nodes."""
    await the_lab.add_agent("node-a", role="canary")
    for i in range(workers):
        await the_lab.add_agent(f"node-{chr(ord('b') + i)}", role="worker")
