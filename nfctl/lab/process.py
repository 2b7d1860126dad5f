"""nfctl's own long-running processes (controller, agent, Git server), on the host or in a
network namespace, each logging to one file: the one way the lab and the test harnesses
start, watch and stop them, and build their command lines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

REPO_ROOT = Path(__file__).resolve().parents[2]
NFCTL = [sys.executable, "-m", "nfctl"]
T = TypeVar("T")


class ProcessError(RuntimeError):
    pass


def wait_until(
    predicate: Callable[[], T], timeout: float = 30.0, every: float = 0.1, what: str = ""
) -> T:
    """Poll predicate until it returns something true and return that; AssertionError
    (with what it waited for and the last value) once timeout seconds have passed."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(
        f"timed out after {timeout:g}s waiting for {what or predicate}: last={last!r}"
    )


def nsenter(netns: str) -> list[str]:
    """Enter only the network namespace: unlike `ip netns exec`, this keeps /sys (and so
    the host's bpffs at /sys/fs/bpf) visible."""
    return ["nsenter", f"--net=/run/netns/{netns}"]


def tls_flags(pki: Path, name: str) -> list[str]:
    """--tls-* options for the certificate `name` of a `nfctl certs init` folder."""
    return [
        "--tls-ca",
        str(pki / "ca.crt"),
        "--tls-cert",
        str(pki / f"{name}.crt"),
        "--tls-key",
        str(pki / f"{name}.key"),
    ]


def controller_command(listen: str, db: str | Path, pki: Path, *extra: str) -> list[str]:
    """`nfctl controller` with mTLS from pki; extra adds or overrides options."""
    return [
        *NFCTL,
        "controller",
        "--listen",
        listen,
        "--db",
        str(db),
        *tls_flags(pki, "controller"),
        *extra,
    ]


def agent_command(
    repo_url: str, node: str, state_dir: Path, bpffs_dir: Path, *extra: str
) -> list[str]:
    """`nfctl agent` for the NFs under nfs/ of repo_url; extra adds or overrides options."""
    return [
        *NFCTL,
        "agent",
        "--repo",
        repo_url,
        "--path",
        "nfs",
        "--node",
        node,
        "--state-dir",
        str(state_dir),
        "--bpffs-dir",
        str(bpffs_dir),
        *extra,
    ]


class Process:
    """One process and its log file. netns: run it in that network namespace. detach: a
    session of its own, so it outlives the command that started it (the lab) and its
    whole group can be signalled. log_mode "w" starts the log afresh at every start."""

    def __init__(
        self,
        args: list[str],
        log_path: Path,
        netns: str | None = None,
        detach: bool = False,
        log_mode: str = "a",
    ) -> None:
        self.args = [*nsenter(netns), *args] if netns else list(args)
        self.log_path = log_path
        self.detach = detach
        self.log_mode = log_mode
        self.proc: subprocess.Popen[str] | None = None

    def start(self, ready: str | None = None, timeout: float = 30) -> Process:
        """Start it; with ready, return only once that text is in its log."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open(self.log_mode) as log:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                self.args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                cwd=REPO_ROOT,
                start_new_session=self.detach,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"},
            )
        if ready is not None:
            self.wait_for_output(ready, timeout)
        return self

    def wait_for_output(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return
            if self.proc is None or self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise ProcessError(f"{self.args[0]} did not say {text!r}:\n{self.output()[-4000:]}")

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, signum: int) -> None:
        assert self.proc is not None, "not started"
        self.proc.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 15) -> int:
        """Signal it and wait; killed after timeout. Its exit code (0 if never started)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=10)
        self.proc = None
        return code

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def wait(self, timeout: float = 60) -> int:
        """Wait for it to exit by itself; its exit code."""
        assert self.proc is not None, "not started"
        code = self.proc.wait(timeout=timeout)
        self.proc = None
        return code

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


__all__ = [
    "NFCTL",
    "REPO_ROOT",
    "Process",
    "ProcessError",
    "agent_command",
    "alive",
    "controller_command",
    "nsenter",
    "tls_flags",
    "wait_until",
]
