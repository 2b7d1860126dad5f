"""Compile + verifier time per library NF, and `nfctl validate bpf/` end to end.

sudo .venv/bin/python -m benchmarks.compile_times --rounds 5 --json
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from benchmarks.common import REPO_ROOT, emit, machine
from nfctl.compiler.client import build_request, prepare, run_worker
from nfctl.manifest.repo import scan_repo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    scan = scan_repo(REPO_ROOT / "bpf", repo_root=REPO_ROOT)
    prepared = [prepare(m, scan.root) for m in scan.manifests]
    per_nf: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.rounds):
        for item in prepared:
            start = time.perf_counter()
            [result] = run_worker([build_request(item)])
            wall = time.perf_counter() - start
            assert result.ok, result.diagnostics
            timings = per_nf.setdefault(item.nf.name, {"compile": [], "load": [], "worker": []})
            timings["compile"].append(result.compile_seconds)
            timings["load"].append(result.load_seconds)
            timings["worker"].append(wall)
    validate = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "nfctl", "validate", str(REPO_ROOT / "bpf")],
            check=True,
            capture_output=True,
            cwd=REPO_ROOT,
        )
        validate.append(time.perf_counter() - start)
    emit(
        {
            "rounds": args.rounds,
            "per_nf_median_seconds": {
                name: {k: round(statistics.median(v), 3) for k, v in t.items()}
                for name, t in sorted(per_nf.items())
            },
            "validate_bpf_median_seconds": round(statistics.median(validate), 3),
            "notes": "compile = BCC/clang incl. kernel headers; load = kernel verifier; "
            "worker = whole sandboxed worker process (Python start, import bcc, both)",
            "machine": machine(),
        },
        args.json,
    )


if __name__ == "__main__":
    main()
