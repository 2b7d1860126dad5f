"""Shared benchmark helpers: machine facts, percentiles, traffic."""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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


class Flood:
    """`ping -f` from one namespace until stopped; sent/received from ping's summary."""

    def __init__(self, netns: str, target: str, preload: int = 0) -> None:
        args = ["ip", "netns", "exec", netns, "ping", "-n", "-q", "-f", "-W", "1"]
        if preload:
            args += ["-l", str(preload)]
        self.proc = subprocess.Popen(
            [*args, target], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        time.sleep(0.2)

    def stop(self) -> tuple[int, int]:
        time.sleep(0.3)  # let in-flight replies arrive
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=30)
        match = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        if not match:
            raise RuntimeError(f"ping gave no summary: {out}")
        return int(match.group(1)), int(match.group(2))
