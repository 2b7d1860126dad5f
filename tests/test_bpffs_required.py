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


@pytest.mark.kernel
def test_agent_and_teardown_refuse_a_pin_root_outside_bpffs(tmp_path: Path) -> None:
    netns = unique_name("nfbpffs")
    root = Path("/sys/fs/bpf") / unique_name("nfctl-nobpffs-")
    repo = GitRepo(tmp_path / "repo")
    repo.add_library_nf("counter")
    repo.commit("counter")
    run("ip", "netns", "add", netns)
    try:
        # `ip netns exec` mounts a fresh /sys in a mount namespace of its own: no bpffs
        prefix = ["ip", "netns", "exec", netns]
        agent = subprocess.run(
            [
                *prefix,
                *NFCTL,
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
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO_ROOT,
            check=False,
        )
        message = " ".join(agent.stderr.split())
        assert agent.returncode == 2, agent.stdout + agent.stderr
        assert f"{root} is not on a bpffs mount (its filesystem: sysfs)" in message, message
        assert "mount -t bpf bpf /sys/fs/bpf" in message and "nsenter --net=" in message
        assert not root.exists(), "nothing was pinned"
        assert not (tmp_path / "state" / "status.json").exists(), "no pass was run"

        teardown = subprocess.run(
            [*prefix, *NFCTL, "teardown", "--bpffs-dir", str(root), "--state-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO_ROOT,
            check=False,
        )
        assert teardown.returncode == 2, teardown.stdout + teardown.stderr
        assert "is not on a bpffs mount" in " ".join(teardown.stderr.split())
    finally:
        delete_netns(netns)
