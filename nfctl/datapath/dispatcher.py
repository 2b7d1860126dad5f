"""The dispatchers: one small root program per hook, attached to every interface that
has NFs on that hook; it starts the interface's chain. Compiled once per agent root
(nfctl.builder.dispatcher) and pinned, so chain changes never touch netlink."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from nfctl.bpf.abi import CODEGEN_VERSION, DISPATCHER_VERSION, dispatcher_name
from nfctl.bpf.syscall import BpfProgram
from nfctl.datapath import tc, xdp
from nfctl.manifest.model import Hook
from nfctl.system import bcc_version, kernel_release

TC_DIRECTION = {Hook.TC_INGRESS: "ingress", Hook.TC_EGRESS: "egress"}


def dispatcher_build(hook: Hook) -> str:
    material = (
        f"{DISPATCHER_VERSION}|{CODEGEN_VERSION}|{hook.value}|{bcc_version()}|{kernel_release()}"
    )
    return hashlib.sha256(material.encode()).hexdigest()


@dataclass(frozen=True)
class TcSettings:
    prio: int = 10
    handle: int = 0x4E46  # "NF"


def is_dispatcher_name(name: str) -> bool:
    return name.startswith("nfctl_")


def attach(
    handle: Any,
    ifindex: int,
    hook: Hook,
    program: BpfProgram,
    xdp_mode: str = "auto",
    tc_settings: TcSettings = TcSettings(),
    take_over: bool = False,
) -> str:
    """Make our dispatcher the program on (ifindex, hook). Returns the XDP mode or 'tc'.

    An older dispatcher of ours is replaced atomically. Another tool's XDP program is
    only replaced with take_over (drift correction); otherwise it is an error."""
    if hook is Hook.XDP:
        state = xdp.query(handle, ifindex)
        if state.prog_id == program.info.prog_id:
            return state.mode or "unknown"
        if state.prog_id == 0:
            return xdp.attach(handle, ifindex, program.fd, mode=xdp_mode)
        with BpfProgram.from_id(state.prog_id) as current:
            if not is_dispatcher_name(current.info.name) and not take_over:
                raise xdp.XdpError(
                    f"XDP on ifindex {ifindex} holds another tool's program "
                    f"{current.info.name!r} (id {current.info.prog_id}); not replacing it"
                )
            return xdp.attach(handle, ifindex, program.fd, mode=xdp_mode, expected_fd=current.fd)
    direction = TC_DIRECTION[hook]
    tc.ensure_clsact(handle, ifindex)
    tc.replace_filter(
        handle,
        ifindex,
        direction,
        program.fd,
        dispatcher_name(hook),
        tc_settings.prio,
        tc_settings.handle,
    )
    return "tc"


def attached_prog_id(
    handle: Any, ifindex: int, hook: Hook, tc_settings: TcSettings = TcSettings()
) -> int:
    """The program id on our attach slot (XDP, or our tc prio/handle); 0 if none."""
    if hook is Hook.XDP:
        return xdp.query(handle, ifindex).prog_id
    for flt in tc.list_filters(handle, ifindex, TC_DIRECTION[hook]):
        if flt.prio == tc_settings.prio and flt.handle == tc_settings.handle:
            return flt.prog_id
    return 0


def detach(
    handle: Any,
    ifindex: int,
    hook: Hook,
    program: BpfProgram | None,
    tc_settings: TcSettings = TcSettings(),
    remove_clsact: bool = False,
) -> None:
    """Remove our dispatcher from (ifindex, hook); never another tool's program."""
    if hook is Hook.XDP:
        state = xdp.query(handle, ifindex)
        if not state.prog_id:
            return
        with BpfProgram.from_id(state.prog_id) as current:
            if not is_dispatcher_name(current.info.name):
                return
            xdp.detach(handle, ifindex, expected_fd=current.fd)
        return
    direction = TC_DIRECTION[hook]
    for flt in tc.list_filters(handle, ifindex, direction):
        ours = is_dispatcher_name(flt.name) or (program and flt.prog_id == program.info.prog_id)
        if flt.prio == tc_settings.prio and flt.handle == tc_settings.handle and ours:
            tc.delete_filter(handle, ifindex, direction, tc_settings.prio, tc_settings.handle)
    if remove_clsact and not any(
        tc.list_filters(handle, ifindex, d) for d in ("ingress", "egress")
    ):
        tc.remove_clsact(handle, ifindex)
