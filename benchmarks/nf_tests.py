"""What NF tests cost: `nfctl test bpf/` end to end, cases per second through
BPF_PROG_TEST_RUN, and what the agent's test gate adds for an NF with 100 cases.

sudo .venv/bin/python -m benchmarks.nf_tests --rounds 3 --json

The gate runs the cases on a private copy of the live build (its bytecode loaded again with
fresh maps by the compile worker: tests never touch live maps), so it adds the copy's
load + verify and the running of the cases to commit -> attached, not a compile. Measured
against the baseline in the same run: the same agent load of a new build with the gate off.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import REPO_ROOT, emit, machine, summary_ms
from nfctl.builder.builder import Builder
from nfctl.compiler.client import PreparedNF, prepare
from nfctl.datapath.datapath import Datapath
from nfctl.datapath.pins import remove_tree
from nfctl.doctor import BPFFS
from nfctl.manifest.repo import scan_repo
from nfctl.nftest import kernel
from nfctl.nftest.build import load_for_tests, scratch_pin
from nfctl.nftest.gate import gate_problems, prepare_cases


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


def _version(folder: Path, round_no: int, arm: str) -> PreparedNF:
    """A new build each time (a comment in the source), as a commit brings one."""
    source = folder / "blocklist.c"
    text = source.read_text().split("\n// round ")[0]
    source.write_text(f"{text}\n// round {round_no} {arm}\n")
    return prepare(scan_repo(folder.parent, repo_root=folder.parent).manifests[0], folder.parent)


def measure_gate(rounds: int) -> dict[str, Any]:
    """Per round, two new builds of the blocklist with 100 cases: one loaded with the gate
    off (baseline), one with the gate on, as the agent runs it (cases parsed and packets
    built beside the compile, the worker pins the private copy, the cases run on it).
    Added = the copy's load in the worker + everything after the load returned (waiting
    for the cases prepared ahead, then the gate); the end-to-end medians of both arms are
    reported too (compile noise dominates them)."""
    added: list[float] = []
    copy_load: list[float] = []
    gate_wall: list[float] = []
    waited: list[float] = []  # for the cases prepared ahead, after the load returned
    off: list[float] = []
    on: list[float] = []
    first_gate_s = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "repo"
        folder = root / "blocklist"
        shutil.copytree(REPO_ROOT / "bpf" / "blocklist", folder)
        (folder / "tests.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "nfctl.io/v1alpha1",
                    "kind": "NetworkFunctionTests",
                    "cases": hundred_cases(),
                }
            )
        )
        bpffs_root = BPFFS / f"nfctl-bench-nftests-{uuid.uuid4().hex[:8]}"
        datapath = Datapath(bpffs_root, Path(tmp) / "state")
        try:
            for round_no in range(rounds + 1):  # round 0 warms up (imports scapy once)
                prepared = _version(folder, round_no, "off")
                start = time.perf_counter()
                Builder(datapath).build(prepared)
                off_s = time.perf_counter() - start

                prepared = _version(folder, round_no, "on")
                start = time.perf_counter()
                # as the agent does: cases parsed and packets built while the worker compiles
                ahead = threading.Thread(target=prepare_cases, args=(prepared, root))
                ahead.start()
                loaded = Builder(datapath).build(prepared, test_pin=scratch_pin("blocklist"))
                loaded_at = time.perf_counter()
                ahead.join()
                gate_start = time.perf_counter()
                problems = gate_problems(prepared, root, root, loaded.test_pin, loaded.record.maps)
                end = time.perf_counter()
                assert loaded.test_pin is not None and not loaded.test_copy_error
                assert not problems, problems[:3]
                assert not loaded.test_pin.parent.exists()
                if round_no == 0:
                    first_gate_s = end - gate_start
                    continue
                off.append(off_s)
                on.append(end - start)
                copy_s = loaded.test_copy_seconds
                copy_load.append(copy_s)
                waited.append(gate_start - loaded_at)
                gate_wall.append(end - gate_start)
                added.append(copy_s + end - loaded_at)
        finally:
            datapath.teardown()
            remove_tree(bpffs_root)
    return {
        "cases": 100,
        "added_ms": summary_ms(added),
        "of_which_copy_load_in_worker_ms": summary_ms(copy_load),
        "of_which_waiting_for_cases_prepared_ahead_ms": summary_ms(waited),
        "of_which_gate_in_agent_ms": summary_ms(gate_wall),
        "first_gate_after_start_ms": round(first_gate_s * 1000, 1),
        "commit_to_loaded_gate_off_ms": summary_ms(off),
        "commit_to_loaded_gate_on_ms": summary_ms(on),
        "target_ms": 50,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="gate rounds (2 builds each)")
    parser.add_argument("--cli-rounds", type=int, default=1, help="`nfctl test bpf/` runs")
    parser.add_argument("--runs", type=int, default=10000, help="raw test runs for cases/s")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    # 1. nfctl test bpf/ as a user's CI runs it (new process: Python, scapy, compile, cases)
    cli: list[float] = []
    library: dict[str, Any] = {}
    for _ in range(args.cli_rounds):
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

    # 3. what the gate adds to commit -> attached for 100 cases: the agent's load of a new
    # build (compile, verify, pin) then the gate, against the same load with the gate off
    gate = measure_gate(args.rounds)
    emit(
        {
            "rounds": args.rounds,
            "cli_rounds": args.cli_rounds,
            "nfctl_test_bpf": {
                "wall_seconds_median": round(statistics.median(cli), 3) if cli else None,
                "cases": library.get("passed"),
                "compile_included_seconds": library.get("seconds"),
                "compile_excluded_seconds": library.get("runSeconds"),
            },
            "test_run": {
                "runs": args.runs,
                "cases_per_second": round(args.runs / raw_seconds),
                "us_per_run": round(raw_seconds / args.runs * 1e6, 2),
            },
            "gate_100_cases": gate,
            "machine": machine(),
        },
        args.json,
    )


if __name__ == "__main__":
    main()
