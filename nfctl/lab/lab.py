"""`nfctl lab`: N nodes (network namespaces) on a bridge, a Git server, the controller
with mTLS, one agent per node, and a host link to reach them. Everything it starts is
recorded under its workspace so `lab down` can remove it, also after a crash."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.api.nfctl.v1 import nfctl_pb2_grpc as pbg
from nfctl.lab import prometheus
from nfctl.lab.gitserver import GIT_PORT
from nfctl.lab.process import (
    REPO_ROOT,
    Process,
    ProcessError,
    agent_command,
    alive,
    controller_command,
    nsenter,
    tls_flags,
)
from nfctl.lab.topology import Topology, leftover_namespaces
from nfctl.wire.channel import channel_credentials

WORKSPACES = Path("/var/lib/nfctl-lab")
LAB_NFS = ("blocklist", "ratelimit", "counter", "dscp")


class LabError(RuntimeError):
    pass


@dataclass
class LabPaths:
    """Where one lab keeps its files: PKI, the bare and working Git repositories, logs,
    pid files, the webhook secret and each node's agent state."""

    root: Path

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def bare(self) -> Path:
        return self.root / "git" / "nfs.git"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def secret(self) -> Path:
        return self.root / "webhook.secret"

    def state(self, node: str) -> Path:
        return self.root / "state" / node


def _git(cwd: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise LabError(f"git {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def seed_library(work: Path) -> None:
    """The NF library, with a rate limit high enough for the demo's traffic."""
    for name in LAB_NFS:
        shutil.copytree(REPO_ROOT / "bpf" / name, work / "nfs" / name)
    ratelimit = work / "nfs" / "ratelimit" / "nf.yaml"
    text = ratelimit.read_text()
    ratelimit.write_text(
        text.replace("rate_pps: 1000, burst: 2000", "rate_pps: 20000, burst: 40000")
    )


class Lab:
    """One `nfctl lab`, named by its tag: brings the topology and processes up and down, and
    acts as the operator (commits, controller queries, traffic) for the demo and tests."""

    def __init__(self, tag: str = "lab", say: Callable[[str], None] = print) -> None:
        self.tag = tag
        self.paths = LabPaths(WORKSPACES / tag)
        self.say = say
        self.topo: Topology | None = Topology.load(tag)

    # -- lifecycle -----------------------------------------------------------------------
    def bpffs(self, node: str) -> Path:
        return Path("/sys/fs/bpf") / f"nfctl-lab-{self.tag}-{node}"

    def is_up(self) -> bool:
        return self.topo is not None and all(
            self._alive(name) for name in ("git", "controller", *(n.name for n in self.topo.nodes))
        )

    def up(
        self,
        nodes: int = 3,
        subnet: int = 99,
        timeout: float = 180,
        seed: Callable[[Path], None] | None = None,
        agent_args: list[str] | None = None,
    ) -> Topology:
        """seed fills the NF repository's work tree (default: the NF library); agent_args
        are added to every agent's command line."""
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces, BPF)")
        if self.is_up():
            assert self.topo is not None
            self.say(f"lab {self.tag!r} is already up ({len(self.topo.nodes)} nodes)")
            return self.topo
        self.down(quiet=True)
        self.paths.root.mkdir(parents=True, exist_ok=True)
        for folder in (self.paths.logs, self.paths.run):
            folder.mkdir(parents=True, exist_ok=True)
        self.say(f"creating {nodes} nodes on a bridge (10.{subnet}.0.0/24) ...")
        self.topo = Topology.create(self.tag, nodes, subnet=subnet, host_link=True)
        self.say("issuing certificates (CA, controller, nodes, operator) ...")
        self._pki()
        self.say("seeding the NF repository ...")
        self._git_repo(seed)
        self._start_git()
        self._wait_port(self.topo.hub_ip, GIT_PORT)
        self.say(f"git server listening on {self.topo.hub_ip}:{GIT_PORT}")
        self._start_controller()
        self.say(f"controller listening on {self.topo.hub_ip}:9443 (mTLS)")
        for node in self.topo.nodes:
            self._start_agent(node.name, agent_args or [])
            self.say(f"agent started on {node.name}")
        self._start_prometheus()
        head = _git(self.paths.work, "rev-parse", "HEAD")
        self.say("waiting for every node to compile, attach and report ...")
        self._wait_revision(head, "applied", timeout, announce=True)
        return self.topo

    def _pki(self) -> None:
        from nfctl.controller.certs import init

        assert self.topo is not None
        names = [self.topo.hub_ip, "localhost"]
        init(self.paths.pki, names, [n.name for n in self.topo.nodes], ["operator"])
        self.paths.secret.write_text(os.urandom(16).hex())
        os.chmod(self.paths.secret, 0o600)

    def _git_repo(self, seed: Callable[[Path], None] | None = None) -> None:
        assert self.topo is not None
        bare = self.paths.bare
        bare.parent.mkdir(parents=True, exist_ok=True)
        _git(bare.parent, "init", "-q", "--bare", "-b", "main", str(bare))
        (bare / "git-daemon-export-ok").touch()
        hook = bare / "hooks" / "post-receive"
        hook.write_text(
            "#!/bin/sh\n"
            f"exec env PYTHONPATH={REPO_ROOT} {sys.executable} -m nfctl.lab.post_receive "
            f"http://{self.topo.hub_ip}:9080/hooks/github {self.paths.secret} nfs\n"
        )
        hook.chmod(0o755)
        work = self.paths.work
        _git(self.paths.root, "clone", "-q", str(bare), str(work))
        _git(work, "config", "user.name", "Lab Operator")
        _git(work, "config", "user.email", "operator@nfctl.lab")
        (seed or seed_library)(work)
        (work / "README.md").write_text(
            "# Lab NF repository\n\nEvery nf.yaml under nfs/ is a NetworkFunction; "
            "push to main and every node applies it.\n"
        )
        self.commit("Seed the lab with the nfctl NF library")

    def _spawn(self, name: str, args: list[str], netns: str, ready: str | None = None) -> None:
        process = Process(args, self.paths.logs / f"{name}.log", netns=netns, detach=True)
        process.start()
        (self.paths.run / f"{name}.pid").write_text(str(process.pid))
        if ready is not None:
            try:
                process.wait_for_output(ready, timeout=20)
            except ProcessError as exc:
                raise LabError(f"{name}: {exc}") from exc

    def _alive(self, name: str) -> bool:
        try:
            return alive(int((self.paths.run / f"{name}.pid").read_text()))
        except (OSError, ValueError):
            return False

    def _start_git(self) -> None:
        assert self.topo is not None
        self._spawn(
            "git",
            [
                sys.executable,
                "-m",
                "nfctl.lab.gitserver",
                f"--listen={self.topo.hub_ip}",
                f"--base-path={self.paths.bare.parent}",
            ],
            self.topo.hub,
        )

    def _start_controller(self) -> None:
        assert self.topo is not None
        hub = self.topo.hub_ip
        command = controller_command(
            f"{hub}:9443",
            self.paths.root / "controller.db",
            self.paths.pki,
            "--webhook-addr",
            f"{hub}:9080",
            "--webhook-secret-file",
            str(self.paths.secret),
            "--metrics-addr",
            f"{hub}:9102",
            "--stale-after",
            "30",
            # rollouts: the controller reads the RolloutPolicy from the same repository
            "--source",
            f"git://{hub}/nfs.git",
            "--path",
            "nfs",
            "--source-interval",
            "5",
            "--rollout-tick",
            "0.5",
            "--prometheus-url",
            self.prometheus_url,
        )
        self._spawn("controller", command, self.topo.hub, ready="controller listening")

    def _start_agent(self, node: str, extra: list[str]) -> None:
        assert self.topo is not None
        command = agent_command(
            f"git://{self.topo.hub_ip}/nfs.git",
            node,
            self.paths.state(node),
            self.bpffs(node),
            "--ref",
            "main",
            "--labels",
            f"lab={self.tag},role={self.role(node)}",
            "--interval",
            "60",
            "--drift-interval",
            "1",  # also how often status (verdict counters for rollout gates) refreshes
            "--metrics-addr",
            f"{self.topo.node(node).ip}:9101",  # scraped by the lab's Prometheus
            "--controller",
            f"{self.topo.hub_ip}:9443",
            *tls_flags(self.paths.pki, node),
            *extra,
        )
        self._spawn(node, command, self.topo.node(node).netns)

    # -- Prometheus (nfctl.lab.prometheus) ------------------------------------------------
    @property
    def prometheus_url(self) -> str:
        assert self.topo is not None
        return f"http://{self.topo.hub_ip}:{prometheus.PORT}"

    def _start_prometheus(self) -> None:
        assert self.topo is not None
        try:
            binary = prometheus.binary()
        except prometheus.PrometheusError as exc:
            self.say(f"no Prometheus in this lab: {exc}")
            return
        folder = self.paths.root / "prometheus"
        prometheus.write_config(
            folder,
            {n.name: f"{n.ip}:9101" for n in self.topo.nodes},
            f"{self.topo.hub_ip}:9102",
        )
        listen = f"{self.topo.hub_ip}:{prometheus.PORT}"
        self._spawn("prometheus", prometheus.command(folder, listen), self.topo.hub)
        prometheus.PrometheusClient(self.prometheus_url).wait_ready()
        self.say(f"prometheus ({binary}) on {listen} scrapes every agent and the controller")

    def role(self, node: str) -> str:
        """The first node is the canary of the lab's rollout policy."""
        assert self.topo is not None
        return "canary" if node == self.topo.nodes[0].name else "edge"

    def _wait_port(self, host: str, port: int, timeout: float = 20) -> None:
        import socket

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
                return
            time.sleep(0.1)
        raise LabError(f"nothing listens on {host}:{port}; see {self.paths.logs}")

    def down(self, quiet: bool = False) -> list[str]:
        """Remove everything the lab created (processes, pins, namespaces, workspace)."""
        removed: list[str] = []
        if self.paths.run.is_dir():
            for pidfile in self.paths.run.glob("*.pid"):
                with contextlib.suppress(OSError, ValueError):
                    os.killpg(int(pidfile.read_text()), signal.SIGTERM)
                    removed.append(f"process {pidfile.stem}")
        # processes of a crashed run whose pidfiles are gone
        subprocess.run(["pkill", "-f", f"nfctl-lab/{self.tag}/"], check=False, capture_output=True)
        time.sleep(0.5)
        subprocess.run(
            ["pkill", "-9", "-f", f"nfctl-lab/{self.tag}/"], check=False, capture_output=True
        )
        for pins in Path("/sys/fs/bpf").glob(f"nfctl-lab-{self.tag}-*"):
            from nfctl.datapath.pins import remove_tree

            remove_tree(pins)
            removed.append(f"pins {pins}")
        topo = self.topo or Topology(
            self.tag, 0, f"nfl-{self.tag}-hub", "", host_link=f"nfl-{self.tag}"[:15]
        )
        topo.host_link = topo.host_link or f"nfl-{self.tag}"[:15]
        namespaces = leftover_namespaces(self.tag)
        topo.destroy()
        removed.extend(f"netns {n}" for n in namespaces)
        if self.paths.root.exists():
            shutil.rmtree(self.paths.root, ignore_errors=True)
            removed.append(f"workspace {self.paths.root}")
        self.topo = None
        if not quiet:
            for item in removed:
                self.say(f"removed {item}")
        return removed

    # -- Git ---------------------------------------------------------------------------------
    def commit(self, message: str) -> str:
        work = self.paths.work
        _git(work, "add", "-A")
        _git(work, "commit", "-q", "-m", message)
        _git(work, "push", "-q", "origin", "HEAD:main")
        return _git(work, "rev-parse", "HEAD")

    def revert_last(self) -> str:
        _git(self.paths.work, "revert", "--no-edit", "HEAD")
        _git(self.paths.work, "push", "-q", "origin", "HEAD:main")
        return _git(self.paths.work, "rev-parse", "HEAD")

    def edit(self, relpath: str, change: Callable[[str], str]) -> None:
        path = self.paths.work / relpath
        new = change(path.read_text())
        if new == path.read_text():
            raise LabError(f"edit of {relpath} changed nothing")
        path.write_text(new)

    # -- the controller, as an operator -------------------------------------------------------
    @contextlib.contextmanager
    def fleet(self) -> Iterator[pbg.FleetServiceStub]:
        assert self.topo is not None
        pki = self.paths.pki
        creds = channel_credentials(pki / "ca.crt", pki / "operator.crt", pki / "operator.key")
        with grpc.secure_channel(f"{self.topo.hub_ip}:9443", creds) as channel:
            yield pbg.FleetServiceStub(channel)

    def nodes(self) -> list[pb.Node]:
        with self.fleet() as stub:
            return list(stub.ListNodes(pb.ListNodesRequest(), timeout=10).nodes)

    def functions(self) -> list[pb.FunctionSummary]:
        with self.fleet() as stub:
            return list(stub.ListFunctions(pb.ListFunctionsRequest(), timeout=10).functions)

    def history(self, limit: int = 20) -> list[pb.Event]:
        with self.fleet() as stub:
            return list(stub.GetHistory(pb.GetHistoryRequest(limit=limit), timeout=10).events)

    def wait_applied(self, revision: str, timeout: float = 120) -> float:
        """Until every node reports revision as applied; returns the seconds it took."""
        return self._wait_revision(revision, "applied", timeout)

    def wait_attempted(self, revision: str, timeout: float = 120) -> float:
        """Until every node has tried revision (applied or refused)."""
        return self._wait_revision(revision, "attempted", timeout)

    def _wait_revision(
        self, revision: str, which: str, timeout: float, announce: bool = False
    ) -> float:
        """announce: say each node's arrival as it happens (lab up)."""
        assert self.topo is not None
        start = time.monotonic()
        expected = {n.name for n in self.topo.nodes}
        last: dict[str, str] = {}
        arrived: set[str] = set()
        while time.monotonic() - start < timeout:
            with contextlib.suppress(grpc.RpcError):
                last = {
                    n.status.node: getattr(n.status, f"last_{which}_revision") for n in self.nodes()
                }
                done = {name for name, rev in last.items() if rev == revision}
                for name in sorted(done - arrived) if announce else ():
                    self.say(
                        f"{name} {which} {revision[:12]} "
                        f"({len(arrived) + 1}/{len(expected)}, {time.monotonic() - start:.1f}s)"
                    )
                    arrived.add(name)
                if expected <= done:
                    return time.monotonic() - start
            time.sleep(0.1)
        raise LabError(
            f"not every node {which} {revision[:12]} within {timeout:.0f}s: "
            + ", ".join(f"{k}={v[:12] or '-'}" for k, v in sorted(last.items()))
            + f" (logs in {self.paths.logs})"
        )

    def program_ids(self, nf: str) -> dict[str, int]:
        out = {}
        for node in self.nodes():
            for fn in node.status.functions:
                if fn.name == nf:
                    out[node.status.node] = fn.program_id
        return out

    # -- traffic -------------------------------------------------------------------------
    def ping(
        self, src: str, dst: str, count: int = 3, interval: float = 0.05, timeout: float = 0.5
    ) -> int:
        assert self.topo is not None
        ip = self.topo.node(dst).ip
        proc = subprocess.run(
            [
                *nsenter(self.topo.node(src).netns),
                "ping",
                "-n",
                "-q",
                "-c",
                str(count),
                "-i",
                str(interval),
                "-W",
                str(timeout),
                ip,
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        import re

        match = re.search(r"(\d+) received", proc.stdout)
        return int(match.group(1)) if match else 0

    def flood(self, src: str, dst: str, count: int, interval: float) -> subprocess.Popen[str]:
        assert self.topo is not None
        return subprocess.Popen(
            [
                *nsenter(self.topo.node(src).netns),
                "ping",
                "-n",
                "-q",
                "-c",
                str(count),
                "-i",
                str(interval),
                "-W",
                "2",
                self.topo.node(dst).ip,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def describe(self) -> dict[str, Any]:
        assert self.topo is not None
        pki = self.paths.pki
        return {
            "controller": f"{self.topo.hub_ip}:9443",
            "operator_flags": (
                f"--controller {self.topo.hub_ip}:9443 --tls-ca {pki / 'ca.crt'} "
                f"--tls-cert {pki / 'operator.crt'} --tls-key {pki / 'operator.key'}"
            ),
            "repo": str(self.paths.work),
            "nodes": {n.name: {"netns": n.netns, "ip": n.ip} for n in self.topo.nodes},
            "logs": str(self.paths.logs),
            "prometheus": self.prometheus_url,
        }

    def save_info(self) -> None:
        (self.paths.root / "lab.json").write_text(json.dumps(self.describe(), indent=1))
