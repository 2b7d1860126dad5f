"""The datapath layer the agent drives: adopt pinned NF builds, set chains on attach
points, sync managed map entries, put migrated maps in place, detach and clean up. Kernel
side effects only: building a version is nfctl.builder's job, deciding *what* to do is the
planner's. The jobs live in their own modules (attach, builds, mapsync, chain, counters);
Datapath ties them to one bpffs root and one network namespace."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nfctl.bpf.syscall import BpfProgram
from nfctl.datapath import chains, hooklinks, mapsync, netlink
from nfctl.datapath import dispatcher as disp
from nfctl.datapath.attach import ATTACH_POLICIES, HookAttacher
from nfctl.datapath.builds import PinnedBuilds
from nfctl.datapath.chain import ChainTable
from nfctl.datapath.chainset import ChainSetter
from nfctl.datapath.counters import CounterKey, CounterTable, VerdictCounts
from nfctl.datapath.entries import EntryPlan
from nfctl.datapath.hookobjects import DispatcherCompiler, HookObjects
from nfctl.datapath.interfaces import TouchedInterfaces
from nfctl.datapath.model import (
    ChainMember,
    DatapathError,
    EntrySyncResult,
    LoadedBuild,
    MapSwap,
)
from nfctl.datapath.observe import AttachPointState, observe_points
from nfctl.datapath.pins import BpffsPaths, hook_kind, remove_tree, require_bpffs
from nfctl.datapath.records import RecordStore
from nfctl.manifest.model import Hook

log = logging.getLogger(__name__)


class Datapath:
    """nfctl's kernel state under one bpffs root and one network namespace: the dispatchers
    and chain tables per hook, the chain on each attach point (set_chain, clear_chain), the
    pinned NF versions (adopt, discard, release, remove) and their maps (entries, staged
    maps put in place), verdict counters, and what it observes. Kernel operations only: it
    never compiles, except a missing dispatcher through the dispatcher_compiler it is given."""

    def __init__(
        self,
        bpffs_root: Path,
        state_dir: Path,
        netns: str | None = None,
        tc_settings: disp.TcSettings | None = None,
        attach: str | None = None,
        dispatcher_compiler: DispatcherCompiler | None = None,
    ) -> None:
        """attach: auto (bpf_link where the kernel has it, else netlink), link (fail
        without), netlink (never links); default from $NFCTL_ATTACH, else auto.
        dispatcher_compiler: called when a hook's current dispatcher is not pinned; without
        it, a missing dispatcher is an error (nfctl.builder.Builder pins one before a build)."""
        require_bpffs(bpffs_root)
        self.paths = BpffsPaths(bpffs_root)
        self.state_dir = state_dir
        self.netns = netns
        self.tc_settings = tc_settings or disp.TcSettings()
        self.attacher = HookAttacher(
            self.paths,
            netns,
            attach or os.environ.get("NFCTL_ATTACH", "auto"),
            self.tc_settings,
            lambda: self.ipr,
            self.dispatcher,
        )
        self.hooks = HookObjects(self.paths, dispatcher_compiler)
        self.records = RecordStore(state_dir)
        self.builds = PinnedBuilds(self.paths, self.records)
        self.live = chains.LiveChains()
        self.touched = TouchedInterfaces(state_dir)
        self.setter = ChainSetter(
            self.hooks, self.attacher, self.live, self.touched, lambda: self.ipr
        )
        self.handles = netlink.NetnsHandles(netns)

    @property
    def attach_policy(self) -> str:
        return self.attacher.policy

    # -- lifecycle ---------------------------------------------------------------
    def close(self) -> None:
        self.live.close()
        self.hooks.close()
        self.handles.close()

    def __enter__(self) -> Datapath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def ipr(self) -> Any:
        return self.handles.ipr

    def interfaces(self) -> list[netlink.Interface]:
        return netlink.list_interfaces(self.ipr)

    def ifindex(self, ifname: str) -> int:
        index = self.handles.ifindex(ifname)
        if index is None:
            raise DatapathError(f"interface {ifname!r} not found")
        return index

    # -- dispatchers and chain tables ----------------------------------------------
    def dispatcher_pin(self, hook: Hook) -> Path:
        return self.hooks.dispatcher_pin(hook)

    def dispatcher(self, hook: Hook) -> BpfProgram:
        return self.hooks.dispatcher(hook)

    def table(self, hook: Hook) -> ChainTable:
        return self.hooks.table(hook)

    def counter_table(self, hook: Hook) -> CounterTable:
        return self.hooks.counter_table(hook)

    def verdict_counts(self) -> dict[CounterKey, VerdictCounts]:
        return self.hooks.verdict_counts()

    def has_tables(self, hook: Hook) -> bool:
        return self.hooks.has_tables(hook)

    # -- builds ------------------------------------------------------------------
    def find_loaded(self, nf: str, build_hash: str) -> LoadedBuild | None:
        """Adopt an already pinned program of this build: no compile."""
        return self.builds.find_loaded(nf, build_hash)

    def put_staged_maps(self, loaded: LoadedBuild) -> None:
        """Put a live version's staged maps in place of the old ones."""
        self.builds.put_staged_maps(loaded)

    def discard(self, loaded: LoadedBuild) -> None:
        """Drop a build that never went live (its program pin and staged maps)."""
        self.live.forget_pins(lambda pin: pin == loaded.prog_pin)
        self.builds.discard(loaded)

    def release_versions(self, nf: str, keep: set[str]) -> list[str]:
        """Unpin program versions of nf not in keep (build hashes)."""
        released = self.builds.release_versions(nf, keep)
        gone = {self.paths.prog_pin(nf, name) for name in released}
        self.live.forget_pins(lambda pin: pin in gone)
        return released

    # -- chains ------------------------------------------------------------------
    def uses_link(self, hook: Hook) -> bool:
        """Whether new attachments on hook go through a pinned bpf_link."""
        return self.attacher.uses_link(hook)

    def set_chain(
        self,
        ifname: str,
        hook: Hook,
        members: list[ChainMember],
        xdp_mode: str = "auto",
        take_over: bool = False,
        position: str = "first",
    ) -> str:
        """Atomically make members (in order) the chain on (ifname, hook), attaching the
        dispatcher first if the interface has none. Returns the attach mode: tcx or tc,
        or the XDP mode (native, generic). position places a new TCX link among other
        TCX programs (first, last, before:<prog>, after:<prog>). A version swap of one NF
        is written into its live slot (nfctl.datapath.chains), anything else into a
        fresh range made live by the head switch. The swap trusts what this process
        last wrote or observed there: call observe() first (every reconcile pass does),
        so that a dispatcher another tool removed is attached again."""
        return self.setter.set(
            ifname, hook, members, xdp_mode, take_over, position, lambda: self.ifindex(ifname)
        )

    def clear_chain(self, ifname: str, hook: Hook) -> None:
        """Detach our dispatcher from (ifname, hook) and forget its chain; another tool's
        program there is left alone."""
        ifindex = netlink.interface_index(self.ipr, ifname)
        table = self.table(hook) if self.has_tables(hook) else None
        tracked = self.touched.all().get(ifname, {}).get("ifindex")
        if isinstance(tracked, int) and tracked and tracked != ifindex:
            hooklinks.detach(self.paths, hook, tracked)  # a link whose interface is gone
        if ifindex is not None:
            created = self.touched.created_clsact(ifname)
            self.attacher.detach(
                ifindex,
                hook,
                self.hooks.opened_dispatcher(hook),
                remove_clsact=created and not self.touched.other_tc_hook_in_use(ifname, hook),
            )
            if table is not None:
                table.remove(ifindex, hook)
            if self.paths.counter_pins(hook_kind(hook)).counters.exists():
                self.counter_table(hook).release(lambda k: k.ifindex == ifindex and k.hook is hook)
        self.live.forget(ifname, hook)
        self.touched.forget_hook(ifname, hook)

    def attached_prog_id(self, ifindex: int, hook: Hook) -> int:
        """The program on our attach slot: our TCX link's, the XDP program (any way
        attached), or our cls_bpf filter's; 0 if none."""
        return self.attacher.attached_prog_id(ifindex, hook)

    def chain_prog_ids(self, ifname: str, hook: Hook) -> list[int] | None:
        index = netlink.interface_index(self.ipr, ifname)
        if index is None or not self.has_tables(hook):
            return None
        return self.table(hook).chain_prog_ids(index, hook)

    def observe(
        self, desired: dict[tuple[str, Hook], list[str]] | None = None
    ) -> list[AttachPointState]:
        """The kernel's view of every attach point we track or want (desired: NF names in
        order per (interface, hook)); drift lists what differs from desired. A chain this
        process made live that the view shows is not running is forgotten, so the next
        change there takes the full path (set_chain)."""
        tracked = {
            (ifname, Hook(name))
            for ifname, entry in self.tracked_interfaces().items()
            for name in entry.get("hooks", [])
        }
        states = observe_points(
            self.ipr,
            self.paths,
            tracked,
            desired,
            lambda hook: self.table(hook) if self.has_tables(hook) else None,
            lambda hook: self.dispatcher(hook).info.prog_id,
            self.tc_settings,
            self.netns,
        )
        self.live.confirm(states)
        return states

    def reap(self, force: bool = False) -> None:
        for table in self.hooks.opened_tables():
            table.reap(force=force)

    def tracked_interfaces(self) -> dict[str, dict[str, Any]]:
        return self.touched.all()

    # -- map entries -------------------------------------------------------------
    def sync_entries(
        self, loaded: LoadedBuild, map_name: str, entries: list[tuple[Any, Any]]
    ) -> EntrySyncResult:
        """Make a managed map hold exactly entries: a diff in place, no reload."""
        return mapsync.sync_entries(self.paths, loaded, map_name, entries)

    def entries_diff(
        self, loaded: LoadedBuild, map_name: str, entries: list[tuple[Any, Any]]
    ) -> EntryPlan:
        """What sync_entries would change, without changing it (drift in warn mode)."""
        return mapsync.entries_diff(self.paths, loaded, map_name, entries)

    def map_entries(self, loaded: LoadedBuild, map_name: str) -> Iterator[tuple[Any, Any]]:
        """Decoded (key, value) pairs; per-CPU values are summed when integers."""
        return mapsync.map_entries(self.paths, loaded, map_name)

    # -- removal -------------------------------------------------------------------
    def remove_nf(self, nf: str) -> None:
        """Unpin every program version and map of an NF that is in no chain any more."""
        folder = self.paths.nf_dir(nf)
        self.live.forget_pins(lambda pin: pin.is_relative_to(folder))
        self.builds.remove_nf(nf)
        for hook in (Hook.XDP, Hook.TC_INGRESS):
            if self.paths.counter_pins(hook_kind(hook)).counters.exists():
                self.counter_table(hook).release(lambda k: k.nf == nf)

    def teardown(self) -> None:
        """Remove everything nfctl attached and pinned under this root (lab/test cleanup)."""
        for ifname, entry in self.tracked_interfaces().items():
            for hook_name in list(entry.get("hooks", [])):
                with contextlib.suppress(Exception):
                    self.clear_chain(ifname, Hook(hook_name))
        self.close()
        remove_tree(self.paths.root)
        for record in self.records.all():
            self.records.delete(record.build_hash)
        self.touched.clear()


__all__ = [
    "ATTACH_POLICIES",
    "ChainMember",
    "Datapath",
    "DatapathError",
    "EntrySyncResult",
    "LoadedBuild",
    "MapSwap",
]
