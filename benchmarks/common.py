"""Shared benchmark helpers: machine facts, percentiles, traffic."""

from __future__ import annotations

import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nfctl.netns import ping_summary

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from nfctl.system import bcc_version

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "bcc": bcc_version(),
    }


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary_ms(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {
        "p50": round(percentile(ms, 50), 3),
        "p95": round(percentile(ms, 95), 3),
        "p99": round(percentile(ms, 99), 3),
        "mean": round(statistics.fmean(ms), 3) if ms else 0.0,
        "n": len(ms),
    }


def emit(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        for key, value in data.items():
            print(f"{key}: {value}")


class EchoCounters:
    """Echo requests sent and echo replies received by one network namespace's kernel
    (its ICMP counters in /proc/net/snmp, or snmp6 for IPv6): they count the replies that
    arrive after ping has exited, which ping's summary misses. The namespace must have no
    other echo traffic while they are used."""

    def __init__(self, netns: str, v6: bool = False) -> None:
        self.netns = netns
        self.v6 = v6

    def read(self) -> tuple[int, int]:
        name = "/proc/net/snmp6" if self.v6 else "/proc/net/snmp"
        text = subprocess.run(
            ["ip", "netns", "exec", self.netns, "cat", name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        if self.v6:
            fields = (line.split() for line in text.splitlines() if line.strip())
            counts = {name: int(value) for name, value, *_ in fields}
            return counts["Icmp6OutEchos"], counts["Icmp6InEchoReplies"]
        header, row = [line.split() for line in text.splitlines() if line.startswith("Icmp:")]
        values = dict(zip(header[1:], map(int, row[1:]), strict=True))
        return values["OutEchos"], values["InEchoReps"]

    def settled_since(self, before: tuple[int, int], wait: float = 1.5) -> tuple[int, int]:
        """(sent, received) since before, once replies stop arriving: all are in, or none
        came for 0.1 s and wait is over (a reply not in by then is lost)."""
        deadline = time.monotonic() + wait
        last = self.read()
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now = self.read()
            if now == last and now[0] - before[0] == now[1] - before[1]:
                break
            last = now
        return last[0] - before[0], last[1] - before[1]


def counted_echoes(
    counters: EchoCounters, before: tuple[int, int], ping_output: str
) -> tuple[int, int]:
    """(sent, received) by the namespace's kernel once settled, checked against ping's own
    summary (the kernel counts at least what ping did)."""
    sent, received = counters.settled_since(before)
    transmitted, answered = ping_summary(ping_output)
    if sent < transmitted or received < answered:
        raise RuntimeError(f"kernel counted {sent}/{received}, less than ping: {ping_output}")
    return sent, received


class Flood:
    """`ping -f` from one namespace until stopped.

    Sent and received are the sender namespace's ICMP counters (EchoCounters), read once
    every reply still in flight when ping was stopped has arrived: ping's own summary counts
    those as lost, which on a loaded machine turned a chain that passed every packet into a
    loss of a few dozen."""

    def __init__(self, netns: str, target: str, preload: int = 0) -> None:
        args = ["ip", "netns", "exec", netns, "ping", "-n", "-q", "-f", "-W", "1"]
        if preload:
            args += ["-l", str(preload)]
        self.counters = EchoCounters(netns, ":" in target)
        self.before = self.counters.read()
        self.proc = subprocess.Popen(
            [*args, target], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        time.sleep(0.2)

    def stop(self) -> tuple[int, int]:
        time.sleep(0.3)  # the flood runs on over the last change
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=30)
        return counted_echoes(self.counters, self.before, out)
