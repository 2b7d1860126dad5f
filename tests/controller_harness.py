"""A controller, agents and operators on a lab topology, for controller tests."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from nfctl.lab.topology import Topology, nsenter
from tests.agent_harness import REPO_ROOT

PY = sys.executable


def new_topology(count: int) -> Topology:
    return Topology.create(
        uuid.uuid4().hex[:6], count, subnet=100 + int(uuid.uuid4().hex[:2], 16) % 100
    )


class Pki:
    def __init__(self, folder: Path, topo: Topology, nodes: list[str]) -> None:
        self.dir = folder
        subprocess.run(
            [
                PY,
                "-m",
                "nfctl",
                "certs",
                "init",
                "--dir",
                str(folder),
                "--controller-names",
                f"{topo.hub_ip},localhost",
                "--nodes",
                ",".join(nodes),
                "--operators",
                "operator",
            ],
            check=True,
            capture_output=True,
            cwd=REPO_ROOT,
        )

    def tls(self, name: str) -> list[str]:
        return [
            "--tls-ca",
            str(self.dir / "ca.crt"),
            "--tls-cert",
            str(self.dir / f"{name}.crt"),
            "--tls-key",
            str(self.dir / f"{name}.key"),
        ]


class ControllerProcess:
    def __init__(self, topo: Topology, pki: Pki, db: Path, *extra: str) -> None:
        self.topo = topo
        self.address = f"{topo.hub_ip}:9443"
        self.args = [
            *nsenter(topo.hub),
            PY,
            "-m",
            "nfctl",
            "controller",
            "--listen",
            self.address,
            "--db",
            str(db),
            "--tls-ca",
            str(pki.dir / "ca.crt"),
            "--tls-cert",
            str(pki.dir / "controller.crt"),
            "--tls-key",
            str(pki.dir / "controller.key"),
            "--webhook-addr",
            f"{topo.hub_ip}:9080",
            "--metrics-addr",
            f"{topo.hub_ip}:9102",
            *extra,
        ]
        self.log_path = db.parent / f"controller-{int(time.time() * 1000)}.log"
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> ControllerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            self.args, stdout=self.log, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if "controller listening" in self.log_path.read_text():
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"controller did not start:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)
        self.proc = None

    def output(self) -> str:
        return self.log_path.read_text()


def operator(
    topo: Topology, pki: Pki, *args: str, check: bool = True, auth: list[str] | None = None
) -> Any:
    """Run the nfctl CLI as an operator from inside the hub namespace; JSON if -o json."""
    cmd = [
        *nsenter(topo.hub),
        PY,
        "-m",
        "nfctl",
        *args,
        # the hub's controller unless the caller names one (a later option would win)
        *([] if "--controller" in args else ["--controller", f"{topo.hub_ip}:9443"]),
        *(auth if auth is not None else pki.tls("operator")),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed: {proc.stdout}{proc.stderr}")
    if "-o" in args and proc.returncode == 0:
        return json.loads(proc.stdout)
    return proc


def hub_python(topo: Topology, code: str, timeout: float = 60) -> str:
    proc = subprocess.run(
        [*nsenter(topo.hub), PY, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc.stdout


class NodeAgent:
    """`nfctl agent` in a lab node's namespace, reporting to the controller over mTLS."""

    def __init__(
        self, topo: Topology, node: str, pki: Pki, repo_url: str, workdir: Path, *extra: str
    ) -> None:
        netns = topo.node(node).netns
        self.node = node
        self.state_dir = workdir / f"state-{node}"
        self.bpffs = Path("/sys/fs/bpf") / f"nfctl-test-{topo.tag}-{node}"
        self.args = [
            *nsenter(netns),
            PY,
            "-m",
            "nfctl",
            "agent",
            "--repo",
            repo_url,
            "--path",
            "nfs",
            "--node",
            node,
            "--state-dir",
            str(self.state_dir),
            "--bpffs-dir",
            str(self.bpffs),
            "--metrics-addr",
            "",
            "--controller",
            f"{topo.hub_ip}:9443",
            *pki.tls(node),
            "--drift-interval",
            "1",
            *extra,
        ]
        self.log_path = workdir / f"agent-{node}.log"
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> NodeAgent:
        self.log = self.log_path.open("a")
        self.proc = subprocess.Popen(
            self.args, stdout=self.log, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT
        )
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)
        self.proc = None

    def status(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.state_dir / "status.json").read_text()))
        except (OSError, ValueError):
            return {}

    def teardown(self) -> None:
        self.stop()
        from nfctl.datapath.datapath import Datapath

        Datapath(self.bpffs, self.state_dir).teardown()
