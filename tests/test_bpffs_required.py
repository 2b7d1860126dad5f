"""Without bpffs at its pin root the agent and teardown refuse to start, saying why and
how to fix it: run under `ip netns exec` (which mounts a /sys without bpffs), the agent
used to start, fail every pass with a FileNotFoundError and log three warnings a second."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from nfctl.datapath.pins import pin_root_fs
from nfctl.netns import delete_netns, run, unique_name
from tests.agent_harness import NFCTL, REPO_ROOT, GitRepo


@pytest.mark.kernel
def test_pin_root_fs_asks_the_kernel_for_the_nearest_existing_folder(tmp_path: Path) -> None:
    assert pin_root_fs(Path("/sys/fs/bpf")) == "bpf"
    assert pin_root_fs(Path("/sys/fs/bpf") / unique_name("not-made-") / "xdp") == "bpf"
    assert pin_root_fs(Path("/sys/kernel")) == "sysfs"
    assert pin_root_fs(Path("/proc/self")) == "proc"
    assert pin_root_fs(tmp_path / "a" / "b") != "bpf"
    assert not (tmp_path / "a").exists()


def nfctl_under_ip_netns_exec(netns: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`ip netns exec` mounts a fresh /sys in a mount namespace of its own: no bpffs."""
    return subprocess.run(
        ["ip", "netns", "exec", netns, *NFCTL, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        check=False,
    )


@pytest.mark.kernel
def test_agent_and_teardown_refuse_a_pin_root_outside_bpffs(tmp_path: Path) -> None:
    netns = unique_name("nfbpffs")
    root = Path("/sys/fs/bpf") / unique_name("nfctl-nobpffs-")
    repo = GitRepo(tmp_path / "repo")
    repo.add_library_nf("counter")
    repo.commit("counter")
    run("ip", "netns", "add", netns)
    try:
        agent = nfctl_under_ip_netns_exec(
            netns,
            "agent",
            "--once",
            "--repo",
            f"file://{repo.path}",
            "--node",
            "n1",
            "--state-dir",
            str(tmp_path / "state"),
            "--bpffs-dir",
            str(root),
        )
        message = " ".join(agent.stderr.split())
        assert agent.returncode == 2, agent.stdout + agent.stderr
        assert f"{root} is not on a bpffs mount (its filesystem: sysfs)" in message, message
        assert "mount -t bpf bpf /sys/fs/bpf" in message and "nsenter --net=" in message
        assert not root.exists(), "nothing was pinned"
        assert not (tmp_path / "state" / "status.json").exists(), "no pass was run"

        teardown = nfctl_under_ip_netns_exec(
            netns, "teardown", "--bpffs-dir", str(root), "--state-dir", str(tmp_path)
        )
        assert teardown.returncode == 2, teardown.stdout + teardown.stderr
        assert "is not on a bpffs mount" in " ".join(teardown.stderr.split())
    finally:
        delete_netns(netns)
