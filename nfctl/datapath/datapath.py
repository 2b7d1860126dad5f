"""The datapath layer the agent drives: adopt pinned NF builds, set chains on attach
points, sync managed map entries, put migrated maps in place, detach and clean up. Kernel
side effects only: building a version is nfctl.builder's job, deciding *what* to do is the
planner's."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nfctl.bpf.abi import entry_name
from nfctl.bpf.codec import TypeCodec
from nfctl.bpf.syscall import (
    BpfError,
    BpfMap,
    BpfProgram,
    percpu_value,
    possible_cpus,
)
from nfctl.datapath import dispatcher as disp
from nfctl.datapath import hooklinks, links, netlink, tc, xdp
from nfctl.datapath.chain import ChainTable
from nfctl.datapath.counters import CounterKey, CounterTable, VerdictCounts, read_pinned
from nfctl.datapath.entries import (
    EntryPlan,
    encode_entries,
    plan_entries,
)
from nfctl.datapath.interfaces import TouchedInterfaces
from nfctl.datapath.observe import AttachPointState
from nfctl.datapath.pins import BpffsPaths, hook_kind, remove_tree
from nfctl.datapath.records import BuildRecord, RecordStore
from nfctl.diagnostics import Diagnostic
from nfctl.manifest.model import Hook

log = logging.getLogger(__name__)


class DatapathError(RuntimeError):
    def __init__(self, message: str, diagnostics: list[Diagnostic] | None = None) -> None:
        super().__init__(message)
        self.diagnostics = diagnostics or []


@dataclass
class MapSwap:
    """A map created fresh for a new version, put in place when that version goes live."""

    name: str
    staged_pin: Path
    final_pin: Path
    migrated_entries: int = 0
    merged_entries: int = 0  # elements the old program wrote after the copy, merged at commit
    # what migration copied (raw old elements) and the (old key, new key, old value, new value)
    # codecs, so commit can merge what the old program wrote in between; in memory only
    copied: dict[bytes, bytes] | None = field(default=None, repr=False)
    codecs: tuple[TypeCodec, TypeCodec, TypeCodec, TypeCodec] | None = field(
        default=None, repr=False
    )


@dataclass
class LoadedBuild:
    """An NF version pinned and ready to attach (built by nfctl.builder, or adopted from its
    pin); swaps are its staged maps until commit puts them in place."""

    record: BuildRecord
    prog_pin: Path
    prog_id: int
    tag: str
    compiled: bool  # False when adopted from an existing pin
    swaps: list[MapSwap] = field(default_factory=list)
    compile_seconds: float = 0.0
    test_pin: Path | None = None  # the test gate's private copy (nfctl.bpf.progcopy)
    test_copy_error: str = ""
    test_copy_seconds: float = 0.0

    @property
    def nf(self) -> str:
        return self.record.nf

    @property
    def hook(self) -> Hook:
        return Hook(self.record.hook)

    @property
    def build_hash(self) -> str:
        return self.record.build_hash

    def map_pin(self, paths: BpffsPaths, name: str) -> Path:
        for swap in self.swaps:
            if swap.name == name:
                return swap.staged_pin
        return paths.map_pin(self.nf, name)


@dataclass
class ChainMember:
    nf: str
    build_hash: str
    prog_pin: Path


@dataclass
class EntrySyncResult:
    map_name: str
    added: int
    updated: int
    deleted: int
    total: int


ATTACH_POLICIES = ("auto", "link", "netlink")

# Compiles hook's dispatcher and pins it at the path (nfctl.builder.dispatcher).
DispatcherCompiler = Callable[[BpffsPaths, Hook, Path], None]


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
        self.attach_policy = attach or os.environ.get("NFCTL_ATTACH", "auto")
        if self.attach_policy not in ATTACH_POLICIES:
            raise DatapathError(
                f"attach policy {self.attach_policy!r}: expected " + " | ".join(ATTACH_POLICIES)
            )
        self.paths = BpffsPaths(bpffs_root)
        self.state_dir = state_dir
        self.netns = netns
        self.tc_settings = tc_settings or disp.TcSettings()
        self.dispatcher_compiler = dispatcher_compiler
        self.records = RecordStore(state_dir)
        self.touched = TouchedInterfaces(state_dir)
        self._tables: dict[str, ChainTable] = {}
        self._counters: dict[str, CounterTable] = {}
        self._dispatchers: dict[Hook, BpfProgram] = {}
        self._ipr: Any = None
        self._name_sock: socket.socket | None = None
        self._xdp_link_modes: dict[int, str] = {}  # ifindex -> mode the kernel gave our link

    # -- lifecycle ---------------------------------------------------------------
    def close(self) -> None:
        for table in self._tables.values():
            table.close()
        for counters in self._counters.values():
            counters.close()
        self._counters.clear()
        for prog in self._dispatchers.values():
            prog.close()
        self._tables.clear()
        self._dispatchers.clear()
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self._name_sock is not None:
            self._name_sock.close()
            self._name_sock = None

    def __enter__(self) -> Datapath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def ipr(self) -> Any:
        if self._ipr is None:
            from pyroute2 import IPRoute

            self._ipr = IPRoute(netns=self.netns) if self.netns else IPRoute()
        return self._ipr

    def interfaces(self) -> list[netlink.Interface]:
        return netlink.list_interfaces(self.ipr)

    def ifindex(self, ifname: str) -> int:
        if self._name_sock is None:
            with links.in_netns(self.netns):  # the socket resolves names where it was made
                self._name_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        index = netlink.index_by_name(self._name_sock, ifname)
        if index is None:
            raise DatapathError(f"interface {ifname!r} not found")
        return index

    # -- dispatchers and chain tables ----------------------------------------------
    def dispatcher_pin(self, hook: Hook) -> Path:
        """Where this nfctl's dispatcher for hook is pinned (its build is in the name)."""
        return self.paths.dispatcher(hook, disp.dispatcher_build(hook))

    def dispatcher(self, hook: Hook) -> BpfProgram:
        """The pinned dispatcher for hook, compiled first if it is not pinned yet."""
        if hook not in self._dispatchers:
            pin = self.dispatcher_pin(hook)
            if not pin.exists():
                if self.dispatcher_compiler is None:
                    raise DatapathError(f"no {hook.value} dispatcher is pinned at {pin}")
                self.dispatcher_compiler(self.paths, hook, pin)
            self._dispatchers[hook] = BpfProgram.from_pin(str(pin))
        return self._dispatchers[hook]

    def table(self, hook: Hook) -> ChainTable:
        kind = hook_kind(hook)
        if kind not in self._tables:
            if not self.has_tables(hook):
                self.dispatcher(hook)  # its compile creates and pins the chain maps
            self._tables[kind] = ChainTable.open(self.paths.chain(kind), self.paths.heads(kind))
        return self._tables[kind]

    def counter_table(self, hook: Hook) -> CounterTable:
        kind = hook_kind(hook)
        if kind not in self._counters:
            self._counters[kind] = CounterTable(self.paths.counter_pins(kind))
        return self._counters[kind]

    def verdict_counts(self) -> dict[CounterKey, VerdictCounts]:
        """Every NF's verdict counters per attach point, for hook types in use."""
        out: dict[CounterKey, VerdictCounts] = {}
        for kind in ("xdp", "tc"):
            out.update(read_pinned(self.paths.counter_pins(kind)))
        return out

    def has_tables(self, hook: Hook) -> bool:
        kind = hook_kind(hook)
        return self.paths.chain(kind).exists() and self.paths.heads(kind).exists()

    # -- builds ------------------------------------------------------------------
    def find_loaded(self, nf: str, build_hash: str) -> LoadedBuild | None:
        """Adopt an already pinned program of this build: no compile."""
        pin = self.paths.prog_pin(nf, build_hash)
        record = self.records.load(build_hash)
        if not pin.exists() or record is None:
            return None
        try:
            with BpfProgram.from_pin(str(pin)) as prog:
                if prog.info.name != entry_name(build_hash)[:15]:
                    return None
                return LoadedBuild(
                    record=record,
                    prog_pin=pin,
                    prog_id=prog.info.prog_id,
                    tag=prog.info.tag,
                    compiled=False,
                )
        except OSError:
            return None

    def put_staged_maps(self, loaded: LoadedBuild) -> None:
        """Put the staged maps of a version that is live everywhere in place of the old
        ones (what the old version wrote meanwhile is merged first: Builder.commit)."""
        for swap in loaded.swaps:
            # bpffs refuses names with a dot
            retired = swap.final_pin.with_name(f"retired-{swap.name}-{int(time.time() * 1000)}")
            if swap.final_pin.exists():
                os.rename(swap.final_pin, retired)
            os.rename(swap.staged_pin, swap.final_pin)
            retired.unlink(missing_ok=True)
        if loaded.swaps:
            remove_tree(loaded.swaps[0].staged_pin.parent)
            loaded.swaps = []

    def discard(self, loaded: LoadedBuild) -> None:
        """Drop a build that never went live (its program pin and staged maps)."""
        loaded.prog_pin.unlink(missing_ok=True)
        for swap in loaded.swaps:
            remove_tree(swap.staged_pin.parent)
        self.records.delete(loaded.build_hash)

    def release_versions(self, nf: str, keep: set[str]) -> list[str]:
        """Unpin program versions of nf not in keep (build hashes). The kernel frees them
        once no chain references them."""
        released = []
        keep_names = {h[:32] for h in keep}
        for pin in self.paths.pinned_progs(nf):
            if pin.name not in keep_names:
                pin.unlink(missing_ok=True)
                released.append(pin.name)
                for record in self.records.all():
                    if record.nf == nf and record.build_hash[:32] == pin.name:
                        self.records.delete(record.build_hash)
        return released

    # -- chains ------------------------------------------------------------------
    def uses_link(self, hook: Hook) -> bool:
        """Whether new attachments on hook go through a pinned bpf_link."""
        if self.attach_policy == "netlink":
            return False
        supported = links.kernel_has_xdp_links() if hook is Hook.XDP else links.kernel_has_tcx()
        if not supported and self.attach_policy == "link":
            kind = "XDP links" if hook is Hook.XDP else "TCX"
            raise DatapathError(f"attach policy is link, but this kernel has no {kind}")
        return supported

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
        TCX programs (first, last, before:<prog>, after:<prog>)."""
        ifindex = self.ifindex(ifname)
        placement = hooklinks.Position.parse(position)
        table = self.table(hook)
        counters = self.counter_table(hook)
        ids = [counters.counter_id(CounterKey(m.nf, ifindex, hook)) for m in members]
        with contextlib.ExitStack() as stack:
            fds = [stack.enter_context(BpfProgram.from_pin(str(m.prog_pin))).fd for m in members]
            table.install(ifindex, hook, fds, label=lambda base: counters.label_slots(base, ids))
        names = {m.nf for m in members}
        # counters of NFs no longer on this attach point start from zero if they return
        counters.release(lambda k: k.ifindex == ifindex and k.hook is hook and k.nf not in names)
        netlink_tc = hook is not Hook.XDP and not self.uses_link(hook)
        clsact_before = not netlink_tc or tc.has_clsact(self.ipr, ifindex)
        try:
            mode = self._attach(ifindex, hook, xdp_mode, take_over, placement)
        except Exception:
            if self.attached_prog_id(ifindex, hook) != self.dispatcher(hook).info.prog_id:
                table.remove(ifindex, hook)  # do not leave a head for a hook we do not hold
            raise
        self.touched.note_hook(ifname, ifindex, hook)
        if not clsact_before:
            self.touched.note_clsact_created(ifname)
        return mode

    def _attach(
        self,
        ifindex: int,
        hook: Hook,
        xdp_mode: str,
        take_over: bool,
        position: hooklinks.Position,
    ) -> str:
        program = self.dispatcher(hook)
        if hook is Hook.XDP:
            linked = hooklinks.linked_prog_id(self.paths, hook, ifindex)[1]
            if linked and self.uses_link(hook):
                # our live link holds the hook, nothing else can be there: no netlink
                hooklinks.attach(self.paths, self.netns, ifindex, hook, program, xdp_mode)
                if ifindex not in self._xdp_link_modes:
                    self._xdp_link_modes[ifindex] = xdp.query(self.ipr, ifindex).mode or xdp_mode
                return self._xdp_link_modes[ifindex]
            # a program attached over netlink (ours from before links, or another tool's
            # taken over) keeps the netlink path: its atomic replace stays hitless
            if self.uses_link(hook) and self.attached_prog_id(ifindex, hook) == 0:
                hooklinks.attach(self.paths, self.netns, ifindex, hook, program, xdp_mode)
                mode = xdp.query(self.ipr, ifindex).mode or xdp_mode
                self._xdp_link_modes[ifindex] = mode
                return mode
            return disp.attach(
                self.ipr, ifindex, hook, program, xdp_mode=xdp_mode, take_over=take_over
            )
        if self.uses_link(hook):
            if hooklinks.attach(self.paths, self.netns, ifindex, hook, program, position=position):
                # a cls_bpf filter of an older nfctl would run our chain a second time
                disp.detach(self.ipr, ifindex, hook, None, tc_settings=self.tc_settings)
            return "tcx"
        return disp.attach(self.ipr, ifindex, hook, program, tc_settings=self.tc_settings)

    def clear_chain(self, ifname: str, hook: Hook) -> None:
        """Detach our dispatcher from (ifname, hook) and forget its chain; another tool's
        program there is left alone."""
        ifindex = netlink.interface_index(self.ipr, ifname)
        table = self.table(hook) if self.has_tables(hook) else None
        tracked = self.touched.all().get(ifname, {}).get("ifindex")
        if isinstance(tracked, int) and tracked and tracked != ifindex:
            hooklinks.detach(self.paths, hook, tracked)  # a link whose interface is gone
        if ifindex is not None:
            hooklinks.detach(self.paths, hook, ifindex)
            self._xdp_link_modes.pop(ifindex, None)
            created = self.touched.created_clsact(ifname)
            disp.detach(
                self.ipr,
                ifindex,
                hook,
                self._dispatchers.get(hook),
                tc_settings=self.tc_settings,
                remove_clsact=created and not self.touched.other_tc_hook_in_use(ifname, hook),
            )
            if table is not None:
                table.remove(ifindex, hook)
            if self.paths.counter_pins(hook_kind(hook)).counters.exists():
                self.counter_table(hook).release(lambda k: k.ifindex == ifindex and k.hook is hook)
        self.touched.forget_hook(ifname, hook)

    def attached_prog_id(self, ifindex: int, hook: Hook) -> int:
        """The program on our attach slot: our TCX link's, the XDP program (any way
        attached), or our cls_bpf filter's; 0 if none."""
        if hook is not Hook.XDP:
            linked = hooklinks.linked_prog_id(self.paths, hook, ifindex)[1]
            if linked:
                return linked
        return disp.attached_prog_id(self.ipr, ifindex, hook, self.tc_settings)

    def chain_prog_ids(self, ifname: str, hook: Hook) -> list[int] | None:
        index = netlink.interface_index(self.ipr, ifname)
        if index is None or not self.has_tables(hook):
            return None
        return self.table(hook).chain_prog_ids(index, hook)

    def observe(
        self, desired: dict[tuple[str, Hook], list[str]] | None = None
    ) -> list[AttachPointState]:
        """The kernel's view of every attach point we track or want (desired: NF names in
        order per (interface, hook)); drift lists what differs from desired."""
        from nfctl.datapath.observe import observe_attach_point, pinned_programs

        known = pinned_programs(self.paths)
        points: dict[tuple[str, Hook], list[str] | None] = {}
        for ifname, entry in self.tracked_interfaces().items():
            for hook_name in entry.get("hooks", []):
                points[(ifname, Hook(hook_name))] = [] if desired is not None else None
        for key, wanted in (desired or {}).items():
            points[key] = wanted
        out = []
        for (ifname, hook), names in sorted(
            points.items(), key=lambda kv: (kv[0][0], kv[0][1].value)
        ):
            ifindex = netlink.interface_index(self.ipr, ifname)
            table = self.table(hook) if self.has_tables(hook) else None
            dispatcher_id = self.dispatcher(hook).info.prog_id if table is not None else None
            out.append(
                observe_attach_point(
                    self.ipr,
                    self.paths,
                    table,
                    dispatcher_id,
                    ifname,
                    ifindex,
                    hook,
                    known,
                    self.tc_settings,
                    names,
                    self.netns,
                )
            )
        return out

    def reap(self, force: bool = False) -> None:
        for table in self._tables.values():
            table.reap(force=force)

    def tracked_interfaces(self) -> dict[str, dict[str, Any]]:
        return self.touched.all()

    # -- map entries -------------------------------------------------------------
    def sync_entries(
        self,
        loaded: LoadedBuild,
        map_name: str,
        entries: list[tuple[Any, Any]],
    ) -> EntrySyncResult:
        """Make a managed map hold exactly entries: a diff in place, no reload."""
        key_codec, value_codec = loaded.record.codecs(map_name)
        desired = encode_entries(entries, key_codec, value_codec)
        with BpfMap.from_pin(str(loaded.map_pin(self.paths, map_name))) as bmap:
            plan = self._plan(bmap, desired)
            for key, value in plan.upserts.items():
                bmap.update(key, value)
            for key in plan.deletes:
                bmap.delete(key)
            total = len(desired)
        return EntrySyncResult(map_name, plan.added, plan.updated, len(plan.deletes), total)

    def entries_diff(
        self, loaded: LoadedBuild, map_name: str, entries: list[tuple[Any, Any]]
    ) -> EntryPlan:
        """What sync_entries would change, without changing it (drift in warn mode)."""
        key_codec, value_codec = loaded.record.codecs(map_name)
        desired = encode_entries(entries, key_codec, value_codec)
        with BpfMap.from_pin(str(loaded.map_pin(self.paths, map_name))) as bmap:
            return self._plan(bmap, desired)

    def _plan(self, bmap: BpfMap, desired: dict[bytes, bytes]) -> EntryPlan:
        info = bmap.info
        if info.is_percpu:
            desired = {k: percpu_value(v, info.value_size) for k, v in desired.items()}
        current = dict(bmap.items())
        size = bmap.value_buffer_size
        return plan_entries(current, desired, info.type_name, size)

    def map_entries(self, loaded: LoadedBuild, map_name: str) -> Iterator[tuple[Any, Any]]:
        """Decoded (key, value) pairs; per-CPU values are summed when integers."""
        key_codec, value_codec = loaded.record.codecs(map_name)
        with BpfMap.from_pin(str(loaded.map_pin(self.paths, map_name))) as bmap:
            for raw_key, raw_value in bmap.items():
                yield key_codec.decode(raw_key), _decode_value(bmap, value_codec, raw_value)

    # -- removal -------------------------------------------------------------------
    def remove_nf(self, nf: str) -> None:
        """Unpin every program version and map of an NF that is in no chain any more."""
        for record in self.records.all():
            if record.nf == nf:
                self.records.delete(record.build_hash)
        remove_tree(self.paths.nf_dir(nf))
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


def _decode_value(bmap: BpfMap, codec: TypeCodec, raw: bytes) -> Any:
    if not bmap.info.is_percpu:
        return codec.decode(raw[: codec.size])
    slot = (bmap.info.value_size + 7) // 8 * 8
    values = [codec.decode(raw[i * slot : i * slot + codec.size]) for i in range(possible_cpus())]
    if all(isinstance(v, int) for v in values):
        return sum(values)
    return values


__all__ = [
    "BpfError",
    "ChainMember",
    "Datapath",
    "DatapathError",
    "EntrySyncResult",
    "LoadedBuild",
    "MapSwap",
]
