"""The image's fallback kernel headers: a real BCC compile on a node whose /lib/modules and
/usr/src hold no headers (hidden in a private mount namespace), with and without them."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nfctl import kernel_headers

REPO_ROOT = Path(__file__).resolve().parents[1]


def _doctor_without_host_headers(tmp_path: Path, fallback: Path) -> dict[str, dict[str, object]]:
    empty = tmp_path / "empty"
    empty.mkdir(exist_ok=True)
    modules = Path("/lib/modules") / platform.release()
    script = (
        f"mount --bind {empty} {modules} && mount --bind {empty} /usr/src && "
        f"exec {sys.executable} -m nfctl doctor -o json"
    )
    env = {**os.environ, kernel_headers.FALLBACK_ENV: str(fallback)}
    env.pop(kernel_headers.BCC_SOURCE_ENV, None)
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-ec", script],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=300,
    )
    report = json.loads(proc.stdout)
    return {str(c["name"]): c for c in report["checks"]}


@pytest.mark.kernel
def test_compile_uses_fallback_headers_when_the_host_has_none(tmp_path: Path) -> None:
    if shutil.which("unshare") is None or not (Path("/lib/modules") / platform.release()).is_dir():
        pytest.fail("needs unshare(1) and /lib/modules/$(uname -r) to hide")
    fallback = kernel_headers.make_fallback(tmp_path / "headers")
    assert (fallback / "include" / "linux" / "bpf.h").is_file()
    assert [p.name for p in (fallback / "arch").iterdir()] == [
        {"x86_64": "x86", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    ]

    # negative control: no host headers and no fallback -> BCC cannot compile
    without = _doctor_without_host_headers(tmp_path, tmp_path / "no-such-fallback")
    assert not without["kernel-headers"]["ok"]
    assert not without["bcc"]["ok"]

    with_fallback = _doctor_without_host_headers(tmp_path, fallback)
    headers = with_fallback["kernel-headers"]
    assert headers["ok"], headers
    assert "fallback headers" in str(headers["message"]) and str(fallback) in str(
        headers["message"]
    )
    assert with_fallback["bcc"]["ok"], with_fallback["bcc"]
    assert "compiled and loaded XDP and TC" in str(with_fallback["bcc"]["message"])
