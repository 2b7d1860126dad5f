"""The agent side of rollouts end to end: a real agent, a real Git repository served by git
daemon, real programs in the kernel, and a controller speaking the real gRPC contract on the
veth. The controller here is scripted (this file, run as a module: approvals are written to
a file, everything the agent sends is recorded) so each step of the agreed semantics is
driven exactly; the rollout engine that decides approvals is tested on its own side.

Run as `python -m tests.test_rollout_agent FOLDER ADDRESS`, it is that controller."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest

from nfctl.agent.runner import APPROVAL_WAIT_SECONDS
from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.api.nfctl.v1 import nfctl_pb2_grpc as pbg
from nfctl.cli.exitcodes import UNAPPROVED
from nfctl.netns import VethPair
from tests.agent_harness import (
    REPO_ROOT,
    AgentProcess,
    GitDaemon,
    GitRepo,
    nfctl,
    wait_until,
    xdp_prog_id,
)

POLICY = """\
apiVersion: nfctl.io/v1alpha1
kind: RolloutPolicy
metadata:
  name: fleet
spec:
  waves:
    - name: canary
      count: 1
    - name: rest
      percent: 100
"""
PORT = 9555


# -- the scripted controller (runs in namespace b) ---------------------------------------------
class ScriptedController(pbg.AgentServiceServicer):
    """Registered carries the approval in registered.json (if any); each line appended to
    commands.jsonl is sent as an ApproveRevision command; what the agent sends is appended
    to received.jsonl."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.lock = threading.Lock()

    def _record(self, kind: str, message: Any) -> None:
        from google.protobuf.json_format import MessageToDict

        line = json.dumps({"kind": kind, "body": MessageToDict(message)})
        with self.lock, (self.folder / "received.jsonl").open("a") as out:
            out.write(line + "\n")

    def Connect(
        self, request_iterator: Iterator[pb.AgentMessage], context: Any
    ) -> Iterator[pb.ControllerMessage]:
        done = threading.Event()

        def read() -> None:
            try:
                for message in request_iterator:
                    kind = message.WhichOneof("body") or ""
                    self._record(kind, getattr(message, kind, None))
            except Exception:
                pass
            done.set()

        threading.Thread(target=read, daemon=True).start()
        registered = pb.Registered(session_id=uuid.uuid4().hex, heartbeat_seconds=1.0)
        approval = self.folder / "registered.json"
        if approval.exists():
            registered.approval.CopyFrom(pb.ApproveRevision(**json.loads(approval.read_text())))
        yield pb.ControllerMessage(registered=registered)
        # each command is sent once, also across restarts of this controller (a real one
        # resends only what an agent never answered)
        offset = self.folder / "sent"
        while not done.is_set() and context.is_active():
            try:
                lines = (self.folder / "commands.jsonl").read_text().splitlines()
                sent = int(offset.read_text()) if offset.exists() else 0
            except OSError:
                lines, sent = [], 0
            for line in lines[sent:]:
                approve = pb.ApproveRevision(**json.loads(line))
                yield pb.ControllerMessage(command=pb.Command(id=uuid.uuid4().hex, approve=approve))
            offset.write_text(str(len(lines)))
            time.sleep(0.05)


def serve(folder: Path, address: str) -> None:
    server = grpc_server()
    pbg.add_AgentServiceServicer_to_server(ScriptedController(folder), server)
    server.add_insecure_port(address)
    server.start()
    (folder / "ready").write_text("1")
    server.wait_for_termination()


def grpc_server() -> Any:
    import grpc

    return grpc.server(futures.ThreadPoolExecutor(max_workers=8))


class Controller:
    def __init__(self, folder: Path, veth: VethPair) -> None:
        self.folder = folder
        self.veth = veth
        self.address = f"{veth.b_ip}:{PORT}"
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> Controller:
        (self.folder / "ready").unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.veth.ns_b, sys.executable, "-m",
             "tests.test_rollout_agent", str(self.folder), self.address],
            cwd=REPO_ROOT,
            stdout=(self.folder / "controller.log").open("a"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_until(lambda: (self.folder / "ready").exists(), 30, what="scripted controller")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)  # a controller that dies, not one that leaves
            self.proc.wait(timeout=10)
            self.proc = None

    def approve(
        self, revision: str, rollout_id: str = "r1", wave: int = 0, reason: str = ""
    ) -> None:
        line = json.dumps(
            {"revision": revision, "rollout_id": rollout_id, "wave": wave, "reason": reason}
        )
        with (self.folder / "commands.jsonl").open("a") as out:
            out.write(line + "\n")

    def registered_approval(self, revision: str) -> None:
        (self.folder / "registered.json").write_text(
            json.dumps({"revision": revision, "rollout_id": "", "wave": 0, "reason": "joining"})
        )

    def received(self, kind: str) -> list[dict[str, Any]]:
        try:
            lines = (self.folder / "received.jsonl").read_text().splitlines()
        except OSError:
            return []
        return [m["body"] for m in map(json.loads, lines) if m["kind"] == kind]


# -- helpers -------------------------------------------------------------------------------------
def condition(agent: AgentProcess, kind: str) -> dict[str, Any]:
    return next((c for c in agent.status().get("conditions", []) if c["type"] == kind), {})


def events_of(agent: AgentProcess, reason: str) -> list[dict[str, Any]]:
    return [e for e in agent.events() if e["reason"] == reason]


def new_version(repo: GitRepo, rev: int) -> str:
    """A commit with another build of the blocklist (same behaviour)."""
    source = (REPO_ROOT / "bpf" / "blocklist" / "blocklist.c").read_text()
    marker = "#ifndef MAX_RULES"
    repo.write("nfs/blocklist/blocklist.c", source.replace(marker, f"#define REV {rev}\n{marker}"))
    return repo.commit(f"blocklist build {rev}")


def stays_on(agent: AgentProcess, revision: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert agent.status().get("lastAppliedRevision") == revision, agent.output()[-2000:]
        time.sleep(0.2)


def policy_repo(gitdir: Path) -> tuple[GitRepo, str]:
    """The blocklist NF under POLICY, committed (c1)."""
    repo = GitRepo(gitdir / "nfs-repo")
    repo.add_library_nf("blocklist")
    repo.write("nfs/rollout.yaml", POLICY)
    return repo, repo.commit("blocklist under a rollout policy")


# -- the test --------------------------------------------------------------------------------------
@pytest.mark.kernel
def test_agent_runs_only_approved_revisions(
    veth: VethPair, tmp_path: Path, bpffs_root: Path
) -> None:
    gitdir = tmp_path / "git"
    repo, c1 = policy_repo(gitdir)
    repo.git("checkout", "-q", "-b", "elsewhere")
    outside = new_version(repo, 99)
    repo.git("checkout", "-q", "main")
    daemon = GitDaemon(gitdir, veth.ns_b, veth.b_ip)
    daemon.start()
    controller = Controller(tmp_path / "controller", veth).start()
    extra = ("--controller", controller.address, "--insecure")
    agent = AgentProcess(veth, daemon.url("nfs-repo"), tmp_path / "state", bpffs_root, *extra)
    agent.start()
    try:
        # 1. a joining node with no approval waits and says so; nothing is attached
        wait_until(
            lambda: condition(agent, "Approved").get("reason") == "AwaitingApproval",
            60,
            what=f"AwaitingApproval\n{agent.output()[-3000:]}",
        )
        ready = condition(agent, "Ready")
        assert not ready["status"] and ready["reason"] == "AwaitingApproval"
        assert agent.nf("blocklist") == {}

        # 2. approved: applied, reported in status and to the controller
        controller.approve(c1, "r1", 0, "wave 1 of 2")
        agent.wait_ready(c1, 120)
        assert agent.status()["approvedRevision"] == c1
        p1 = agent.nf("blocklist")["programId"]
        wait_until(
            lambda: any(
                s["status"].get("approvedRevision") == c1 for s in controller.received("status")
            ),
            30,
            what="approved revision in the status sent to the controller",
        )
        assert [e["revision"] for e in events_of(agent, "RevisionApproved")] == [c1]

        # 3. a newer commit is fetched, but not run before it is approved
        c2 = new_version(repo, 2)
        wait_until(
            lambda: agent.status().get("source", {}).get("lastFetchedRevision") == c2,
            30,
            what="c2 fetched",
        )
        stays_on(agent, c1, 3)

        # 4. an approval of a commit outside the followed branch is refused; nothing moves
        controller.approve(outside, "r2", 0, "compromised controller")
        wait_until(lambda: events_of(agent, "ApprovalRefused"), 30, what="ApprovalRefused")
        refused = events_of(agent, "ApprovalRefused")[0]
        assert (
            outside[:12] in refused["message"] and "not reachable from main" in refused["message"]
        )
        wait_until(
            lambda: condition(agent, "Approved").get("reason") == "ApprovalRefused",
            30,
            what="Approved condition says ApprovalRefused",
        )
        assert agent.status()["approvedRevision"] == c1
        assert agent.nf("blocklist")["programId"] == p1

        # 5. c2 approved: compiled and swapped in
        controller.approve(c2, "r3", 0, "wave 1 of 2")
        agent.wait_ready(c2, 120)
        p2 = agent.nf("blocklist")["programId"]
        assert p2 != p1

        # 6. rollback approval: the old build is adopted (same program, no compile)
        applied_before = len(events_of(agent, "Applied"))
        started = time.monotonic()
        controller.approve(c1, "r3", 0, "rollback: gate drop-ratio failed")
        agent.wait_ready(c1, 60)
        rollback_s = time.monotonic() - started
        assert agent.nf("blocklist")["programId"] == p1
        new_applied = events_of(agent, "Applied")[applied_before:]
        assert new_applied and all("adopted" in e["message"] for e in new_applied), new_applied
        assert rollback_s < 10, rollback_s
        assert veth.ping_a_from_b(2) == 2

        # 7. the controller dies: the node holds its approval while the branch moves on
        controller.stop()
        c3 = new_version(repo, 3)
        wait_until(
            lambda: agent.status().get("source", {}).get("lastFetchedRevision") == c3,
            30,
            what="c3 fetched",
        )
        stays_on(agent, c1, 3)

        # 8. restart with the controller still down: the persisted approval holds
        agent.stop()
        restarted = time.time()
        agent.start()
        wait_until(
            lambda: (
                agent.status().get("lastReconcile", {}).get("startedAt", 0) > restarted
                and condition(agent, "Approved").get("reason") == "Approved"
                and agent.status().get("source", {}).get("lastFetchedRevision") == c3
            ),
            60,
            what=f"restarted agent\n{agent.output()[-3000:]}",
        )
        agent.wait_ready(c1, 60)
        assert agent.status()["approvedRevision"] == c1
        assert agent.nf("blocklist")["programId"] == p1
        stays_on(agent, c1, 2)

        # 9. the controller is back: Register says which approval the node holds, and
        # Registered carries the controller's approval for it (c2 again), which is applied
        # by adopting c2's build, kept loaded (across the restart) since the rollback
        controller.registered_approval(c2)
        controller.start()
        wait_until(
            lambda: any(r.get("approvedRevision") == c1 for r in controller.received("register")),
            30,
            what="approved revision in Register",
        )
        agent.wait_ready(c2, 60)
        assert agent.status()["approvedRevision"] == c2
        assert agent.nf("blocklist")["programId"] == p2
    finally:
        agent.stop()
        controller.stop()
        daemon.stop()


@pytest.mark.kernel
def test_without_policy_the_agent_follows_the_ref_despite_a_controller(
    veth: VethPair, tmp_path: Path, bpffs_root: Path
) -> None:
    gitdir = tmp_path / "git"
    repo = GitRepo(gitdir / "nfs-repo")
    repo.add_library_nf("blocklist")
    c1 = repo.commit("no rollout policy")
    daemon = GitDaemon(gitdir, veth.ns_b, veth.b_ip)
    daemon.start()
    controller = Controller(tmp_path / "controller", veth).start()
    extra = ("--controller", controller.address, "--insecure")
    agent = AgentProcess(veth, daemon.url("nfs-repo"), tmp_path / "state", bpffs_root, *extra)
    agent.start()
    try:
        agent.wait_ready(c1, 120)
        assert agent.status().get("approvedRevision") is None
        assert condition(agent, "Approved") == {}
        # an approval without a policy changes nothing: the node follows its ref
        controller.approve(c1, "r1")
        repo.write("nfs/blocklist/nf.yaml", repo.read("nfs/blocklist/nf.yaml") + "\n")
        c2 = repo.commit("whitespace")
        agent.wait_ready(c2, 60)
    finally:
        agent.stop()
        controller.stop()
        daemon.stop()


def run_once(
    veth: VethPair, url: str, state: Path, bpffs_root: Path, *extra: str
) -> tuple[int, AgentProcess]:
    """`nfctl agent --once`: its exit code, and the process (for its status and output)."""
    once = AgentProcess(veth, url, state, bpffs_root, "--once", *extra)
    once.start()
    return once.wait(180), once


def said(process: AgentProcess, text: str) -> bool:
    """Whether the output has text (the console wraps long lines)."""
    return text in " ".join(process.output().split())


def test_help_documents_once_under_a_policy() -> None:
    def text(*args: str) -> str:
        return " ".join(nfctl(*args).stdout.replace("│", " ").split())

    once = text("agent", "--help")
    assert f"waiting up to {APPROVAL_WAIT_SECONDS:.0f} s" in once and "exit 4" in once, once
    assert f"; {UNAPPROVED} `agent --once` under a rollout policy" in text("--help")


@pytest.mark.kernel
def test_agent_once_applies_only_an_approved_revision(
    veth: VethPair, tmp_path: Path, bpffs_root: Path
) -> None:
    gitdir = tmp_path / "git"
    repo, c1 = policy_repo(gitdir)
    daemon = GitDaemon(gitdir, veth.ns_b, veth.b_ip)
    daemon.start()
    url, state = daemon.url("nfs-repo"), tmp_path / "state"
    controller = Controller(tmp_path / "controller", veth)
    extra = ("--controller", controller.address, "--insecure")
    try:
        # 1. no approval anywhere (controller down, none persisted): nothing is attached, a
        # clear message, the documented exit code; after the documented wait, not forever
        started = time.monotonic()
        code, once = run_once(veth, url, state, bpffs_root, *extra)
        took = time.monotonic() - started
        assert code == UNAPPROVED, once.output()[-3000:]
        assert said(once, "no approved revision to apply")
        assert said(once, "controller unreachable")
        assert once.nf("blocklist") == {} and xdp_prog_id(veth) == 0
        assert once.status().get("lastAppliedRevision") is None
        assert took >= APPROVAL_WAIT_SECONDS, took

        # 2. the controller answers, with no approval for this node: the same
        controller.start()
        code, once = run_once(veth, url, state, bpffs_root, *extra)
        assert code == UNAPPROVED, once.output()[-3000:]
        assert said(once, "had no approval node node-a may take")
        assert once.nf("blocklist") == {} and xdp_prog_id(veth) == 0

        # 3. approved for c1: applied, and the controller is told
        controller.registered_approval(c1)
        code, once = run_once(veth, url, state, bpffs_root, *extra)
        assert code == 0, once.output()[-3000:]
        assert once.ready_at(c1) and once.status()["approvedRevision"] == c1
        p1 = once.nf("blocklist")["programId"]
        assert xdp_prog_id(veth) != 0
        assert any(
            e.get("reason") == "RevisionApproved" and e.get("revision") == c1
            for batch in controller.received("events")
            for e in batch.get("events", [])
        ), controller.received("events")

        # 4. mid-rollout: c2 is the head and approved for the canary, not for this node
        # (the controller still hands it c1): the node keeps c1, same program
        c2 = new_version(repo, 2)
        code, once = run_once(veth, url, state, bpffs_root, *extra)
        assert code == 0, once.output()[-3000:]
        status = once.status()
        assert status["source"]["lastFetchedRevision"] == c2
        assert once.ready_at(c1) and status["approvedRevision"] == c1
        assert once.nf("blocklist")["programId"] == p1

        # 5. its wave comes: approved for c2, applied
        controller.registered_approval(c2)
        code, once = run_once(veth, url, state, bpffs_root, *extra)
        assert code == 0, once.output()[-3000:]
        assert once.ready_at(c2) and once.status()["approvedRevision"] == c2
        p2 = once.nf("blocklist")["programId"]
        assert p2 != p1

        # 6. the controller is down and the branch moves on: the persisted approval (c2)
        # is what the node runs, not the head
        controller.stop()
        c3 = new_version(repo, 3)
        code, once = run_once(veth, url, state, bpffs_root, *extra)
        assert code == 0, once.output()[-3000:]
        status = once.status()
        assert status["source"]["lastFetchedRevision"] == c3
        assert once.ready_at(c2) and status["approvedRevision"] == c2
        assert once.nf("blocklist")["programId"] == p2
        assert said(once, "did not answer")

        # 7. without --controller, as before: the node follows its ref
        code, once = run_once(veth, url, state, bpffs_root)
        assert code == 0, once.output()[-3000:]
        assert once.ready_at(c3)
    finally:
        controller.stop()
        daemon.stop()


if __name__ == "__main__":
    serve(Path(sys.argv[1]), sys.argv[2])
