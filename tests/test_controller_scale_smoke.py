"""Smoke test of benchmarks/controller_scale.py: a real controller process and 100 simulated
agents (real gRPC streams over loopback, plaintext), short phases; and two replicas on a real
PostgreSQL with mTLS. No root or kernel needed (PostgreSQL's binaries for the second)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.pg_harness import require_postgres

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


@pytest.mark.parametrize("generator", ["python", "go"])
def test_controller_scale_two_replicas_on_postgresql_with_mtls(generator: str) -> None:
    """`--replicas 2 --db postgresql --tls`: a real PostgreSQL (as tests/pg_harness.py
    starts it), two controller processes, 100 mTLS agents spread over both; every replica
    shows the whole fleet, fan-outs issued on either reach every agent, and the store's
    write transactions per status period are counted. The same with the agents simulated
    in Go (benchmarks/simagent, built here from Debian's Go packages)."""
    require_postgres()
    proc = subprocess.run(
        [
            sys.executable, "-m", "benchmarks.controller_scale", "--agents", str(AGENTS),
            "--workers", "2", "--interval", "1", "--warmup", "1", "--steady", "4",
            "--probe-every", "0.25", "--fanout-rounds", "2", "--apply-delay", "0.5",
            "--replicas", "2", "--db", "postgresql", "--tls", "--generator", generator,
            "--json",
        ],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["transport"].startswith("mTLS")
    assert result["plan"]["generator"] == generator
    assert result["generator"].lower().startswith(generator)
    load = result["load"]
    # every agent answered every command, reported, and sent its event log (5 each at least)
    assert load["command_results"] == 2 * AGENTS
    assert load["status_reports"] >= AGENTS * 4 and load["events"] >= AGENTS * 5
    # the messages SimAgent builds, from both generators: ~2 KB status reports
    assert 1500 < result["agents"]["status_bytes_mean"] < 2600

    agents = result["agents"]
    assert agents["registered"] == AGENTS
    assert agents["controller_metric_agents_connected"] == AGENTS
    assert agents["connected_per_replica"] == [AGENTS // 2, AGENTS // 2]
    views = result["operator_queries"]["list_nodes_all"]
    assert views["nodes_per_replica"] == [AGENTS, AGENTS]
    assert views["connected_per_replica"] == [AGENTS, AGENTS]

    visibility = result["visibility_ms"]
    assert visibility["not_seen_within_30s"] == 0
    assert visibility["other_replica"]["n"] > 0
    assert math.isfinite(visibility["other_replica"]["p99"])

    fanout = result["fanout"]
    assert fanout["all_reached"]
    assert [r["via_replica"] for r in fanout["rounds"]] == ["r0", "r1"]
    for round_ in fanout["rounds"]:
        assert round_["sent_to"] == AGENTS and round_["reached"] == AGENTS
        assert len(round_["worker_loop_lag_max_ms"]) == 2
        # where the time goes, per replica, from each controller's own log of the command
        parts = round_["where_the_time_goes"]
        assert [p["replica"] for p in parts] == ["r0", "r1"]
        assert sum(p["streams"] for p in parts) == AGENTS
        for part in parts:
            assert part["written"] == part["streams"] == AGENTS // 2
            steps = [
                part[k]
                for k in (
                    "stored_ms",
                    "relayed_ms",
                    "claimed_ms",
                    "queued_ms",
                    "written_p50_ms",
                    "written_last_ms",
                )
            ]
            assert steps == sorted(steps) and steps[0] >= 0, part
            assert part["generator_ms"] == pytest.approx(
                part["agents_seen_last_ms"] - part["written_last_ms"], abs=0.2
            )
        origin = next(p for p in parts if p["replica"] == round_["via_replica"])
        other = next(p for p in parts if p["replica"] != round_["via_replica"])
        assert origin["relayed_ms"] == origin["stored_ms"]  # the call reached it directly
        assert other["relayed_ms"] >= origin["stored_ms"]  # through PostgreSQL's NOTIFY

    controller = result["controller"]
    assert [r["name"] for r in controller["replicas"]] == ["r0", "r1"]
    for replica in controller["replicas"]:
        assert replica["rss_peak_mb"] > 0 and replica["cpu_cores_steady"] is not None
        assert replica["exit_code"] == 0 and replica["log_tracebacks"] == 0
        assert replica["agents_connected_metric"] == AGENTS // 2
    store = result["store"]
    assert store["db"].startswith("postgresql")
    # batched: far fewer write transactions than status reports per period
    assert 0 < store["write_transactions_per_period"] < AGENTS / 4
    assert store["node_rows_per_period"] > 0
    assert result["errors"]["stream_errors"] == 0 and result["errors"]["connect_errors"] == 0


def test_replicas_need_postgresql() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.controller_scale", "--agents", "10", "--replicas", "2"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--replicas > 1 needs --db postgresql" in proc.stderr
