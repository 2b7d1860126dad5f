"""Setting the chain of an attach point: a one-NF version swap into its live slot when
that is the whole change to a chain this process made live and last saw running
(nfctl.datapath.chains), else the chain written into a fresh range, the head switched
and our dispatcher attached (again, if someone removed it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nfctl.datapath import chains, hooklinks, tc
from nfctl.datapath.attach import HookAttacher
from nfctl.datapath.chain import ChainTable
from nfctl.datapath.counters import CounterKey
from nfctl.datapath.hookobjects import HookObjects
from nfctl.datapath.interfaces import TouchedInterfaces
from nfctl.datapath.model import ChainMember
from nfctl.manifest.model import Hook


class ChainSetter:
    """Chain writes and the attach behind them, for one Datapath."""

    def __init__(
        self,
        hooks: HookObjects,
        attacher: HookAttacher,
        live: chains.LiveChains,
        touched: TouchedInterfaces,
        ipr: Callable[[], Any],
    ) -> None:
        self.hooks = hooks
        self.attacher = attacher
        self.live = live
        self.touched = touched
        self.ipr = ipr

    def set(
        self,
        ifname: str,
        hook: Hook,
        members: list[ChainMember],
        xdp_mode: str,
        take_over: bool,
        position: str,
        ifindex: Callable[[], int],
    ) -> str:
        """Make members (in order) the chain on (ifname, hook) and our dispatcher run
        there; returns the attach mode (Datapath.set_chain). ifindex resolves the
        interface, asked only when the change is not a swap of a known live chain."""
        table = self.hooks.table(hook)
        wanted = tuple((m.nf, m.prog_pin) for m in members)
        live = self.live.get(ifname, hook)
        if live is not None:
            offset = chains.swap_offset(live, wanted)
            if offset is not None and table.live_head(live.ifindex, hook) == live.base:
                table.replace_slot(live.base, offset, self.live.fds.fd(wanted[offset][1]))
                self.live.record(
                    ifname, hook, chains.LiveChain(live.ifindex, live.base, wanted, live.mode)
                )
                return live.mode
        placement = hooklinks.Position.parse(position)
        index = ifindex()
        try:
            base, mode = self._install(
                ifname, table, index, hook, members, xdp_mode, take_over, placement
            )
        except Exception:
            self.live.forget(ifname, hook)
            raise
        self.live.record(ifname, hook, chains.LiveChain(index, base, wanted, mode))
        return mode

    def _install(
        self,
        ifname: str,
        table: ChainTable,
        ifindex: int,
        hook: Hook,
        members: list[ChainMember],
        xdp_mode: str,
        take_over: bool,
        placement: hooklinks.Position,
    ) -> tuple[int, str]:
        """Write members into a fresh range, switch the head, (re)attach the dispatcher;
        returns (range base, attach mode)."""
        counters = self.hooks.counter_table(hook)
        ids = [counters.counter_id(CounterKey(m.nf, ifindex, hook)) for m in members]
        fds = [self.live.fds.fd(m.prog_pin) for m in members]
        base = table.install(ifindex, hook, fds, label=lambda base: counters.label_slots(base, ids))
        names = {m.nf for m in members}
        # counters of NFs no longer on this attach point start from zero if they return
        counters.release(lambda k: k.ifindex == ifindex and k.hook is hook and k.nf not in names)
        netlink_tc = hook is not Hook.XDP and not self.attacher.uses_link(hook)
        clsact_before = not netlink_tc or tc.has_clsact(self.ipr(), ifindex)
        try:
            mode = self.attacher.attach(ifindex, hook, xdp_mode, take_over, placement)
        except Exception:
            if (
                self.attacher.attached_prog_id(ifindex, hook)
                != self.hooks.dispatcher(hook).info.prog_id
            ):
                table.remove(ifindex, hook)  # do not leave a head for a hook we do not hold
            raise
        self.touched.note_hook(ifname, ifindex, hook)
        if not clsact_before:
            self.touched.note_clsact_created(ifname)
        return base, mode
