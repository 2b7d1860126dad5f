"""The lab's Git server serves real fetches, many at once, from a deep listen queue."""

from __future__ import annotations

import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nfctl.lab.gitserver import BACKLOG
from tests.agent_harness import GitRepo, wait_until


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def can_connect(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_many_concurrent_fetches(tmp_path: Path) -> None:
    work = GitRepo(tmp_path / "work")
    work.write("nf.yaml", "kind: NetworkFunction\n")
    head = work.commit("one")
    base = tmp_path / "git"
    work.git("clone", "-q", "--bare", str(work.path), str(base / "nfs.git"))
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nfctl.lab.gitserver",
            "--listen",
            "127.0.0.1",
            "--port",
            str(port),
            "--base-path",
            str(base),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: can_connect(port), 20, what="the Git server listening")
        listing = subprocess.run(
            ["ss", "-Hltn", f"sport = :{port}"], check=True, capture_output=True, text=True
        ).stdout.split()
        assert int(listing[2]) >= min(BACKLOG, 128)  # Send-Q of a listener: its backlog

        def ls_remote(_: int) -> str:
            return subprocess.run(
                ["git", "ls-remote", f"git://127.0.0.1:{port}/nfs.git", "main"],
                check=True,
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout.split()[0]

        with ThreadPoolExecutor(max_workers=60) as pool:
            answers = list(pool.map(ls_remote, range(60)))
        assert answers == [head] * 60
        missing = subprocess.run(
            ["git", "ls-remote", f"git://127.0.0.1:{port}/nope.git"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert missing.returncode != 0
        assert server.poll() is None  # still serving after all that
    finally:
        server.terminate()
        server.wait(timeout=10)
