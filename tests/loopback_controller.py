"""A real `nfctl controller` subprocess on loopback with a fresh PKI (no namespaces, no
root): for tests of the TLS listeners that need no agents on lab nodes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nfctl.lab.process import REPO_ROOT, Process, controller_command

PY = sys.executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def nfctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "nfctl", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=timeout,
        env=dict(os.environ, NO_COLOR="1", COLUMNS="300"),
    )


def make_pki(
    folder: Path, nodes: list[str] | None = None, operators: list[str] | None = None
) -> Path:
    """`nfctl certs init` for a controller on loopback, and the named agents and operators."""
    args = ["certs", "init", "--dir", str(folder), "--controller-names", "localhost,127.0.0.1"]
    args += ["--nodes", ",".join(nodes)] if nodes else []
    args += ["--operators", ",".join(operators)] if operators else []
    out = nfctl(*args)
    assert out.returncode == 0, out.stdout + out.stderr
    return folder


@contextmanager
def running_controller(tmp: Path, pki: Path, listen: str, *extra: str) -> Iterator[Path]:
    """The controller until the block ends; yields its log file."""
    command = controller_command(
        listen, tmp / "controller.db", pki, "--webhook-addr", "", "--metrics-addr", "", *extra
    )
    process = Process(command, tmp / f"controller-{time.monotonic_ns()}.log", log_mode="w")
    process.start(ready="controller listening", timeout=60)
    try:
        yield process.log_path
    finally:
        process.stop(timeout=20)
