"""`nfctl top` against a real controller and a real agent counting real packets: the rates
it reports (from the verdict counters in node status, and with --agent from the counters
the NF exports) match the rate ping sent within 10%, and the live view renders in a
pseudo-terminal."""

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
from tests.agent_harness import REPO_ROOT, AgentProcess, GitRepo, set_blocked_v4, wait_until

pytestmark = pytest.mark.kernel

NFCTL = str(Path(sys.executable).parent / "nfctl")
ICMP_V4_KEY = "ethertype=2048,proto=1,pad=0"
CONTROLLER = "127.0.0.1:19443"  # in the agent's network namespace: private to the test


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


@pytest.fixture
def fleet(veth: VethPair, bpffs_root: Path, tmp_path: Path) -> Iterator[AgentProcess]:
    """A controller and an agent reporting to it, in namespace a: the counter NF and the
    blocklist in monitor mode, listing b's address (it would drop every ping, drops none)."""
    repo = GitRepo(tmp_path / "nfs-repo")
    repo.add_library_nf("counter")
    repo.add_library_nf("blocklist")
    set_blocked_v4(repo, ["203.0.113.7", veth.b_ip])  # the first kept: tests.yaml uses it
    path = "nfs/blocklist/nf.yaml"
    repo.write(path, repo.read(path).replace("  attach:\n", "  mode: monitor\n  attach:\n", 1))
    revision = repo.commit("counter and a blocklist in monitor mode")
    log = (tmp_path / "controller.log").open("w")
    controller = subprocess.Popen(
        in_ns_a(
            veth, NFCTL, "controller", "--listen", CONTROLLER, "--insecure",
            "--db", str(tmp_path / "controller.db"), "--webhook-addr", "", "--metrics-addr", "",
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO_ROOT,
    )  # fmt: skip
    running = AgentProcess(
        veth,
        f"file://{repo.path}",
        tmp_path / "state",
        bpffs_root,
        "--controller",
        CONTROLLER,
        "--insecure",
    ).start()
    try:
        running.wait_ready(revision, timeout=120)
        wait_until(
            lambda: _applied_at_controller(veth, revision), 60, what="node-a at the controller"
        )
        yield running
    finally:
        running.stop()
        controller.terminate()
        controller.wait(timeout=20)
        log.close()
        from nfctl.datapath.datapath import Datapath

        Datapath(bpffs_root, tmp_path / "state", netns=veth.ns_a).teardown()


def _applied_at_controller(veth: VethPair, revision: str) -> bool:
    proc = subprocess.run(
        in_ns_a(
            veth, NFCTL, "get", "nodes", "--controller", CONTROLLER, "--insecure", "-o", "json"
        ),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        check=False,
    )
    nodes = json.loads(proc.stdout) if proc.returncode == 0 else []
    return any(n["status"].get("lastAppliedRevision") == revision for n in nodes)


def start_ping(veth: VethPair, count: int) -> subprocess.Popen[str]:
    """Ping a from b at up to 50/s in the background, each reply stamped with its time."""
    return subprocess.Popen(
        ["ip", "netns", "exec", veth.ns_b, "ping", "-n", "-D", "-i", "0.02", "-c", str(count),
         veth.a_ip],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip


def wait_sending(ping: subprocess.Popen[str]) -> str:
    """Block until the first reply: on a loaded machine ping can take seconds to start.
    Returns what ping printed so far (ping_times needs it)."""
    assert ping.stdout is not None
    head = ""
    while not re.search(r"^\[\d+\.\d+\] \d+ bytes from", head, re.M):
        line = ping.stdout.readline()
        assert line, f"ping ended before a reply: {head[-2000:]}"
        head += line
    return head


def ping_times(ping: subprocess.Popen[str], count: int, head: str = "") -> list[float]:
    """When each ping went (its reply's time, a fraction of a millisecond later): on a
    loaded machine ping keeps no steady rate, so a rate is only comparable over the same
    window. head: what wait_sending already read."""
    rest, _ = ping.communicate(timeout=120)
    out = head + rest
    assert ping.returncode == 0, out[-2000:]
    assert f"{count} packets transmitted, {count} received" in out, out[-2000:]
    return [float(m) for m in re.findall(r"^\[(\d+\.\d+)\] \d+ bytes from", out, re.M)]


def sent_rate(times: list[float], since: float, until: float) -> float:
    assert times[0] < since < until < times[-1], "the window must lie inside the ping run"
    return sum(1 for t in times if since < t <= until) / (until - since)


def test_top_from_the_controller_matches_the_traffic_sent(
    veth: VethPair, fleet: AgentProcess
) -> None:
    ping = start_ping(veth, 500)
    head = wait_sending(ping)
    time.sleep(2.0)  # steady state (and a status report in it) before the window
    proc = subprocess.run(
        in_ns_a(
            veth, NFCTL, "top", "--controller", CONTROLLER, "--insecure", "--interval", "4",
            "-o", "json",
        ),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        check=False,
    )  # fmt: skip
    times = ping_times(ping, 500, head)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(proc.stdout)
    assert data["errors"] == []
    rows = {r["nf"]: r for r in data["rows"]}
    assert set(rows) == {"counter", "blocklist"}, rows
    counter, blocklist = rows["counter"], rows["blocklist"]
    assert counter["since"] == blocklist["since"] and counter["until"] == blocklist["until"]
    rate = sent_rate(times, counter["since"], counter["until"])
    print(f"sent {rate:.2f}/s; top: counter {counter}, blocklist {blocklist}")
    assert counter["window"] >= 2.0  # --interval 4: both polls' snapshots
    for row in (counter, blocklist):
        assert row["node"] == "node-a" and row["state"] == "Applied", row
        assert row["revision"] == fleet.status()["lastAppliedRevision"]
        assert abs(row["packets_per_second"] - rate) <= 0.1 * rate, (row, rate)
        assert row["chain_errors_per_second"] == 0
    # the counter passes everything; the blocklist in monitor mode would drop every ping
    assert counter["mode"] == "enforce" and counter["drops_per_second"] == 0
    assert counter["shares"]["passed"] >= 0.9
    assert blocklist["mode"] == "monitor"
    assert abs(blocklist["drops_per_second"] - rate) <= 0.1 * rate, (blocklist, rate)
    assert blocklist["shares"]["dropped"] >= 0.9


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def drops_shown(screen: str) -> list[float]:
    """DROPS/s of each blocklist row drawn (cells: node, nf, state, mode, revision, pkts/s,
    drops/s, ...), once it has a figure."""
    found = []
    for line in ANSI.sub("", screen).splitlines():
        cells = [c.strip() for c in line.split("│")]
        if cells[:4] == ["node-a", "blocklist", "Applied", "monitor"] and cells[6] != "-":
            found.append(float(cells[6].replace(",", "")))
    return found


def test_top_from_the_controller_live_in_a_terminal(veth: VethPair, fleet: AgentProcess) -> None:
    ping = start_ping(veth, 900)  # 18 s of traffic, more on a loaded machine
    head = wait_sending(ping)
    # every window a figure may cover (below: up to 2 s lag + 3 s span) starts after ping did
    time.sleep(5.5)
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        in_ns_a(
            veth, NFCTL, "top", "--controller", CONTROLLER, "--insecure", "--sort", "drops",
            "--nf", "blocklist",
        ),
        stdin=follower,
        stdout=follower,
        stderr=follower,
        cwd=REPO_ROOT,
        env={**os.environ, "COLUMNS": "200", "LINES": "40", "TERM": "xterm"},
        start_new_session=True,
    )  # fmt: skip
    os.close(follower)
    screen = b""
    rates: list[tuple[float, float]] = []  # (when drawn, drops/s shown)
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline and len(rates) < 3:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:
                    break
                screen += chunk
                now = time.time()
                rates += [(now, r) for r in drops_shown(chunk.decode(errors="replace"))]
        text = screen.decode(errors="replace")
        assert "PKTS/s" in text and "DROPS/s" in text and "\x1b[" in text, text[-3000:]
        assert "counter" not in text.split("PKTS/s", 1)[1]  # --nf blocklist
        assert len(rates) >= 3, text[-3000:]  # redrawn in place every second
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=15) == 0
        assert ping.poll() is None, "the figures must come from while ping was sending"
        times = ping_times(ping, 900, head)
        for drawn, shown in rates:
            # the figure covers ~3 s of the agent's snapshots (one every 0.5 s) that ended
            # at most a poll (1 s) and a report (0.5 s) before it was drawn
            sent = [
                sent_rate(times, drawn - lag - span, drawn - lag)
                for lag in (0.0, 0.5, 1.0, 1.5, 2.0)
                for span in (2.5, 3.0)
            ]
            print(f"top showed drops/s {shown}; ping sent {min(sent):.1f}..{max(sent):.1f}/s")
            assert 0.9 * min(sent) <= shown <= 1.1 * max(sent), (shown, sent)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(leader)
        if ping.poll() is None:
            ping.kill()
            ping.wait()


def test_top_rate_matches_the_traffic_sent(veth: VethPair, agent: AgentProcess) -> None:
    ping = start_ping(veth, 400)
    time.sleep(1.5)  # steady state before the sampling window
    proc = subprocess.run(
        in_ns_a(veth, NFCTL, "top", "-a", "127.0.0.1:9101=node-a", "--interval", "3", "-o", "json"),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        check=False,
    )
    times = ping_times(ping, 400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(proc.stdout)["rows"]
    [icmp] = [
        r
        for r in rows
        if r["metric"] == "nfctl_nf_counter_packets_total" and r["key"] == ICMP_V4_KEY
    ]
    assert icmp["node"] == "node-a" and icmp["nf"] == "counter" and icmp["state"] == "Applied"
    rate = sent_rate(times, icmp["since"], icmp["until"])
    print(f"top rate {icmp['rate']:.2f}/s, ping sent {rate:.2f}/s")
    assert abs(icmp["rate"] - rate) <= 0.1 * rate, (icmp, rate)


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
