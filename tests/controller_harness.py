"""A controller, agents and operators on a lab topology, for controller tests."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

from nfctl.lab.process import (
    REPO_ROOT,
    Process,
    agent_command,
    controller_command,
    nsenter,
    tls_flags,
)
from nfctl.lab.topology import Topology
from tests.conftest import require_kernel

PY = sys.executable


def new_topology(count: int) -> Topology:
    return Topology.create(
        uuid.uuid4().hex[:6], count, subnet=100 + int(uuid.uuid4().hex[:2], 16) % 100
    )


@contextmanager
def kernel_topology(count: int) -> Iterator[Topology]:
    """A lab topology of count nodes for one test (the kernel is required), always removed."""
    require_kernel()
    topology = new_topology(count)
    try:
        yield topology
    finally:
        topology.destroy()


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
        return tls_flags(self.dir, name)


class ControllerProcess(Process):
    """`nfctl controller` in the hub namespace of a lab topology."""

    def __init__(self, topo: Topology, pki: Pki, db: Path, *extra: str) -> None:
        self.topo = topo
        self.address = f"{topo.hub_ip}:9443"
        command = controller_command(
            self.address,
            db,
            pki.dir,
            "--webhook-addr",
            f"{topo.hub_ip}:9080",
            "--metrics-addr",
            f"{topo.hub_ip}:9102",
            *extra,
        )
        log_path = db.parent / f"controller-{int(time.time() * 1000)}.log"
        super().__init__(command, log_path, netns=topo.hub, log_mode="w")

    def start(self, ready: str | None = "controller listening", timeout: float = 20) -> Self:
        super().start(ready, timeout)
        return self


def watch_events(
    topo: Topology, pki: Pki, address: str, stdout: Any, stderr: Any = None
) -> subprocess.Popen[str]:
    """An operator's `nfctl events --watch -o json` from the hub, running until stopped."""
    return subprocess.Popen(
        [*nsenter(topo.hub), PY, "-m", "nfctl", "events", "--watch", "-o", "json",
         "--controller", address, *pki.tls("operator")],
        stdout=stdout,
        stderr=stderr,
        text=True,
        cwd=REPO_ROOT,
    )  # fmt: skip


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


class NodeAgent(Process):
    """`nfctl agent` in a lab node's namespace, reporting to the controller over mTLS."""

    def __init__(
        self, topo: Topology, node: str, pki: Pki, repo_url: str, workdir: Path, *extra: str
    ) -> None:
        self.node = node
        self.state_dir = workdir / f"state-{node}"
        self.bpffs = Path("/sys/fs/bpf") / f"nfctl-test-{topo.tag}-{node}"
        command = agent_command(
            repo_url,
            node,
            self.state_dir,
            self.bpffs,
            "--metrics-addr",
            "",
            "--controller",
            f"{topo.hub_ip}:9443",
            *pki.tls(node),
            "--drift-interval",
            "1",
            *extra,
        )
        super().__init__(command, workdir / f"agent-{node}.log", netns=topo.node(node).netns)

    def start(self, ready: str | None = None, timeout: float = 30) -> Self:
        super().start(ready, timeout)
        return self

    def status(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.state_dir / "status.json").read_text()))
        except (OSError, ValueError):
            return {}

    def teardown(self) -> None:
        self.stop()
        from nfctl.datapath.datapath import Datapath

        Datapath(self.bpffs, self.state_dir).teardown()
