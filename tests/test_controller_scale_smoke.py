"""Smoke test of benchmarks/controller_scale.py: a real controller process and 100 simulated
agents (real gRPC streams over loopback, plaintext), short phases. No root or kernel needed."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
AGENTS = 100


def test_controller_scale_benchmark_runs() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.controller_scale",
            "--agents",
            str(AGENTS),
            "--workers",
            "2",
            "--interval",
            "1",
            "--warmup",
            "1",
            "--steady",
            "4",
            "--probe-every",
            "0.25",
            "--fanout-rounds",
            "2",
            "--apply-delay",
            "0.5",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)

    assert "SIMULATED" in result["simulated_agents"]
    assert result["transport"].startswith("plaintext")
    for key in ("connect", "visibility_ms", "fanout", "controller", "errors", "machine"):
        assert key in result, key

    agents = result["agents"]
    assert agents["registered"] == AGENTS
    assert agents["connected_at_steady_end"] == AGENTS
    assert agents["controller_metric_agents_connected"] == AGENTS
    assert result["connect"]["all_registered_s"] is not None

    visibility = result["visibility_ms"]
    assert visibility["n"] > 0 and visibility["not_seen_within_30s"] == 0
    assert math.isfinite(visibility["p99"]) and visibility["p99"] > 0

    fanout = result["fanout"]
    assert fanout["all_reached"]
    assert len(fanout["rounds"]) == 2
    for round_ in fanout["rounds"]:
        assert round_["sent_to"] == AGENTS and round_["reached"] == AGENTS
        assert math.isfinite(round_["last_ms"]) and round_["last_ms"] > 0

    controller = result["controller"]
    assert controller["rss_peak_mb"] > 0
    assert controller["exit_code"] == 0 and controller["log_tracebacks"] == 0
    assert result["errors"]["stream_errors"] == 0
    assert result["errors"]["connect_errors"] == 0
    assert set(result["targets"]["met"]) == {"agents", "visibility_p99", "fanout_all", "rss"}
