"""Uninstall from one node: remove every program, link, filter and pin nfctl made, and
nothing else.

What is ours is decided from the kernel and our bpffs folder, not only from the agent's
state files (an uninstall Job may run after the state was lost): the programs pinned under
our folder, and the programs named like our dispatchers. A program another tool attached
(XDP on another interface, a tc filter at another priority) is left in place.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nfctl.bpf import syscall
from nfctl.datapath import netlink, tc, xdp
from nfctl.datapath.datapath import Datapath
from nfctl.datapath.dispatcher import is_dispatcher_name
from nfctl.datapath.pins import remove_tree, require_bpffs

BPF_LINK_DETACH = 34


class AgentRunningError(RuntimeError):
    pass


@dataclass
class TeardownReport:
    detached: list[str] = field(default_factory=list)  # "veth0/xdp prog 42 nfctl_xdp"
    links: list[str] = field(default_factory=list)  # pinned bpf_links detached
    unpinned: list[str] = field(default_factory=list)  # bpffs paths removed
    kept: list[str] = field(default_factory=list)  # foreign programs seen and left alone
    state_removed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "detached": self.detached,
            "links": self.links,
            "unpinned": self.unpinned,
            "kept": self.kept,
            "stateRemoved": self.state_removed,
        }


class _LinkDetachAttr(ctypes.Structure):
    _fields_ = [("link_fd", ctypes.c_uint32)]


def _fd_kind(fd: int) -> str:
    """prog | map | link, from the kernel's fdinfo of a bpf fd."""
    try:
        text = Path(f"/proc/self/fdinfo/{fd}").read_text()
    except OSError:
        return "unknown"
    for kind in ("link", "prog", "map"):
        if f"\n{kind}_type:" in text or text.startswith(f"{kind}_type:"):
            return kind
    return "unknown"


def _pins(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(Path(d) / f for d, _, files in os.walk(root) for f in files)


def _scan_pins(root: Path, report: TeardownReport) -> set[int]:
    """Detach every pinned bpf_link (a link lives on while any fd holds it, so it is
    detached rather than only unpinned) and collect the ids of pinned programs."""
    ours: set[int] = set()
    for pin in _pins(root):
        try:
            fd = syscall.obj_get(str(pin))
        except OSError:
            continue
        try:
            kind = _fd_kind(fd)
            if kind == "prog":
                ours.add(syscall.prog_info(fd).prog_id)
            elif kind == "link":
                with contextlib.suppress(OSError):
                    syscall._bpf(BPF_LINK_DETACH, _LinkDetachAttr(link_fd=fd), f"detach link {pin}")
                report.links.append(str(pin))
        finally:
            os.close(fd)
    return ours


def _prog_name(prog_id: int) -> str:
    try:
        with syscall.BpfProgram.from_id(prog_id) as prog:
            return prog.info.name
    except OSError:
        return "?"


def _sweep_interfaces(handle: Any, ours: set[int], report: TeardownReport) -> None:
    """Anything of ours still attached that no state file knew about."""
    for iface in netlink.list_interfaces(handle):
        index, name = iface.index, iface.name
        state = xdp.query(handle, index)
        if state.prog_id:
            prog_name = _prog_name(state.prog_id)
            where = f"{name}/xdp prog {state.prog_id} {prog_name}"
            if state.prog_id in ours or is_dispatcher_name(prog_name):
                xdp.detach(handle, index)
                report.detached.append(where)
            else:
                report.kept.append(where)
        for direction in ("ingress", "egress"):
            for flt in tc.list_filters(handle, index, direction):
                where = f"{name}/tc-{direction} prio {flt.prio} prog {flt.prog_id} {flt.name}"
                if flt.prog_id in ours or is_dispatcher_name(flt.name):
                    tc.delete_filter(handle, index, direction, flt.prio, flt.handle)
                    report.detached.append(where)
                else:
                    report.kept.append(where)


def teardown(
    bpffs_root: Path,
    state_dir: Path,
    netns: str | None = None,
    purge_state: bool = False,
    force: bool = False,
) -> TeardownReport:
    from nfctl.agent.store import AgentLockedError, StateStore

    require_bpffs(bpffs_root)  # else nothing pinned is visible: a silent partial teardown
    report = TeardownReport()
    store = StateStore(state_dir) if state_dir.is_dir() else None
    if store is not None:
        try:
            store.lock()  # an agent running now would put everything back
        except AgentLockedError as exc:
            if not force:
                raise AgentRunningError(f"{exc}: stop it first (or --force)") from None
    try:
        ours = _scan_pins(bpffs_root, report)
        pins = [str(p) for p in _pins(bpffs_root)]
        datapath = Datapath(bpffs_root, state_dir, netns=netns)
        try:
            tracked = datapath.tracked_interfaces()
            # the precise path first: tracked chains, and the clsact qdiscs we added
            datapath.teardown()
            report.detached += [f"{i}/{h}" for i, e in tracked.items() for h in e.get("hooks", [])]
            _sweep_interfaces(datapath.ipr, ours, report)  # whatever no state file knew
        finally:
            datapath.close()
        remove_tree(bpffs_root)
        report.unpinned = [p for p in pins if not os.path.lexists(p)]
    finally:
        if store is not None:
            store.unlock()
    if purge_state and state_dir.is_dir():
        # its contents, then the folder if we may: in a pod it is a hostPath mount point
        for entry in state_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        with contextlib.suppress(OSError):
            state_dir.rmdir()
        report.state_removed = True
    return report
