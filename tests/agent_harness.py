"""Real Git repositories and real agent processes for agent tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from nfctl.testing.netns import VethPair

REPO_ROOT = Path(__file__).resolve().parents[1]
NFCTL = [sys.executable, "-m", "nfctl"]
T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], timeout: float = 30.0, every: float = 0.1, what: str = ""
) -> T:
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what or predicate}: last={last!r}"
    )


class GitRepo:
    """A working repository the tests commit to; agents fetch it over git:// or file://."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.git("init", "-q", "-b", "main")
        self.git("config", "user.name", "Alice Operator")
        self.git("config", "user.email", "alice@example.org")
        self.git("config", "commit.gpgsign", "false")

    def git(self, *args: str, env: dict[str, str] | None = None) -> str:
        proc = subprocess.run(
            ["git", *args],
            cwd=self.path,
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, **(env or {})},
        )
        if proc.returncode != 0:
            raise RuntimeError(f"git {' '.join(args)}: {proc.stderr}")
        return proc.stdout.strip()

    def add_library_nf(self, name: str, folder: str = "nfs") -> None:
        shutil.copytree(REPO_ROOT / "bpf" / name, self.path / folder / name, dirs_exist_ok=True)

    def write(self, relpath: str, text: str) -> None:
        target = self.path / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    def read(self, relpath: str) -> str:
        return (self.path / relpath).read_text()

    def remove(self, relpath: str) -> None:
        target = self.path / relpath
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()

    def commit(self, message: str, *extra: str) -> str:
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message, *extra)
        return self.head()

    def head(self) -> str:
        return self.git("rev-parse", "HEAD")


class GitDaemon:
    """`git daemon` serving a folder of repositories inside a network namespace."""

    def __init__(self, base: Path, netns: str, address: str, port: int = 9418) -> None:
        self.base = base
        self.netns = netns
        self.address = address
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.netns,
                "git",
                "daemon",
                "--reuseaddr",
                "--export-all",
                f"--base-path={self.base}",
                f"--listen={self.address}",
                f"--port={self.port}",
                str(self.base),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def url(self, repo: str) -> str:
        return f"git://{self.address}:{self.port}/{repo}"


class AgentProcess:
    """`nfctl agent` running in namespace a of a veth pair (nsenter: same bpffs, new net)."""

    def __init__(
        self, veth: VethPair, repo_url: str, state_dir: Path, bpffs_root: Path, *extra: str
    ) -> None:
        self.veth = veth
        self.state_dir = state_dir
        self.bpffs_root = bpffs_root
        self.args = [
            "nsenter",
            f"--net=/run/netns/{veth.ns_a}",
            *NFCTL,
            "agent",
            "--repo",
            repo_url,
            "--path",
            "nfs",
            "--node",
            "node-a",
            "--state-dir",
            str(state_dir),
            "--bpffs-dir",
            str(bpffs_root),
            "--interval",
            "0.5",
            "--drift-interval",
            "0.5",
            "--timeout",
            "10",
            "--metrics-addr",
            "127.0.0.1:9101",
            *extra,
        ]
        self.proc: subprocess.Popen[str] | None = None
        self.log_path = state_dir.parent / f"agent-{int(time.time() * 1000)}.log"

    def start(self) -> AgentProcess:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            self.args, stdout=self.log, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT
        )
        return self

    def send(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        code = self.proc.wait(timeout=timeout)
        self.proc = None
        self.log.close()
        return code

    def output(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def status(self) -> dict[str, Any]:
        try:
            return json.loads((self.state_dir / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def events(self) -> list[dict[str, Any]]:
        try:
            lines = (self.state_dir / "events.jsonl").read_text().splitlines()
        except OSError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def nf(self, name: str) -> dict[str, Any]:
        for nf in self.status().get("functions", []):
            if nf["name"] == name:
                return dict(nf)
        return {}

    def ready_at(self, revision: str) -> bool:
        status = self.status()
        ready = any(c["type"] == "Ready" and c["status"] for c in status.get("conditions", []))
        return ready and status.get("lastAppliedRevision") == revision

    def wait_ready(self, revision: str, timeout: float = 60) -> dict[str, Any]:
        wait_until(
            lambda: self.ready_at(revision),
            timeout,
            what=f"Ready at {revision[:12]}\n{self.output()[-3000:]}",
        )
        return self.status()

    def http_get(self, path: str) -> tuple[int, str]:
        code = (
            "import urllib.request, urllib.error, sys\n"
            "try:\n"
            f"    r = urllib.request.urlopen('http://127.0.0.1:9101{path}', timeout=5)\n"
            "    print(r.status); print(r.read().decode())\n"
            "except urllib.error.HTTPError as e:\n"
            "    print(e.code); print(e.read().decode())\n"
        )
        out = subprocess.run(
            ["nsenter", f"--net=/run/netns/{self.veth.ns_a}", sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        status, _, body = out.partition("\n")
        return int(status), body
