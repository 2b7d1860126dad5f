"""`nfctl top` against a real agent counting real packets: the rate it reports matches the
rate ping sent within 10%, and the live view renders in a pseudo-terminal."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nfctl.netns import VethPair
from tests.agent_harness import REPO_ROOT, AgentProcess, GitRepo

pytestmark = pytest.mark.kernel

NFCTL = str(Path(sys.executable).parent / "nfctl")
ICMP_V4_KEY = "ethertype=2048,proto=1,pad=0"


@pytest.fixture
def agent(veth: VethPair, bpffs_root: Path, tmp_path: Path) -> Iterator[AgentProcess]:
    repo = GitRepo(tmp_path / "nfs-repo")
    repo.add_library_nf("counter")
    revision = repo.commit("counter")
    running = AgentProcess(veth, f"file://{repo.path}", tmp_path / "state", bpffs_root).start()
    try:
        running.wait_ready(revision, timeout=120)
        yield running
    finally:
        running.stop()
        from nfctl.datapath.datapath import Datapath

        Datapath(bpffs_root, tmp_path / "state", netns=veth.ns_a).teardown()


def in_ns_a(veth: VethPair, *args: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{veth.ns_a}", *args]


def test_top_rate_matches_the_traffic_sent(veth: VethPair, agent: AgentProcess) -> None:
    ping_args = ["ping", "-n", "-q", "-i", "0.02", "-c", "400", veth.a_ip]
    ping = subprocess.Popen(
        ["ip", "netns", "exec", veth.ns_b, *ping_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(1.5)  # steady state before the sampling window
    proc = subprocess.run(
        in_ns_a(veth, NFCTL, "top", "-a", "127.0.0.1:9101=node-a", "--interval", "3", "-o", "json"),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        check=False,
    )
    out, _ = ping.communicate(timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ping.returncode == 0, out
    sent, millis = re.search(r"(\d+) packets transmitted.*time (\d+)ms", out).groups()  # type: ignore[union-attr]
    assert int(sent) == 400
    sent_rate = (int(sent) - 1) / (int(millis) / 1000)
    rows = json.loads(proc.stdout)["rows"]
    [icmp] = [
        r
        for r in rows
        if r["metric"] == "nfctl_nf_counter_packets_total" and r["key"] == ICMP_V4_KEY
    ]
    assert icmp["node"] == "node-a" and icmp["nf"] == "counter" and icmp["state"] == "Applied"
    print(f"top rate {icmp['rate']:.2f}/s, ping sent {sent_rate:.2f}/s")
    assert abs(icmp["rate"] - sent_rate) <= 0.1 * sent_rate, (icmp, sent_rate)


def test_top_live_view_in_a_terminal(veth: VethPair, agent: AgentProcess) -> None:
    assert veth.ping_a_from_b(5) == 5
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        in_ns_a(veth, NFCTL, "top", "--agent", "127.0.0.1:9101=node-a", "--interval", "0.5"),
        stdin=follower,
        stdout=follower,
        stderr=follower,
        cwd=REPO_ROOT,
        env={**os.environ, "COLUMNS": "160", "LINES": "40", "TERM": "xterm"},
        start_new_session=True,
    )
    os.close(follower)
    screen = b""
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline and b"counter_packets_total" not in screen:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    screen += os.read(leader, 65536)
                except OSError:
                    break
        text = screen.decode(errors="replace")
        assert "counter_packets_total" in text and "node-a" in text, text[-3000:]
        assert "RATE/s" in text and "\x1b[" in text  # drawn for a terminal, in place
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(leader)
