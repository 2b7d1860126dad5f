"""What the kernel has right now, per attach point, and how it differs from what we
want (drift). Read-only: correcting drift is the agent's decision."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nfctl.bpf.syscall import BpfError, BpfProgram
from nfctl.datapath import dispatcher as disp
from nfctl.datapath import hooklinks, netlink, xdp
from nfctl.datapath.chain import ChainTable
from nfctl.datapath.pins import BpffsPaths
from nfctl.manifest.model import Hook


@dataclass(frozen=True)
class ProgramRef:
    prog_id: int
    name: str
    tag: str
    nf: str | None = None  # known when the program is one of our pinned NF versions
    build_prefix: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "progId": self.prog_id,
            "name": self.name,
            "tag": self.tag,
            "nf": self.nf,
            "build": self.build_prefix,
        }


@dataclass
class AttachPointState:
    ifname: str
    ifindex: int | None
    hook: Hook
    hook_prog: ProgramRef | None  # what sits on the hook (ideally our dispatcher)
    ours: bool  # the hook holds our current dispatcher
    chain: list[ProgramRef] = field(default_factory=list)
    head: int | None = None  # the chain's range base (from the heads hash), None: no chain
    xdp_mode: str | None = None
    drift: list[str] = field(default_factory=list)
    attach: str | None = None  # tcx | xdp-link (pinned bpf_link) | tc | netlink
    link_id: int | None = None
    tcx: list[ProgramRef] = field(default_factory=list)  # every TCX program, in run order
    shadowed_by: list[ProgramRef] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "interface": self.ifname,
            "ifindex": self.ifindex,
            "hook": self.hook.value,
            "hookProgram": self.hook_prog.to_dict() if self.hook_prog else None,
            "ours": self.ours,
            "xdpMode": self.xdp_mode,
            "attach": self.attach,
            "linkId": self.link_id,
            "tcxOrder": [p.to_dict() for p in self.tcx],
            "shadowedBy": [p.to_dict() for p in self.shadowed_by],
            "chain": [p.to_dict() for p in self.chain],
            "drift": self.drift,
        }


def pinned_programs(paths: BpffsPaths) -> dict[int, ProgramRef]:
    """prog id -> our pinned NF program versions."""
    out: dict[int, ProgramRef] = {}
    for nf in paths.pinned_nfs():
        for pin in paths.pinned_progs(nf):
            try:
                with BpfProgram.from_pin(str(pin)) as prog:
                    out[prog.info.prog_id] = ProgramRef(
                        prog.info.prog_id, prog.info.name, prog.info.tag, nf, pin.name
                    )
            except OSError:
                continue
    return out


def program_ref(prog_id: int, known: dict[int, ProgramRef]) -> ProgramRef:
    if prog_id in known:
        return known[prog_id]
    try:
        with BpfProgram.from_id(prog_id) as prog:
            return ProgramRef(prog_id, prog.info.name, prog.info.tag)
    except BpfError:
        return ProgramRef(prog_id, "?", "")


def observe_attach_point(
    handle: Any,
    paths: BpffsPaths,
    table: ChainTable | None,
    dispatcher_id: int | None,
    ifname: str,
    ifindex: int | None,
    hook: Hook,
    known: dict[int, ProgramRef],
    tc_settings: disp.TcSettings,
    desired: list[str] | None = None,
    netns: str | None = None,
) -> AttachPointState:
    """desired: the NF names expected on this attach point, in order (None: not checked)."""
    state = AttachPointState(ifname=ifname, ifindex=ifindex, hook=hook, hook_prog=None, ours=False)
    if ifindex is None:
        if desired:
            state.drift.append(f"interface {ifname} is gone")
        return state
    link_id, linked = hooklinks.linked_prog_id(paths, hook, ifindex)
    legacy_id = disp.attached_prog_id(handle, ifindex, hook, tc_settings)
    prog_id = linked or legacy_id
    if link_id:
        state.attach, state.link_id = ("xdp-link" if hook is Hook.XDP else "tcx"), link_id
    elif prog_id:
        state.attach = "netlink" if hook is Hook.XDP else "tc"
    if hook is Hook.XDP and prog_id:
        state.xdp_mode = xdp.query(handle, ifindex).mode
    if prog_id:
        state.hook_prog = program_ref(prog_id, known)
        state.ours = prog_id == dispatcher_id
    if hook is not Hook.XDP:
        state.tcx = [program_ref(i, known) for i, _ in hooklinks.tcx_programs(netns, ifindex, hook)]
    state.shadowed_by = shadowing(state, dispatcher_id)
    if table is not None:
        state.head = table.head(ifindex, hook)
        ids = table.slot_prog_ids(state.head) if state.head is not None else []
        state.chain = [program_ref(i, known) for i in ids]
    if desired is None:
        return state
    if desired:
        if not prog_id:
            state.drift.append(f"nothing attached at {hook.value} (our program was removed)")
        elif not state.ours:
            name = state.hook_prog.name if state.hook_prog else "?"
            if disp.is_dispatcher_name(name):
                state.drift.append(f"an outdated nfctl dispatcher (id {prog_id}) is attached")
            else:
                state.drift.append(
                    f"another program {name!r} (id {prog_id}) replaced ours at {hook.value}"
                )
        actual = [p.nf or f"{p.name}#{p.prog_id}" for p in state.chain]
        if actual != desired:
            state.drift.append(f"chain is {actual or 'empty'}, expected {desired}")
        for ref in state.chain:
            if ref.nf is None:
                state.drift.append(f"chain holds unpinned program {ref.name} (id {ref.prog_id})")
    else:
        if state.ours:
            state.drift.append(f"our dispatcher is attached at {hook.value} but no NF should be")
    return state


def shadowing(state: AttachPointState, dispatcher_id: int | None) -> list[ProgramRef]:
    """Other tools' programs that can end processing before our chain runs: TCX programs
    ahead of our TCX link, any TCX program when we sit behind TCX as a cls_bpf filter
    (TCX runs first and its "pass" ends TC processing), or another XDP program holding
    the hook (XDP runs one program per interface)."""
    if dispatcher_id is None:
        return []
    if state.hook is Hook.XDP:
        prog = state.hook_prog
        if prog is not None and not disp.is_dispatcher_name(prog.name):
            return [prog]
        return []
    foreign = [p for p in state.tcx if not disp.is_dispatcher_name(p.name)]
    if state.attach == "tcx":
        ahead = []
        for ref in state.tcx:
            if ref.prog_id == dispatcher_id or disp.is_dispatcher_name(ref.name):
                break
            ahead.append(ref)
        return ahead
    if state.attach == "tc":
        return foreign
    return []


def observe_points(
    handle: Any,
    paths: BpffsPaths,
    tracked: set[tuple[str, Hook]],
    desired: dict[tuple[str, Hook], list[str]] | None,
    table: Callable[[Hook], ChainTable | None],
    dispatcher_id: Callable[[Hook], int],
    tc_settings: disp.TcSettings,
    netns: str | None,
) -> list[AttachPointState]:
    """Every tracked or desired attach point, in (interface, hook) order. desired: NF
    names in order per point (None: drift not checked; a tracked point absent from it
    should hold no NF)."""
    known = pinned_programs(paths)
    points: dict[tuple[str, Hook], list[str] | None] = dict.fromkeys(
        tracked, [] if desired is not None else None
    )
    points.update(desired or {})
    out = []
    for (ifname, hook), names in sorted(points.items(), key=lambda kv: (kv[0][0], kv[0][1].value)):
        ifindex = netlink.interface_index(handle, ifname)
        chains = table(hook)
        ours = dispatcher_id(hook) if chains is not None else None
        out.append(
            observe_attach_point(
                handle, paths, chains, ours, ifname, ifindex, hook, known, tc_settings, names, netns
            )
        )
    return out
