"""The lab's Git server serves real fetches, many at once, from a deep listen queue."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nfctl.lab.gitserver import BACKLOG


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_many_concurrent_fetches(tmp_path: Path) -> None:
    work = tmp_path / "work"
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    (work / "nf.yaml").write_text("kind: NetworkFunction\n")
    env = {
        "GIT_AUTHOR_NAME": "a",
        "GIT_AUTHOR_EMAIL": "a@x",
        "GIT_COMMITTER_NAME": "a",
        "GIT_COMMITTER_EMAIL": "a@x",
        "PATH": "/usr/bin:/bin",
    }
    subprocess.run(["git", "-C", str(work), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(work), "commit", "-qm", "one"], check=True, env=env)
    head = subprocess.run(
        ["git", "-C", str(work), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    base = tmp_path / "git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(base / "nfs.git")], check=True)
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
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the Git server never listened"
                time.sleep(0.05)
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
