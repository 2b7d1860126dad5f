"""What NF tests cost: `nfctl test bpf/` end to end, cases per second through
BPF_PROG_TEST_RUN, and what the agent's test gate adds for an NF with 100 cases.

sudo .venv/bin/python -m benchmarks.nf_tests --rounds 3 --json

The gate needs a test build of its own (fresh, unpinned maps: tests never touch live maps),
so it costs one more compile + load on top of the running of the cases. Reported: the cases
alone, the test build + cases (what the agent's gate adds after the live build), and the
alternative of running the test build in parallel with the live build, each next to the
baseline measured in the same run: the compile + verify of the same NF that
commit -> attached pays anyway.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import REPO_ROOT, emit, machine, summary_ms
from nfctl.compiler.client import build_request, prepare, run_worker
from nfctl.manifest.repo import scan_repo
from nfctl.nftest import kernel
from nfctl.nftest.build import load_for_tests
from nfctl.nftest.gate import problems_of
from nfctl.nftest.runner import run_tests


def hundred_cases() -> list[dict[str, Any]]:
    """100 cases for the library blocklist: listed sources dropped (counter checked), others
    passed (entry absent checked), v4 and v6."""
    cases: list[dict[str, Any]] = []
    for i in range(100):
        packet: dict[str, Any]
        expect: dict[str, Any]
        if i % 4 == 0:
            packet = {"ipv4": {"src": "203.0.113.7", "dst": f"198.51.100.{i}"}, "udp": {}}
            expect = {"verdict": "drop", "maps": {"drops": [{"key": 0, "increase": 1}]}}
        elif i % 4 == 1:
            packet = {"ipv4": {"src": f"192.0.2.{i}"}, "tcp": {"dport": 443}}
            expect = {
                "verdict": "pass",
                "maps": {"blocked_v4": [{"key": f"192.0.2.{i}", "present": False}]},
            }
        elif i % 4 == 2:
            packet = {"ipv6": {"src": "2001:db8::bad"}, "udp": {"dport": i}}
            expect = {"verdict": "drop"}
        else:
            packet = {"ipv6": {"src": f"2001:db8::{i:x}"}, "icmp": {}}
            expect = {"verdict": "pass"}
        cases.append({"name": f"case {i}", "packet": packet, "expect": expect})
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10000, help="raw test runs for cases/s")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    # 1. nfctl test bpf/ as a user's CI runs it (new process: Python, scapy, compile, cases)
    cli: list[float] = []
    library: dict[str, Any] = {}
    for _ in range(args.rounds):
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "nfctl", "test", str(REPO_ROOT / "bpf"), "-o", "json"],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            check=False,
        )
        cli.append(time.perf_counter() - start)
        library = yaml.safe_load(proc.stdout)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    # 2. raw BPF_PROG_TEST_RUN rate on a library NF's test build
    scan = scan_repo(REPO_ROOT / "bpf" / "blocklist", repo_root=REPO_ROOT)
    prepared = prepare(scan.manifests[0], scan.root)
    builds = load_for_tests([prepared])
    try:
        program = builds.programs["blocklist"]
        from nfctl.nftest.model import Packet
        from nfctl.nftest.packet import build_packet

        packet = build_packet(
            Packet.model_validate({"ipv4": {"src": "192.0.2.1"}, "udp": {}}), REPO_ROOT, REPO_ROOT
        )
        start = time.perf_counter()
        for _ in range(args.runs):
            kernel.test_run(program.fd, packet)
        raw_seconds = time.perf_counter() - start
    finally:
        builds.close()

    # 3. the gate for 100 cases, against compile + verify of the same NF (the baseline)
    gate_total: list[float] = []
    gate_cases: list[float] = []
    baseline: list[float] = []
    side_by_side: list[float] = []  # the alternative: live and test build in parallel
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copytree(REPO_ROOT / "bpf" / "blocklist", root / "blocklist")
        (root / "blocklist" / "tests.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "nfctl.io/v1alpha1",
                    "kind": "NetworkFunctionTests",
                    "cases": hundred_cases(),
                }
            )
        )
        gate_prepared = prepare(scan_repo(root, repo_root=root).manifests[0], root)
        for _ in range(args.rounds):
            start = time.perf_counter()
            [built] = run_worker([build_request(gate_prepared)])
            baseline.append(time.perf_counter() - start)
            assert built.ok
            start = time.perf_counter()
            report = run_tests(root, repo_root=root, only={"blocklist"})
            problems = problems_of(report)
            gate_total.append(time.perf_counter() - start)
            gate_cases.append(report.run_seconds)
            assert not problems and len(report.cases) == 100, problems[:3]
            with ThreadPoolExecutor(max_workers=2) as pool:
                start = time.perf_counter()
                live = pool.submit(run_worker, [build_request(gate_prepared)])
                tested = pool.submit(run_tests, root, root, {"blocklist"})
                assert live.result()[0].ok and tested.result().ok
                side_by_side.append(time.perf_counter() - start)

    emit(
        {
            "rounds": args.rounds,
            "nfctl_test_bpf": {
                "wall_seconds_median": round(statistics.median(cli), 3),
                "cases": library.get("passed"),
                "compile_included_seconds": library.get("seconds"),
                "compile_excluded_seconds": library.get("runSeconds"),
            },
            "test_run": {
                "runs": args.runs,
                "cases_per_second": round(args.runs / raw_seconds),
                "us_per_run": round(raw_seconds / args.runs * 1e6, 2),
            },
            "gate_100_cases": {
                "cases_only_ms": summary_ms(gate_cases),
                "with_test_build_ms": summary_ms(gate_total),
                "baseline_compile_and_verify_ms": summary_ms(baseline),
                "live_and_test_build_in_parallel_ms": summary_ms(side_by_side),
                "target_ms": 50,
            },
            "machine": machine(),
        },
        args.json,
    )


if __name__ == "__main__":
    main()
