"""What the allowlisted compile view costs: bpf/blocklist compiled and verifier-checked
confined and unconfined (the baseline, same run, rounds interleaved), by a fresh worker
and by a warm standby worker (which builds its view when the request arrives, as the
agent's commit-to-attached path does).

sudo .venv/bin/python -m benchmarks.compile_confinement --rounds 5 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from benchmarks.common import REPO_ROOT, emit, machine
from nfctl.compiler import sandbox
from nfctl.compiler.build import BuildRequest
from nfctl.compiler.client import build_request, prepare, run_worker, standby
from nfctl.manifest.repo import scan_repo

STANDBY_WARMUP_SECONDS = 4.0  # the replacement worker must have imported BCC again
# Inside a worker's namespaces: how long building and entering the view takes by itself.
ENTER_PROBE = """
import json, sys, time
import bcc
from nfctl.compiler.build import BuildRequest
from nfctl.compiler.worker import confine
request = BuildRequest.from_json(json.loads(sys.stdin.read()))
start = time.perf_counter()
confine([request])
print(time.perf_counter() - start)
"""


def _enter_seconds(request: BuildRequest) -> float:
    command = [*sandbox.worker_prefix(), sys.executable, "-c", ENTER_PROBE]
    proc = subprocess.run(
        command, input=json.dumps(request.to_json()), capture_output=True, text=True, check=True
    )
    return float(proc.stdout)


def _timed(request: BuildRequest, confined: bool) -> tuple[float, float]:
    sandbox.allow_unconfined(not confined)
    try:
        start = time.perf_counter()
        [result] = run_worker([request])
        wall = time.perf_counter() - start
    finally:
        sandbox.allow_unconfined(False)
    assert result.ok, result.diagnostics
    return wall, result.compile_seconds + result.load_seconds


def _standby_round(request: BuildRequest, confined: bool) -> tuple[float, float]:
    sandbox.allow_unconfined(not confined)
    try:
        standby.enable()
        time.sleep(STANDBY_WARMUP_SECONDS)
        start = time.perf_counter()
        [result] = run_worker([request])
        wall = time.perf_counter() - start
        standby.disable()
    finally:
        sandbox.allow_unconfined(False)
    assert result.ok, result.diagnostics
    return wall, result.compile_seconds + result.load_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    scan = scan_repo(REPO_ROOT / "bpf" / "blocklist")
    [prepared] = [prepare(m, scan.root) for m in scan.manifests]
    request = build_request(prepared)
    samples: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for confined in (True, False):
            label = "confined" if confined else "unconfined"
            for mode, run in (("fresh", _timed), ("standby", _standby_round)):
                wall, build = run(request, confined)
                samples.setdefault(f"{mode}_{label}_wall", []).append(wall)
                samples.setdefault(f"{mode}_{label}_compile_load", []).append(build)
                samples.setdefault(f"{mode}_{label}_outside_compile", []).append(wall - build)
        samples.setdefault("enter_view", []).append(_enter_seconds(request))
    medians = {k: round(statistics.median(v), 3) for k, v in sorted(samples.items())}
    emit(
        {
            "nf": "bpf/blocklist",
            "rounds": args.rounds,
            "median_seconds": medians,
            "standby_overhead_seconds": round(
                medians["standby_confined_wall"] - medians["standby_unconfined_wall"], 3
            ),
            "fresh_overhead_seconds": round(
                medians["fresh_confined_wall"] - medians["fresh_unconfined_wall"], 3
            ),
            "all_seconds": {k: [round(x, 3) for x in v] for k, v in sorted(samples.items())},
            "notes": "wall = run_worker() from request to result (fresh: includes Python "
            "start and import bcc; standby: worker already waiting); compile_load = BCC "
            "compile + verifier inside the worker; outside_compile = wall - compile_load; "
            "enter_view = building and entering the allowlisted view alone, timed inside "
            "a worker; unconfined = --unconfined-compile",
            "machine": machine(),
        },
        args.json,
    )


if __name__ == "__main__":
    main()
