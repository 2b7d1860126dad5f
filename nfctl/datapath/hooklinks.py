"""Our dispatcher on a hook through a pinned bpf_link (TCX or XDP link), one link per
(interface, hook), pinned at <root>/links/<hook>-<ifindex> so it survives the agent and a
walk of nfctl's bpffs folder finds (and by unpinning, detaches) it.

Ordering among TCX programs is fixed when the link is created (`position`); later chain
changes are BPF_LINK_UPDATE on the same link, which keeps its place.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

from nfctl.bpf.syscall import BpfProgram
from nfctl.datapath import links
from nfctl.datapath.pins import BpffsPaths
from nfctl.manifest.model import Hook

TCX_DIRECTION = {Hook.TC_INGRESS: "ingress", Hook.TC_EGRESS: "egress"}
_XDP_MODE_FLAGS = {"native": 1 << 2, "generic": 1 << 1}


class LinkAttachError(RuntimeError):
    def __init__(self, message: str, err: int = 0) -> None:
        super().__init__(message)
        self.errno = err


@dataclass(frozen=True)
class Position:
    """Where a new TCX link goes: first, last, or before/after a named program."""

    where: str  # first | last | before | after
    program: str = ""

    @classmethod
    def parse(cls, text: str) -> Position:
        where, _, name = text.partition(":")
        if where in ("first", "last") and not name:
            return cls(where)
        if where in ("before", "after") and re.fullmatch(r"[A-Za-z0-9_]{1,15}", name):
            return cls(where, name)
        raise ValueError(f"position {text!r}: expected first, last, before:<prog> or after:<prog>")

    def __str__(self) -> str:
        return f"{self.where}:{self.program}" if self.program else self.where


def link_pin(paths: BpffsPaths, hook: Hook, ifindex: int) -> Path:
    return paths.root / "links" / f"{hook.value}-{ifindex}"


def linked_prog_id(paths: BpffsPaths, hook: Hook, ifindex: int) -> tuple[int, int]:
    """(link id, program id) of our live link on (hook, ifindex); (0, 0) if none."""
    link = links.PinnedLink.open(str(link_pin(paths, hook, ifindex)))
    if link is None:
        return 0, 0
    with link:
        if not link.attached or link.info.ifindex != ifindex:
            return 0, 0
        return link.info.link_id, link.info.prog_id


def tcx_programs(netns: str | None, ifindex: int, hook: Hook) -> list[tuple[int, str]]:
    """(prog id, kernel name) of every TCX program on (ifindex, hook), in run order."""
    with links.in_netns(netns):
        ids = links.tcx_prog_ids(ifindex, TCX_DIRECTION[hook])
    out = []
    for prog_id in ids:
        try:
            with BpfProgram.from_id(prog_id) as prog:
                out.append((prog_id, prog.info.name))
        except OSError:
            out.append((prog_id, "?"))
    return out


def _tcx_placement(
    netns: str | None, ifindex: int, hook: Hook, position: Position
) -> tuple[int, int]:
    """(flags, relative id) for BPF_LINK_CREATE."""
    if position.where == "first":
        return links.BPF_F_BEFORE, 0
    if position.where == "last":
        return links.BPF_F_AFTER, 0
    matches = [i for i, name in tcx_programs(netns, ifindex, hook) if name == position.program]
    if not matches:
        raise LinkAttachError(
            f"position {position}: no TCX program named {position.program!r} on "
            f"{hook.value} of ifindex {ifindex}",
            errno.ENOENT,
        )
    where = links.BPF_F_BEFORE if position.where == "before" else links.BPF_F_AFTER
    return where | links.BPF_F_ID, matches[0] if position.where == "before" else matches[-1]


def attach(
    paths: BpffsPaths,
    netns: str | None,
    ifindex: int,
    hook: Hook,
    program: BpfProgram,
    xdp_mode: str = "auto",
    position: Position = Position("first"),
) -> bool:
    """Make program the one our link on (ifindex, hook) runs: BPF_LINK_UPDATE (compare
    and swap against the program it runs now) if our link is there, else a new link.
    Returns True when it created the link."""
    pin = link_pin(paths, hook, ifindex)
    existing = links.PinnedLink.open(str(pin))
    if existing is not None:
        with existing:
            if existing.attached and existing.info.ifindex == ifindex:
                if existing.info.prog_id != program.info.prog_id:
                    with BpfProgram.from_id(existing.info.prog_id) as old:
                        links.link_update(existing.fd, program.fd, old.fd)
                return False
        pin.unlink()  # defunct: detached by someone else, or its interface went away
    os.makedirs(pin.parent, exist_ok=True)
    fd = _create(netns, ifindex, hook, program, xdp_mode, position)
    try:
        links.obj_pin(fd, str(pin))
    except OSError:
        links.link_detach(fd)
        raise
    finally:
        os.close(fd)
    return True


def _create(
    netns: str | None,
    ifindex: int,
    hook: Hook,
    program: BpfProgram,
    xdp_mode: str,
    position: Position,
) -> int:
    if hook is Hook.XDP:
        modes = ["native", "generic"] if xdp_mode == "auto" else [xdp_mode]
        last: OSError | None = None
        for mode in modes:
            try:
                with links.in_netns(netns):
                    return links.link_create(
                        program.fd, ifindex, links.BPF_XDP, _XDP_MODE_FLAGS[mode]
                    )
            except OSError as exc:
                last = exc
                if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL) and mode != modes[-1]:
                    continue
                break
        assert last is not None
        if last.errno == errno.EBUSY:
            raise LinkAttachError(
                f"XDP on ifindex {ifindex} is held by another program; not replacing it",
                last.errno,
            ) from last
        raise LinkAttachError(f"XDP link on ifindex {ifindex} failed: {last}", last.errno or 0)
    flags, relative = _tcx_placement(netns, ifindex, hook, position)
    attach_type = links.TCX_ATTACH_TYPE[TCX_DIRECTION[hook]]
    try:
        with links.in_netns(netns):
            return links.link_create(program.fd, ifindex, attach_type, flags, relative)
    except OSError as exc:
        raise LinkAttachError(
            f"TCX {TCX_DIRECTION[hook]} link on ifindex {ifindex} ({position}) failed: {exc}",
            exc.errno or 0,
        ) from exc


def detach(paths: BpffsPaths, hook: Hook, ifindex: int) -> bool:
    """Detach and unpin our link on (hook, ifindex). True if there was one."""
    pin = link_pin(paths, hook, ifindex)
    link = links.PinnedLink.open(str(pin))
    if link is None:
        return False
    with link:
        if link.attached:
            links.link_detach(link.fd)
    pin.unlink(missing_ok=True)
    return True
