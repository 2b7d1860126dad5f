"""One status model, one renderer: a status an agent sent to a real controller (over the
agent's own conversion) reads the same in `nfctl get node` as `nfctl status` shows it from
the node's state dir, and `nfctl get nodes` lists it."""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.api.nfctl.v1 import nfctl_pb2_grpc as pbg
from nfctl.wire.convert import status_to_proto
from nfctl.wire.status import ConditionType, NodeStatus
from tests.loopback_controller import PY, REPO_ROOT, free_port
from tests.test_wire_convert_unit import full_status

LONG_AGO = 1_700_000_000.0  # rendered as a date, not "Ns ago": the two runs print the same


def sent_status() -> NodeStatus:
    status = full_status()
    status.observed_at = LONG_AGO
    assert status.last_reconcile is not None
    status.last_reconcile.started_at = LONG_AGO
    for cond in status.conditions:
        cond.last_transition_time = LONG_AGO
    status.set_condition(ConditionType.READY, True, "ReconciliationSucceeded", "applied")
    return status


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[str]:
    import subprocess

    address = f"127.0.0.1:{free_port()}"
    log_path = tmp_path / "controller.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [PY, "-m", "nfctl", "controller", "--listen", address, "--insecure",
             "--db", str(tmp_path / "controller.db"), "--webhook-addr", "", "--metrics-addr", "",
             "--health-listen", ""],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while "controller listening" not in log_path.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
            yield address
        finally:
            proc.terminate()
            proc.wait(timeout=20)


def nfctl(*args: str) -> tuple[int, str]:
    import os
    import subprocess

    proc = subprocess.run(
        [PY, "-m", "nfctl", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "250", "TERM": "dumb"},
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_get_node_renders_what_nfctl_status_renders(controller: str, tmp_path: Path) -> None:
    status = sent_status()
    state = tmp_path / "state"
    state.mkdir()
    (state / "status.json").write_text(json.dumps(status.dump()))

    outbox: queue.Queue[pb.AgentMessage | None] = queue.Queue()
    outbox.put(
        pb.AgentMessage(
            register=pb.Register(node=status.node, labels=status.labels, event_epoch="e")
        )
    )
    outbox.put(pb.AgentMessage(status=pb.StatusReport(status=status_to_proto(status))))
    with grpc.insecure_channel(controller) as channel:
        call = pbg.AgentServiceStub(channel).Connect(iter(outbox.get, None))
        assert next(call).WhichOneof("body") == "registered"
        deadline = time.monotonic() + 30
        while True:
            code, remote = nfctl(
                "get", "node", status.node, "--controller", controller, "--insecure"
            )
            if "blocklist" in remote or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        code_nodes, listed = nfctl("get", "nodes", "--controller", controller, "--insecure")
        outbox.put(None)
        call.cancel()
    local_code, local = nfctl("status", "--state-dir", str(state))

    assert code == local_code == 0, remote + local  # Ready: exit 0 both ways
    remote_lines = remote.splitlines()
    connection = [line for line in remote_lines if line.startswith("controller: ")]
    assert len(connection) == 1 and connection[0].startswith("controller: connected"), remote
    assert [line for line in remote_lines if line not in connection] == local.splitlines()
    # every part of the status made it: ids, shadowing, the error with file:line, verdicts
    for shown in (
        "dispatcher 40",
        "link 7",
        "shadowed by cilium_xdp (id 3)",
        "nfs/blocklist/blocklist.c:42 verifier refused",
        "5/7/0/0 (monitor) errors 4",
        "approvedRevision bbbbbbbbbbbb",
    ):
        assert shown in remote, (shown, remote)

    assert code_nodes == 0, listed
    [row] = [line for line in listed.splitlines() if line.lstrip().startswith("edge-1")]
    assert "blocklist:Degraded" in row and "True" in row and "bbbbbbbbbbbb" in row, listed
    assert "APPROVED" in listed  # a node under a rollout policy shows its approval


def test_get_node_of_an_unknown_node_says_so(controller: str) -> None:
    code, out = nfctl("get", "node", "nowhere", "--controller", controller, "--insecure")
    assert code != 0 and "NOT_FOUND" in out and "nowhere" in out, out
