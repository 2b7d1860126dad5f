"""What the NF isolation check costs per build: the same NF built by this tree's compile
worker and by a baseline Git ref's worker (before the check), alternating, in one run.

Builds install into a throwaway bpffs folder, as the agent does (pins checked too).

sudo .venv/bin/python -m benchmarks.isolation_cost --rounds 5 --baseline-ref main --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, emit, machine
from nfctl.compiler.client import PreparedNF, build_request, prepare
from nfctl.compiler.codegen import BuildPins
from nfctl.datapath.pins import BpffsPaths, remove_tree
from nfctl.manifest.repo import scan_repo


def export_ref(ref: str, into: Path) -> None:
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", ref, "nfctl"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)


def one_build(code_root: Path, prepared: PreparedNF) -> dict[str, Any]:
    paths = BpffsPaths(Path("/sys/fs/bpf") / f"nfctl-bench-iso-{uuid.uuid4().hex[:8]}")
    nf = prepared.nf.name
    os.makedirs(paths.kind_dir("xdp"))
    pins = BuildPins(
        maps_dir=str(paths.maps_dir(nf)),
        chain_path=str(paths.chain("xdp")),
        cursor_path=str(paths.cursor("xdp")),
    )
    request = build_request(
        prepared, install=True, pins=pins, prog_pin_path=str(paths.prog_pin(nf, "b" * 32))
    )
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    try:
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "nfctl.compiler.worker"],
            input=json.dumps([request.to_json()]),
            capture_output=True,
            text=True,
            check=True,
            cwd=code_root,
            env=env,
        )
        wall = time.perf_counter() - start
    finally:
        remove_tree(paths.root)
    [result] = json.loads(done.stdout)
    assert result["ok"], result["diagnostics"]
    return {
        "compile": result["compile_seconds"],
        "load": result["load_seconds"],
        "check": result.get("check_seconds", 0.0),
        "worker": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline-ref", default="main")
    parser.add_argument("--nf", default="blocklist")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    scan = scan_repo(REPO_ROOT / "bpf" / args.nf, repo_root=REPO_ROOT)
    prepared = prepare(scan.manifests[0], scan.root)
    with tempfile.TemporaryDirectory() as tmp:
        baseline_root = Path(tmp)
        export_ref(args.baseline_ref, baseline_root)
        runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "isolated": []}
        for _ in range(args.rounds):
            runs["baseline"].append(one_build(baseline_root, prepared))
            runs["isolated"].append(one_build(REPO_ROOT, prepared))
    medians = {
        label: {k: round(statistics.median(r[k] for r in rs), 4) for k in rs[0]}
        for label, rs in runs.items()
    }
    emit(
        {
            "nf": args.nf,
            "rounds": args.rounds,
            "baseline_ref": args.baseline_ref,
            "median_seconds": medians,
            "worker_delta_seconds": round(
                medians["isolated"]["worker"] - medians["baseline"]["worker"], 4
            ),
            "notes": "compile = BCC/clang; load = verifier load of the wrapped NF; check = "
            "loading the author's function alone + reading map ids/instructions + pin "
            "comparison; worker = whole worker process",
            "machine": machine(),
        },
        args.json,
    )


if __name__ == "__main__":
    main()
