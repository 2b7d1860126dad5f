"""Which programs on this machine's hooks can end processing before nfctl's chain, read
from the kernel alone (no agent state): what `nfctl doctor` explains."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nfctl.datapath import dispatcher as disp
from nfctl.datapath import hooklinks, netlink, tc, xdp
from nfctl.datapath.observe import AttachPointState, ProgramRef, program_ref, shadowing
from nfctl.manifest.model import Hook


@dataclass(frozen=True)
class Finding:
    ifname: str
    hook: Hook
    ours_attached: bool  # an nfctl dispatcher sits on this hook
    shadowed_by: tuple[ProgramRef, ...]

    def describe(self) -> str:
        names = ", ".join(f"{p.name} (id {p.prog_id})" for p in self.shadowed_by)
        if self.hook is Hook.XDP:
            return f"{self.ifname}/xdp is held by {names}: XDP runs one program per interface"
        if self.ours_attached:
            return (
                f"{self.ifname}/{self.hook.value}: {names} run(s) before nfctl's chain; a "
                "TCX program returning pass (TC_ACT_OK) ends TC processing and our chain "
                "never sees the packet"
            )
        return f"{self.ifname}/{self.hook.value}: TCX program(s) {names} already attached"


def scan(handle: Any, netns: str | None = None) -> list[Finding]:
    """Every hook of every interface in handle's namespace (netns: its name, None for
    ours) that has another tool's program which runs first (or, with no nfctl chain
    there, at all)."""
    found = []
    for iface in netlink.list_interfaces(handle):
        for hook in (Hook.XDP, Hook.TC_INGRESS, Hook.TC_EGRESS):
            state = _state(handle, netns, iface.name, iface.index, hook)
            if state is None:
                continue
            ours_id = state.hook_prog.prog_id if state.ours and state.hook_prog else 0
            refs = shadowing(state, ours_id) if ours_id else _foreign(state)
            if refs:
                found.append(Finding(iface.name, hook, bool(ours_id), tuple(refs)))
    return found


def _state(
    handle: Any, netns: str | None, ifname: str, ifindex: int, hook: Hook
) -> AttachPointState | None:
    state = AttachPointState(ifname=ifname, ifindex=ifindex, hook=hook, hook_prog=None, ours=False)
    if hook is Hook.XDP:
        prog_id = xdp.query(handle, ifindex).prog_id
        if not prog_id:
            return None
        state.hook_prog = program_ref(prog_id, {})
        state.ours = disp.is_dispatcher_name(state.hook_prog.name)
        return state
    state.tcx = [
        ProgramRef(i, name, "") for i, name in hooklinks.tcx_programs(netns, ifindex, hook)
    ]
    mine = [p for p in state.tcx if disp.is_dispatcher_name(p.name)]
    legacy = [
        f
        for f in tc.list_filters(handle, ifindex, hooklinks.TCX_DIRECTION[hook])
        if disp.is_dispatcher_name(f.name)
    ]
    if mine:
        state.attach, state.hook_prog, state.ours = "tcx", mine[0], True
    elif legacy:
        ref = ProgramRef(legacy[0].prog_id, legacy[0].name, legacy[0].tag)
        state.attach, state.hook_prog, state.ours = "tc", ref, True
    elif not state.tcx:
        return None
    return state


def _foreign(state: AttachPointState) -> list[ProgramRef]:
    if state.hook is Hook.XDP:
        return [state.hook_prog] if state.hook_prog else []
    return list(state.tcx)
