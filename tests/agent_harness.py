"""Real Git repositories and real agent processes for agent tests."""

from __future__ import annotations

import base64
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

from nfctl.lab.process import NFCTL, Process, agent_command

# re-exported: the agent tests and benchmarks take them from here
from nfctl.lab.process import REPO_ROOT as REPO_ROOT
from nfctl.lab.process import wait_until as wait_until
from nfctl.netns import VethPair, ping_summary


class GitRepo:
    """A working repository the tests commit to; agents fetch it over git:// or file://."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.git("init", "-q", "-b", "main")
        self.git("config", "user.name", "Alice Operator")
        self.git("config", "user.email", "alice@example.org")
        self.git("config", "commit.gpgsign", "false")

    def git(self, *args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> str:
        proc = subprocess.run(
            ["git", *args],
            cwd=self.path,
            input=stdin,
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

    def commit_gpg_signed(self, message: str, key: GpgKey) -> str:
        """`git commit -S` with an OpenPGP key (its own GNUPGHOME)."""
        self.git("add", "-A")
        self.git(
            "-c",
            f"user.signingkey={key.fingerprint}",
            "commit",
            "-q",
            "--allow-empty",
            "-S",
            "-m",
            message,
            env={"GNUPGHOME": str(key.home)},
        )
        return self.head()

    def commit_ssh_signed(self, message: str, private_key: Path) -> str:
        """`git commit -S` with an SSH key (gpg.format=ssh)."""
        self.git("add", "-A")
        self.git(
            "-c",
            "gpg.format=ssh",
            "-c",
            f"user.signingkey={private_key}",
            "commit",
            "-q",
            "--allow-empty",
            "-S",
            "-m",
            message,
        )
        return self.head()

    def head(self) -> str:
        return self.git("rev-parse", "HEAD")


class GitDaemon(Process):
    """`git daemon` serving a folder of repositories inside a network namespace."""

    def __init__(self, base: Path, netns: str, address: str, port: int = 9418) -> None:
        self.base = base
        self.address = address
        self.port = port
        command = [
            "git",
            "daemon",
            "--verbose",
            "--reuseaddr",
            "--export-all",
            f"--base-path={base}",
            f"--listen={address}",
            f"--port={port}",
            str(base),
        ]
        log_path = base.parent / f"git-daemon-{port}.log"
        super().__init__(command, log_path, netns=netns, log_mode="w")

    def start(self, ready: str | None = "Ready to rumble", timeout: float = 30) -> GitDaemon:
        super().start(ready, timeout)
        return self

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 10) -> int:
        return super().stop(signum, timeout)

    def url(self, repo: str) -> str:
        return f"git://{self.address}:{self.port}/{repo}"


class AgentProcess(Process):
    """`nfctl agent` running in namespace a of a veth pair (nsenter: same bpffs, new net);
    its log starts afresh at every start."""

    def __init__(
        self, veth: VethPair, repo_url: str, state_dir: Path, bpffs_root: Path, *extra: str
    ) -> None:
        self.veth = veth
        self.state_dir = state_dir
        self.bpffs_root = bpffs_root
        command = agent_command(
            repo_url,
            "node-a",
            state_dir,
            bpffs_root,
            "--interval",
            "0.5",
            "--drift-interval",
            "0.5",
            "--timeout",
            "10",
            "--metrics-addr",
            "127.0.0.1:9101",
            *extra,
        )
        log_path = state_dir.parent / f"agent-{int(time.time() * 1000)}.log"
        super().__init__(command, log_path, netns=veth.ns_a, log_mode="w")

    def start(self, ready: str | None = None, timeout: float = 30) -> AgentProcess:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        super().start(ready, timeout)
        return self

    def compile_workers(self) -> set[int]:
        """Pids of the agent's compile worker processes (the warm standby among them)."""
        assert self.proc is not None
        return {
            pid for pid in descendants(self.proc.pid) if b"nfctl.compiler.worker" in cmdline(pid)
        }

    def status(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.state_dir / "status.json").read_text())
        except (OSError, ValueError):
            return {}
        return data

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

    def wait_passes(self, count: int = 1, timeout: float = 30) -> dict[str, Any]:
        """Until count more full reconcile passes (fetch, build, converge) have finished, each
        started after the one before: the positive point after which "nothing changed" means
        the agent looked and decided so. Returns the status."""
        return self._wait_later("lastReconcile", count, timeout, "a reconcile pass")

    def wait_published(self, count: int = 1, timeout: float = 30) -> dict[str, Any]:
        """Until the agent has published its status count more times (a suspended node runs
        no full pass but still publishes each loop). Returns the status."""
        return self._wait_later("observedAt", count, timeout, "a status update")

    def _wait_later(self, field: str, count: int, timeout: float, what: str) -> dict[str, Any]:
        after = time.time()
        for _ in range(count):
            after = wait_until(
                functools.partial(self._later, field, after),
                timeout,
                every=0.02,
                what=f"{what}\n{self.output()[-2000:]}",
            )
        return self.status()

    def _later(self, field: str, since: float) -> float:
        """The time in status field (lastReconcile: when that pass started) if after since,
        else 0."""
        value = self.status().get(field) or 0
        when = float(value["startedAt"] if isinstance(value, dict) else value)
        return when if when > since else 0.0

    def http_get(self, path: str, port: int = 9101) -> tuple[int, str]:
        code = (
            "import urllib.request, urllib.error, sys\n"
            "try:\n"
            f"    r = urllib.request.urlopen('http://127.0.0.1:{port}{path}', timeout=5)\n"
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


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    direct = [int(p) for p in out.split()]
    return direct + [c for p in direct for c in descendants(p)]


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""  # gone meanwhile


class PingStream:
    """Echo requests from a namespace, batch after batch, until stopped: a user's check that
    traffic kept flowing (or kept being dropped) meanwhile. Each batch of ping runs to its
    end, so no request is still in flight when the counts are read."""

    def __init__(self, netns: str, target: str, source: str | None = None, batch: int = 50):
        self.args = ["ping", "-n", "-q", "-c", str(batch), "-i", "0.01", "-W", "2"]
        self.args += ["-I", source] if source else []
        self.args.append(target)
        self.netns = netns
        self.sent = 0
        self.received = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(
                ["nsenter", f"--net=/run/netns/{self.netns}", *self.args],
                capture_output=True,
                text=True,
                check=False,
                timeout=60,
            ).stdout
            try:
                sent, received = ping_summary(out)
            except ValueError as exc:
                self.error = str(exc)
                return
            self.sent += sent
            self.received += received

    def stop(self) -> tuple[int, int]:
        """(sent, received) once the running batch has finished."""
        self._stop.set()
        self._thread.join(timeout=90)
        assert self.error is None, self.error
        return self.sent, self.received


def nfctl(
    *args: str, netns: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `python -m nfctl ARGS` (in a network namespace if given); never raises."""
    prefix = ["nsenter", f"--net=/run/netns/{netns}"] if netns else []
    return subprocess.run(
        [*prefix, *NFCTL, *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        cwd=REPO_ROOT,
        env={**os.environ, "COLUMNS": "200"},
    )


# -- small probes shared by agent tests ------------------------------------------------------


def xdp_prog_id(veth: VethPair, ifname: str | None = None) -> int:
    """The id of the program on the XDP hook of an interface in namespace a (0: none)."""
    from nfctl.datapath.netlink import ipr
    from nfctl.datapath.xdp import query

    with ipr(veth.ns_a) as handle:
        index = handle.link_lookup(ifname=ifname or veth.a_if)[0]
        return int(query(handle, index).prog_id)


def tc_filter_present(
    veth: VethPair, ifname: str | None = None, direction: str = "ingress"
) -> bool:
    """Whether nfctl's tc dispatcher sits on an interface in namespace a: as a cls_bpf
    filter, or (kernels with TCX) as a TCX program."""
    from nfctl.datapath.hooklinks import tcx_programs
    from nfctl.manifest.model import Hook

    name = ifname or veth.a_if
    out = run_in(veth.ns_a, "tc", "filter", "show", "dev", name, direction)
    index = int(run_in(veth.ns_a, "cat", f"/sys/class/net/{name}/ifindex"))
    hook = Hook.TC_INGRESS if direction == "ingress" else Hook.TC_EGRESS
    tcx = [n for _, n in tcx_programs(veth.ns_a, index, hook)]
    return "nfctl_tc" in out or any(n.startswith("nfctl_tc") for n in tcx)


def delete_tc_filter(veth: VethPair, ifname: str | None = None) -> None:
    """What a careless operator does: remove nfctl's ingress filter (or TCX link) by hand."""
    from tests import foreign

    foreign.delete_tc_filter(veth.ns_a, ifname or veth.a_if)


def run_in(netns: str, *args: str) -> str:
    from nfctl.netns import run

    return run(*args, netns=netns)


def set_blocked_v4(repo: GitRepo, sources: list[str], folder: str = "nfs") -> None:
    """Rewrite the library blocklist's managed IPv4 entries."""
    path = f"{folder}/blocklist/nf.yaml"
    entries = "\n".join(f"        - {{key: {ip}, value: 1}}" for ip in sources)
    text = repo.read(path)
    start = text.index("    blocked_v4:")
    end = text.index("    blocked_v6:")
    block = f"    blocked_v4:\n      managed: true\n      entries:\n{entries}\n"
    repo.write(path, text[:start] + block + text[end:])


def events_of(agent: AgentProcess, reason: str, nf: str | None = None) -> list[dict[str, Any]]:
    return [
        e for e in agent.events() if e["reason"] == reason and (nf is None or e.get("nf") == nf)
    ]


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c["type"] == kind), {})


# -- commit signing keys ---------------------------------------------------------------------


@dataclass(frozen=True)
class GpgKey:
    """An OpenPGP key pair living in its own GNUPGHOME."""

    home: Path
    fingerprint: str
    uid: str

    @classmethod
    def generate(cls, home: Path, name: str, email: str) -> GpgKey:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        spec = (
            "%no-protection\n"
            "Key-Type: eddsa\nKey-Curve: ed25519\n"
            f"Name-Real: {name}\nName-Email: {email}\nExpire-Date: 0\n%commit\n"
        )
        env = {**os.environ, "GNUPGHOME": str(home)}
        subprocess.run(
            ["gpg", "--batch", "--quiet", "--gen-key"],
            input=spec,
            text=True,
            env=env,
            check=True,
            capture_output=True,
            timeout=60,
        )
        listing = subprocess.run(
            ["gpg", "--batch", "--with-colons", "--list-keys"],
            text=True,
            env=env,
            check=True,
            capture_output=True,
        ).stdout
        fpr = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
        return cls(home, fpr, f"{name} <{email}>")

    def export(self, target: Path) -> Path:
        """The armored public key, as an operator would drop it into --trusted-keys."""
        armored = subprocess.run(
            ["gpg", "--batch", "--armor", "--export", self.fingerprint],
            text=True,
            env={**os.environ, "GNUPGHOME": str(self.home)},
            check=True,
            capture_output=True,
        ).stdout
        assert "BEGIN PGP PUBLIC KEY BLOCK" in armored
        target.write_text(armored)
        return target

    def stop_agent(self) -> None:
        subprocess.run(
            ["gpgconf", "--kill", "all"],
            env={**os.environ, "GNUPGHOME": str(self.home)},
            check=False,
            capture_output=True,
        )


def ssh_signing_key(path: Path, comment: str) -> Path:
    """An ed25519 SSH key pair without passphrase; returns the private key's path."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return path


# -- smart HTTP Git with authentication ------------------------------------------------------


class GitHttpServer:
    """`git http-backend` behind a tiny HTTP server inside a network namespace. With
    credentials configured, a request without them gets 401 (Basic challenge): an agent
    that fetches successfully did send them."""

    def __init__(
        self,
        base: Path,
        netns: str,
        address: str,
        port: int = 8080,
        basic: tuple[str, str] | None = None,
        token: str | None = None,
    ) -> None:
        self.base = base
        self.netns = netns
        self.address = address
        self.port = port
        self.accepted: list[str] = []
        if basic is not None:
            raw = f"{basic[0]}:{basic[1]}".encode()
            self.accepted.append("Basic " + base64.b64encode(raw).decode())
        if token is not None:
            self.accepted.append(f"Bearer {token}")
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.netns,
                sys.executable,
                "-m",
                "tests.agent_harness",
                "serve-git-http",
                str(self.base),
                self.address,
                str(self.port),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=REPO_ROOT,
            env={**os.environ, "GIT_HTTP_ACCEPT": json.dumps(self.accepted)},
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def url(self, repo: str, userinfo: str = "") -> str:
        auth = f"{userinfo}@" if userinfo else ""
        return f"http://{auth}{self.address}:{self.port}/{repo}"


def _serve_git_http(base: str, address: str, port: int, accepted: list[str]) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._cgi()

        def do_POST(self) -> None:
            self._cgi()

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks: list[bytes] = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _cgi(self) -> None:
            body = self._body()
            if accepted and self.headers.get("Authorization") not in accepted:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="git"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            path, _, query = self.path.partition("?")
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "GIT_PROJECT_ROOT": base,
                "GIT_HTTP_EXPORT_ALL": "1",
                "REQUEST_METHOD": self.command,
                "PATH_INFO": path,
                "QUERY_STRING": query,
                "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                "CONTENT_LENGTH": str(len(body)),
                "REMOTE_ADDR": self.client_address[0],
                "REMOTE_USER": "agent",
                "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
                "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
            }
            proc = subprocess.run(
                ["git", "http-backend"], input=body, env=env, capture_output=True, check=False
            )
            head, _, payload = proc.stdout.partition(b"\r\n\r\n")
            status, headers = 200, []
            for line in head.decode("latin-1").split("\r\n"):
                name, _, value = line.partition(":")
                if name.lower() == "status":
                    status = int(value.split()[0])
                elif name:
                    headers.append((name, value.strip()))
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = HTTPServer((address, port), Handler)
    print("ready", flush=True)
    server.serve_forever()


# -- Prometheus text -------------------------------------------------------------------------


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample called name in a /metrics scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    return [
        (dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


if __name__ == "__main__" and sys.argv[1:2] == ["serve-git-http"]:
    _serve_git_http(
        sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(os.environ["GIT_HTTP_ACCEPT"])
    )
