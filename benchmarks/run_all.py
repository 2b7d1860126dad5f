"""Run every benchmark in turn; JSON results go to benchmarks/results/<UTC time>/.

sudo make bench
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUNS: list[tuple[str, list[str]]] = [
    ("update_loss_xdp", ["benchmarks.update_loss", "--hook", "xdp", "--updates", "1000"]),
    (
        "update_loss_tc_ingress",
        ["benchmarks.update_loss", "--hook", "tc-ingress", "--updates", "1000"],
    ),
    (
        "update_loss_tc_egress",
        ["benchmarks.update_loss", "--hook", "tc-egress", "--updates", "1000"],
    ),
    ("chain_overhead", ["benchmarks.chain_overhead"]),
    ("rediscover", ["benchmarks.rediscover", "--nfs", "50"]),
    ("compile_times", ["benchmarks.compile_times", "--rounds", "5"]),
    ("gitops_latency", ["benchmarks.gitops_latency", "--commits", "20"]),
    ("controller_scale", ["benchmarks.controller_scale", "--agents", "10000"]),
    (
        # the README's HA figures: 2 replicas on PostgreSQL, 10,000 mTLS agents in Go
        "controller_scale_ha",
        [
            "benchmarks.controller_scale",
            *("--agents", "10000", "--replicas", "2", "--db", "postgresql", "--tls"),
            *("--generator", "go", "--workers", "2", "--worker-sessions", "--steady", "30"),
        ],
    ),
    ("webhook_fanout", ["benchmarks.webhook_fanout", "--nodes", "100", "--rounds", "5"]),
]


def main() -> int:
    out = ROOT / "benchmarks" / "results" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name, args in RUNS:
        print(f"== {name}", flush=True)
        with (out / f"{name}.json").open("w") as stdout, (out / f"{name}.log").open("w") as log:
            code = subprocess.call(
                [sys.executable, "-m", *args, "--json"], stdout=stdout, stderr=log, cwd=ROOT
            )
        if code != 0:
            failed.append(name)
            print(f"   failed (exit {code}); see {out / (name + '.log')}", flush=True)
    print(f"results in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
