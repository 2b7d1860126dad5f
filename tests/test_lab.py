"""`nfctl lab demo` end to end (the same command `sudo make demo` runs), then `lab down`
leaves nothing behind, also after a crash."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from nfctl.lab.topology import leftover_namespaces

REPO_ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.kernel, pytest.mark.e2e]


def nfctl(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nfctl", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )


def leftovers(tag: str) -> list[str]:
    found = [f"netns {n}" for n in leftover_namespaces(tag)]
    found += [f"pins {p}" for p in Path("/sys/fs/bpf").glob(f"nfctl-lab-{tag}-*")]
    if Path(f"/var/lib/nfctl-lab/{tag}").exists():
        found.append("workspace")
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    if f"nfl-{tag}" in links:
        found.append("host link")
    procs = subprocess.run(
        ["pgrep", "-f", f"nfctl-lab/{tag}/"], capture_output=True, text=True
    ).stdout
    if procs.strip():
        found.append(f"processes {procs.split()}")
    return found


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_lab_demo_tells_the_whole_story() -> None:
    tag = "t" + uuid.uuid4().hex[:5]
    try:
        proc = nfctl("lab", "demo", "--tag", tag, "--subnet", "98", "--nodes", "3")
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output[-6000:]
        for step in (
            "Deploy the NF library on every node",
            "Block a source with a commit, enforced live",
            "Roll out a new program version under traffic",
            "A broken commit is refused; the last good version stays",
            "git revert restores",
            "Fleet status from the controller",
        ):
            assert step in output
        assert output.count("PASS") >= 12 and "FAIL" not in output
        assert ", 0 lost" in output
        status = nfctl("lab", "status", "--tag", tag, timeout=60)
        assert status.returncode == 0 and "node3" in status.stdout
    finally:
        nfctl("lab", "down", "--tag", tag, timeout=120)
    assert leftovers(tag) == []


def test_lab_down_cleans_up_after_a_crash() -> None:
    tag = "c" + uuid.uuid4().hex[:5]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nfctl",
            "lab",
            "up",
            "--tag",
            tag,
            "--subnet",
            "97",
            "--nodes",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO_ROOT,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "waiting for every node" in line:
                break
        os.killpg(proc.pid, signal.SIGKILL)  # crash in the middle of `lab up`
        proc.wait(timeout=30)
        assert leftovers(tag), "the crash should have left something to clean"
    finally:
        result = nfctl("lab", "down", "--tag", tag, timeout=120)
    assert result.returncode == 0
    assert leftovers(tag) == []
