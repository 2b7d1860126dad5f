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


@pytest.mark.kernel
def test_preflight_reports_an_event_and_waits_instead_of_crashing(tmp_path: Path) -> None:
    """`nfctl doctor --preflight` on a node without headers: an Event on the pod says why,
    the process keeps waiting (no crash loop), and it passes once headers appear."""
    from tests.agent_harness import wait_until
    from tests.kube_api import FakeNodeApi

    api = FakeNodeApi(tmp_path / "kube", "node-p", {}).start()
    empty = tmp_path / "empty"
    empty.mkdir()
    fallback = tmp_path / "headers-later"
    modules = Path("/lib/modules") / platform.release()
    script = (
        f"mount --bind {empty} {modules} && mount --bind {empty} /usr/src && "
        f"exec {sys.executable} -m nfctl doctor --preflight --recheck 1 --kube-api {api.url} "
        f"--kube-token-file {api.token_file} --kube-ca-file {api.ca_file}"
    )
    env = {
        **os.environ,
        kernel_headers.FALLBACK_ENV: str(fallback),
        "POD_NAME": "nfctl-agent-x7k2p",
        "POD_NAMESPACE": "nfctl-system",
        "POD_UID": "0d2c6c1e-0000-4000-8000-000000000001",
        "NODE_NAME": "node-p",
    }
    env.pop(kernel_headers.BCC_SOURCE_ENV, None)
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-ec", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO_ROOT,
        env=env,
    )
    try:
        wait_until(lambda: bool(api.events), 180, what="preflight Event")
        event = api.events[0]
        assert event["type"] == "Warning" and event["reason"] == "NodeCannotRunNFs"
        assert event["involvedObject"]["kind"] == "Pod"
        assert event["involvedObject"]["name"] == "nfctl-agent-x7k2p"
        assert "kernel-headers" in event["message"] and "bcc" in event["message"]
        assert proc.poll() is None  # waiting, not exiting (a crash loop)

        # the node gets headers (here: the image's fallback tree, appearing at once)
        os.rename(kernel_headers.make_fallback(tmp_path / "staging"), fallback)
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out[-3000:]
        assert "preflight passed" in out
        assert len(api.events) == 1, api.events  # one Event per reason, not one per recheck
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        api.stop()
