"""`nfctl doctor` and the kernel header linking it relies on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nfctl import kernel_headers

REPO_ROOT = Path(__file__).resolve().parents[1]


def _headers(root: Path, name: str) -> None:
    (root / name / "include" / "linux").mkdir(parents=True)


def test_nearest_headers_prefers_exact_then_closest_not_newer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernel_headers.platform, "machine", lambda: "x86_64")
    for version in ("5.10.0-30", "6.1.0-56", "6.12.0-1"):
        _headers(tmp_path, f"linux-headers-{version}-amd64")
    assert (
        kernel_headers.nearest_headers("6.18.44-cloud", tmp_path).name
        == "linux-headers-6.12.0-1-amd64"
    )
    assert (
        kernel_headers.nearest_headers("6.2.0-custom", tmp_path).name
        == "linux-headers-6.1.0-56-amd64"
    )
    _headers(tmp_path, "linux-headers-6.2.0-custom")
    assert (
        kernel_headers.nearest_headers("6.2.0-custom", tmp_path).name
        == "linux-headers-6.2.0-custom"
    )
    assert kernel_headers.nearest_headers("6.2.0", tmp_path / "empty") is None


@pytest.mark.kernel
def test_doctor_passes_here_and_reports_json() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "nfctl", "doctor", "-o", "json"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=180,
    )
    report = json.loads(proc.stdout)
    names = {c["name"]: c for c in report["checks"]}
    assert set(names) == {
        "capabilities",
        "bpf-syscall",
        "bpffs",
        "btf",
        "kernel-headers",
        "bcc",
        "xdp-tc",
        "bpf-links",
        "shadowing",
    }
    assert proc.returncode == 0 and report["ok"], [c for c in report["checks"] if not c["ok"]]
    assert "XDP attach works" in names["xdp-tc"]["message"]
    assert "TCX and XDP links" in names["bpf-links"]["message"]  # Linux 6.18 here
