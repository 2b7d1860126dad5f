"""The lab's Git server: `git daemon --inetd` per connection behind a deep listen queue.

`git daemon` listens with a backlog of 5. When a webhook wakes 100 lab agents at once,
their connections overflow that queue, the kernel drops the SYNs, and each dropped
client waits for TCP's 1 s (then 3 s) SYN retransmission: a fetch that takes 0.1 s on
its own took 1-4 s. A production Git server (GitHub, GitLab, a git daemon behind
systemd socket activation) has a deep queue, and so does this one.

    python -m nfctl.lab.gitserver --listen 10.96.0.254 --base-path /srv/git
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
from pathlib import Path

GIT_PORT = 9418
BACKLOG = 4096  # the kernel caps it at net.core.somaxconn

log = logging.getLogger("nfctl.lab.gitserver")


def daemon_argv(git: str, base_path: Path) -> list[str]:
    return [
        git,
        "daemon",
        "--inetd",
        "--export-all",
        "--init-timeout=10",
        "--timeout=120",
        f"--base-path={base_path}",
        str(base_path),
    ]


def serve(listen: str, port: int, base_path: Path) -> None:
    git = shutil.which("git")
    if git is None:
        raise SystemExit("git is not installed")
    argv = daemon_argv(git, base_path)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps finished daemons
    with socket.create_server((listen, port), backlog=BACKLOG) as server:
        log.info("serving %s on %s:%d", base_path, listen, port)
        while True:
            conn, _peer = server.accept()
            with conn:
                try:
                    os.posix_spawn(
                        git,
                        argv,
                        dict(os.environ),
                        file_actions=[
                            (os.POSIX_SPAWN_DUP2, conn.fileno(), 0),
                            (os.POSIX_SPAWN_DUP2, conn.fileno(), 1),
                        ],
                        setsigdef=[signal.SIGCHLD],  # git waits for its upload-pack
                    )
                except OSError as exc:  # e.g. out of processes: this client fails, not all
                    log.warning("cannot start git daemon for a connection: %s", exc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="address to listen on")
    parser.add_argument("--port", type=int, default=GIT_PORT)
    parser.add_argument("--base-path", type=Path, required=True, help="folder of bare repos")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    serve(args.listen, args.port, args.base_path.resolve())


if __name__ == "__main__":
    main()
