"""Progress for long work, seen the way a person sees it: through a pseudo-terminal, line by
line while the command still runs; and -o json on stdout stays pure JSON."""

from __future__ import annotations

import json
import os
import pty
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
NFCTL = str(Path(sys.executable).parent / "nfctl")
LIBRARY = REPO_ROOT / "bpf"
LIBRARY_NFS = sorted(p.name for p in LIBRARY.iterdir() if (p / "nf.yaml").exists())


def run_on_terminal(
    args: list[str], stream: str, timeout: float
) -> tuple[list[tuple[float, str]], float, subprocess.CompletedProcess[str]]:
    """Run nfctl with `stream` ("stdout" or "stderr") on a pseudo-terminal and the other one on
    a pipe. Returns each terminal line with the moment it was read, the moment the process
    ended, and the process (its piped stream captured)."""
    master, slave = pty.openpty()
    piped = subprocess.PIPE
    proc = subprocess.Popen(
        [NFCTL, *args],
        stdout=slave if stream == "stdout" else piped,
        stderr=slave if stream == "stderr" else piped,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "COLUMNS": "200", "TERM": "dumb"},
    )
    os.close(slave)
    lines: list[tuple[float, str]] = []
    buffer = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not chunk:
            break
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        now = time.monotonic()
        lines += [(now, line.decode(errors="replace").rstrip("\r")) for line in complete]
    os.close(master)
    try:
        piped_out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        proc.kill()
    ended = time.monotonic()
    assert proc.returncode is not None
    done = subprocess.CompletedProcess(proc.args, proc.returncode, piped_out or "", "")
    return lines, ended, done


def first(lines: list[tuple[float, str]], text: str) -> float:
    found = [at for at, line in lines if text in line]
    assert found, f"no line with {text!r} in:\n" + "\n".join(line for _, line in lines)
    return found[0]


@pytest.mark.kernel
def test_validate_reports_each_nf_on_a_terminal_while_json_stays_pure() -> None:
    lines, ended, proc = run_on_terminal(["validate", str(LIBRARY), "-o", "json"], "stderr", 300)
    assert proc.returncode == 0, lines
    report = json.loads(proc.stdout)  # stdout holds the JSON document and nothing else
    assert sorted(f["name"] for f in report["functions"]) == LIBRARY_NFS
    compiling = first(lines, f"compiling {len(LIBRARY_NFS)} NF(s)")
    # the compile takes seconds: the line was on screen well before the command ended
    assert ended - compiling > 0.5, (ended - compiling, lines)
    for position, name in enumerate(LIBRARY_NFS, start=1):
        assert first(lines, f"{name}: built") <= first(lines, f"[{position}/{len(LIBRARY_NFS)}]")
        assert first(lines, f"] {name}: valid") <= ended

    # without a terminal (CI logs) nothing extra is printed, and the JSON is the same
    quiet = subprocess.run(
        [NFCTL, "validate", str(LIBRARY), "-o", "json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert quiet.returncode == 0 and quiet.stderr == ""
    again = json.loads(quiet.stdout)
    assert [(f["name"], f["buildHash"]) for f in again["functions"]] == [
        (f["name"], f["buildHash"]) for f in report["functions"]
    ]


def test_progress_flag_without_a_terminal_and_no_progress_on_one(tmp_path: Path) -> None:
    nf = tmp_path / "nfs" / "broken"
    nf.mkdir(parents=True)
    (nf / "nf.yaml").write_text("apiVersion: nfctl.io/v1alpha1\nkind: NetworkFunction\n")
    forced = subprocess.run(
        [NFCTL, "validate", str(tmp_path / "nfs"), "--no-compile", "--progress", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert forced.returncode == 1
    assert json.loads(forced.stdout)["ok"] is False
    assert "found 1 manifest(s)" in forced.stderr
    assert "[1/1] broken/nf.yaml: invalid" in forced.stderr
    lines, _, silenced = run_on_terminal(
        ["validate", str(tmp_path / "nfs"), "--no-compile", "--no-progress", "-o", "json"],
        "stderr",
        60,
    )
    assert silenced.returncode == 1 and lines == []


@pytest.mark.kernel
def test_nf_tests_report_compiles_and_suites_on_a_terminal() -> None:
    lines, ended, proc = run_on_terminal(["test", str(LIBRARY), "-o", "json"], "stderr", 300)
    assert proc.returncode == 0, lines
    report = json.loads(proc.stdout)
    assert report["ok"] is True
    assert ended - first(lines, f"compiling {len(LIBRARY_NFS)} NF(s)") > 0.5
    for name in LIBRARY_NFS:
        cases = sum(1 for c in report["cases"] if c["nf"] == name)
        assert first(lines, f"{name}: running {cases} case(s)") <= ended


@pytest.mark.kernel
def test_lab_up_shows_each_step_as_it_happens_and_status_speaks_json_and_yaml() -> None:
    tag = "ux2" + uuid.uuid4().hex[:4]
    subnet = str(random.randint(200, 250))
    try:
        lines, ended, proc = run_on_terminal(
            ["lab", "up", "--nodes", "2", "--tag", tag, "--subnet", subnet], "stdout", 400
        )
        assert proc.returncode == 0, "\n".join(line for _, line in lines)
        nodes = ["node1", "node2"]
        certificates = first(lines, "issuing certificates")
        # the first step was shown long before the lab was ready
        assert ended - certificates > 2.0, lines
        assert certificates < first(lines, "controller listening")
        steps = [first(lines, f"agent started on {n}") for n in nodes]
        waiting = first(lines, "waiting for every node")
        arrivals = [first(lines, f"lab {n} applied") for n in nodes]
        assert max(steps) <= waiting <= min(arrivals)

        status = {
            fmt: subprocess.run(
                [NFCTL, "lab", "status", "--tag", tag, "-o", fmt],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            for fmt in ("json", "yaml")
        }
        as_json = json.loads(status["json"].stdout)
        as_yaml = yaml.safe_load(status["yaml"].stdout)
        for data, proc_fmt in ((as_json, status["json"]), (as_yaml, status["yaml"])):
            assert proc_fmt.returncode == 0, proc_fmt.stderr
            assert sorted(n["status"]["node"] for n in data["nodes"]) == nodes
            assert all(n["connected"] for n in data["nodes"])
            assert {f["name"] for f in data["functions"]} >= {"counter"}
            assert data["lab"]["controller"].endswith(":9443")
    finally:
        subprocess.run(
            [NFCTL, "lab", "down", "--tag", tag], capture_output=True, timeout=180, check=False
        )
    assert not Path(f"/var/lib/nfctl-lab/{tag}").exists()
