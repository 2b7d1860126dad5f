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

REPO_ROOT = Path(__file__).resolve().parents[1]
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


def make_pki(folder: Path) -> Path:
    out = nfctl("certs", "init", "--dir", str(folder), "--controller-names", "localhost,127.0.0.1")
    assert out.returncode == 0, out.stdout + out.stderr
    return folder


@contextmanager
def running_controller(tmp: Path, pki: Path, listen: str, *extra: str) -> Iterator[Path]:
    """The controller until the block ends; yields its log file."""
    log_path = tmp / f"controller-{time.monotonic_ns()}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [
                PY, "-m", "nfctl", "controller",
                "--listen", listen,
                "--db", str(tmp / "controller.db"),
                "--tls-ca", str(pki / "ca.crt"),
                "--tls-cert", str(pki / "controller.crt"),
                "--tls-key", str(pki / "controller.key"),
                "--webhook-addr", "",
                "--metrics-addr", "",
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            output = ""
            while time.monotonic() < deadline and proc.poll() is None:
                output = log_path.read_text()
                if "controller listening" in output:
                    break
                time.sleep(0.1)
            assert "controller listening" in output, output
            yield log_path
        finally:
            proc.terminate()
            proc.wait(timeout=20)
