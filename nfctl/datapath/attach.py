"""Putting our dispatcher on a hook and taking it off: through a pinned bpf_link (TCX,
XDP link) where the kernel has one and the policy allows, else netlink (cls_bpf, XDP
netlink attach); and which program our attach slot runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nfctl.bpf.syscall import BpfProgram
from nfctl.datapath import dispatcher as disp
from nfctl.datapath import hooklinks, links, xdp
from nfctl.datapath.model import DatapathError
from nfctl.datapath.pins import BpffsPaths
from nfctl.manifest.model import Hook

ATTACH_POLICIES = ("auto", "link", "netlink")


class HookAttacher:
    """Attach and detach of one nfctl's dispatchers in one network namespace."""

    def __init__(
        self,
        paths: BpffsPaths,
        netns: str | None,
        policy: str,
        tc_settings: disp.TcSettings,
        ipr: Callable[[], Any],
        dispatcher: Callable[[Hook], BpfProgram],
    ) -> None:
        if policy not in ATTACH_POLICIES:
            raise DatapathError(
                f"attach policy {policy!r}: expected " + " | ".join(ATTACH_POLICIES)
            )
        self.paths = paths
        self.netns = netns
        self.policy = policy
        self.tc_settings = tc_settings
        self._ipr = ipr
        self._dispatcher = dispatcher
        self._xdp_link_modes: dict[int, str] = {}  # ifindex -> mode the kernel gave our link

    def uses_link(self, hook: Hook) -> bool:
        """Whether new attachments on hook go through a pinned bpf_link."""
        if self.policy == "netlink":
            return False
        supported = links.kernel_has_xdp_links() if hook is Hook.XDP else links.kernel_has_tcx()
        if not supported and self.policy == "link":
            kind = "XDP links" if hook is Hook.XDP else "TCX"
            raise DatapathError(f"attach policy is link, but this kernel has no {kind}")
        return supported

    def attach(
        self,
        ifindex: int,
        hook: Hook,
        xdp_mode: str,
        take_over: bool,
        position: hooklinks.Position,
    ) -> str:
        """Make our dispatcher run on (ifindex, hook); returns the attach mode."""
        program = self._dispatcher(hook)
        ipr = self._ipr()
        if hook is Hook.XDP:
            linked = hooklinks.linked_prog_id(self.paths, hook, ifindex)[1]
            if linked and self.uses_link(hook):
                # our live link holds the hook, nothing else can be there: no netlink
                hooklinks.attach(self.paths, self.netns, ifindex, hook, program, xdp_mode)
                if ifindex not in self._xdp_link_modes:
                    self._xdp_link_modes[ifindex] = xdp.query(ipr, ifindex).mode or xdp_mode
                return self._xdp_link_modes[ifindex]
            # a program attached over netlink (ours from before links, or another tool's
            # taken over) keeps the netlink path: its atomic replace stays hitless
            if self.uses_link(hook) and self.attached_prog_id(ifindex, hook) == 0:
                hooklinks.attach(self.paths, self.netns, ifindex, hook, program, xdp_mode)
                mode = xdp.query(ipr, ifindex).mode or xdp_mode
                self._xdp_link_modes[ifindex] = mode
                return mode
            return disp.attach(ipr, ifindex, hook, program, xdp_mode=xdp_mode, take_over=take_over)
        if self.uses_link(hook):
            if hooklinks.attach(self.paths, self.netns, ifindex, hook, program, position=position):
                # a cls_bpf filter of an older nfctl would run our chain a second time
                disp.detach(ipr, ifindex, hook, None, tc_settings=self.tc_settings)
            return "tcx"
        return disp.attach(ipr, ifindex, hook, program, tc_settings=self.tc_settings)

    def detach(
        self,
        ifindex: int,
        hook: Hook,
        dispatcher: BpfProgram | None,
        remove_clsact: bool,
    ) -> None:
        """Take our dispatcher (link or netlink attachment) off (ifindex, hook)."""
        hooklinks.detach(self.paths, hook, ifindex)
        self._xdp_link_modes.pop(ifindex, None)
        disp.detach(
            self._ipr(),
            ifindex,
            hook,
            dispatcher,
            tc_settings=self.tc_settings,
            remove_clsact=remove_clsact,
        )

    def attached_prog_id(self, ifindex: int, hook: Hook) -> int:
        """The program on our attach slot: our TCX link's, the XDP program (any way
        attached), or our cls_bpf filter's; 0 if none."""
        if hook is not Hook.XDP:
            linked = hooklinks.linked_prog_id(self.paths, hook, ifindex)[1]
            if linked:
                return linked
        return disp.attached_prog_id(self._ipr(), ifindex, hook, self.tc_settings)
