"""The datapath layer the agent drives: load NF builds, set chains on attach points,
sync managed map entries, migrate maps, detach and clean up. All kernel side effects of
nfctl go through here; deciding *what* to do is the planner's job."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nfctl.compiler.build import BuildResult
from nfctl.compiler.client import PreparedNF, build_request, run_worker
from nfctl.compiler.codegen import PinLayout, entry_name
from nfctl.datapath import dispatcher as disp
from nfctl.datapath import hooklinks, links, netlink, tc, xdp
from nfctl.datapath.bpf import (
    BPF_EXIST,
    BPF_NOEXIST,
    BpfError,
    BpfMap,
    BpfProgram,
    possible_cpus,
)
from nfctl.datapath.chain import ChainTable
from nfctl.datapath.counters import CounterKey, CounterTable, VerdictCounts, read_pinned
from nfctl.datapath.entries import (
    EntryPlan,
    convert_value,
    encode_entries,
    merge_written,
    plan_entries,
)
from nfctl.datapath.layout import LayoutError, TypeLayout, declared_types, network_order_fields
from nfctl.datapath.observe import AttachPointState
from nfctl.datapath.pins import BpffsLayout, hook_kind, remove_tree
from nfctl.datapath.records import BuildRecord, RecordStore, write_json_atomic
from nfctl.diagnostics import Diagnostic
from nfctl.manifest.model import Hook, IncompatibleMapPolicy

log = logging.getLogger(__name__)

# A program invocation that read the old chain before the switch may still be running;
# BPF programs run to completion within microseconds, so this is ample.
IN_FLIGHT_GRACE_S = 0.05
MERGE_RETRIES = 100


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
    # layouts, so commit can merge what the old program wrote in between; in memory only
    copied: dict[bytes, bytes] | None = field(default=None, repr=False)
    layouts: tuple[TypeLayout, TypeLayout, TypeLayout, TypeLayout] | None = field(
        default=None, repr=False
    )


@dataclass
class LoadedBuild:
    record: BuildRecord
    prog_pin: Path
    prog_id: int
    tag: str
    compiled: bool  # False when adopted from an existing pin
    swaps: list[MapSwap] = field(default_factory=list)
    compile_seconds: float = 0.0
    test_pin: Path | None = None  # the test gate's private copy (nfctl.nftest.private)
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

    def map_pin(self, layout: BpffsLayout, name: str) -> Path:
        for swap in self.swaps:
            if swap.name == name:
                return swap.staged_pin
        return layout.map_pin(self.nf, name)


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


class Datapath:
    def __init__(
        self,
        bpffs_root: Path,
        state_dir: Path,
        netns: str | None = None,
        tc_settings: disp.TcSettings | None = None,
        attach: str | None = None,
    ) -> None:
        """attach: auto (bpf_link where the kernel has it, else netlink), link (fail
        without), netlink (never links); default from $NFCTL_ATTACH, else auto."""
        self.attach_policy = attach or os.environ.get("NFCTL_ATTACH", "auto")
        if self.attach_policy not in ATTACH_POLICIES:
            raise DatapathError(
                f"attach policy {self.attach_policy!r}: expected " + " | ".join(ATTACH_POLICIES)
            )
        self.layout = BpffsLayout(bpffs_root)
        self.state_dir = state_dir
        self.netns = netns
        self.tc_settings = tc_settings or disp.TcSettings()
        self.records = RecordStore(state_dir)
        self._tables: dict[str, ChainTable] = {}
        self._counters: dict[str, CounterTable] = {}
        self._dispatchers: dict[Hook, BpfProgram] = {}
        self._ipr: Any = None
        self._name_sock: socket.socket | None = None
        self._xdp_link_modes: dict[int, str] = {}  # ifindex -> mode the kernel gave our link
        # attach points this object already recorded: no state-file read per chain update
        self._noted: set[tuple[str, int, Hook]] = set()

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
    def dispatcher(self, hook: Hook) -> BpfProgram:
        if hook not in self._dispatchers:
            self._dispatchers[hook] = disp.ensure_dispatcher(self.layout, hook)
        return self._dispatchers[hook]

    def table(self, hook: Hook) -> ChainTable:
        kind = hook_kind(hook)
        if kind not in self._tables:
            self.dispatcher(hook)  # creates and pins the chain maps on first use
            self._tables[kind] = ChainTable.open(self.layout.chain(kind), self.layout.heads(kind))
        return self._tables[kind]

    def counter_table(self, hook: Hook) -> CounterTable:
        kind = hook_kind(hook)
        if kind not in self._counters:
            self._counters[kind] = CounterTable(self.layout.counter_pins(kind))
        return self._counters[kind]

    def verdict_counts(self) -> dict[CounterKey, VerdictCounts]:
        """Every NF's verdict counters per attach point, for hook types in use."""
        out: dict[CounterKey, VerdictCounts] = {}
        for kind in ("xdp", "tc"):
            out.update(read_pinned(self.layout.counter_pins(kind)))
        return out

    def has_tables(self, hook: Hook) -> bool:
        kind = hook_kind(hook)
        return self.layout.chain(kind).exists() and self.layout.heads(kind).exists()

    # -- builds ------------------------------------------------------------------
    def find_loaded(self, nf: str, build_hash: str) -> LoadedBuild | None:
        """Adopt an already pinned program of this build: no compile."""
        pin = self.layout.prog_pin(nf, build_hash)
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

    def load(
        self,
        prepared: PreparedNF,
        policy: dict[str, IncompatibleMapPolicy] | None = None,
        test_pin: Path | None = None,
    ) -> LoadedBuild:
        """Compile, verify, load and pin a build, or adopt it if already pinned.

        Nothing attached changes here. Incompatible pinned maps follow the NF's policy:
        fail (error), recreate (fresh map) or migrate (fresh map filled from the old)."""
        nf = prepared.nf.name
        adopted = self.find_loaded(nf, prepared.build_hash)
        if adopted is not None:
            return adopted
        hook = prepared.nf.spec.attach.hook
        self.dispatcher(hook)  # chain maps must exist before NFs reference them
        self.counter_table(hook)  # and the counter maps, created as the wrapper declares them
        prog_pin = self.layout.prog_pin(nf, prepared.build_hash)
        base_pins = self._nf_pins(nf, hook)
        result = self._build(prepared, base_pins, prog_pin, test_pin)
        swaps: list[MapSwap] = []
        if result.mismatches:
            policy = policy or {}
            refuse = [
                m
                for m in result.mismatches
                if policy.get(m.name, IncompatibleMapPolicy.MIGRATE) is IncompatibleMapPolicy.FAIL
            ]
            if refuse:
                raise DatapathError(
                    "incompatible pinned map(s); policy is fail",
                    [
                        Diagnostic(
                            file=prepared.bundle.main_rel if prepared.bundle else nf,
                            message=(
                                f"{m.describe()}; onIncompatible: fail keeps the running version"
                            ),
                        )
                        for m in refuse
                    ],
                )
            tag = prepared.build_hash[:12]
            staging = self.layout.staging_dir(nf, tag)
            remove_tree(staging)
            staged_pins = PinLayout(
                maps_dir=base_pins.maps_dir,
                chain_path=base_pins.chain_path,
                cursor_path=base_pins.cursor_path,
                counters_path=base_pins.counters_path,
                slots_path=base_pins.slots_path,
                staged_maps=tuple((m.name, str(staging)) for m in result.mismatches),
                all_map_names=tuple(m.name for m in result.maps),
            )
            result = self._build(prepared, staged_pins, prog_pin, test_pin)
            if not result.ok:
                remove_tree(staging)
                raise DatapathError("build failed", result.diagnostics)
            swaps = [
                MapSwap(name, staging / name, self.layout.map_pin(nf, name))
                for name, _ in staged_pins.staged_maps
            ]
        elif not result.ok:
            raise DatapathError("build failed", result.diagnostics)
        assert result.program is not None
        record = self._record(prepared, result)
        loaded = LoadedBuild(
            record=record,
            prog_pin=prog_pin,
            prog_id=result.program.prog_id,
            tag=result.program.tag,
            compiled=True,
            swaps=swaps,
            compile_seconds=result.compile_seconds + result.load_seconds,
            test_pin=Path(result.test_pin_path) if result.test_pin_path else None,
            test_copy_error=result.test_copy_error,
            test_copy_seconds=result.test_copy_seconds,
        )
        try:
            for swap in swaps:
                if policy and policy.get(swap.name) is IncompatibleMapPolicy.RECREATE:
                    continue
                swap.migrated_entries = self._migrate(nf, swap, record)
        except (LayoutError, OSError) as exc:
            self.discard(loaded)
            raise DatapathError(
                f"migrating map data failed, the running version is kept: {exc}",
                [Diagnostic(file=record.nf, message=f"map migration failed: {exc}")],
            ) from exc
        self.records.save(record)
        return loaded

    def _nf_pins(self, nf: str, hook: Hook) -> PinLayout:
        kind = hook_kind(hook)
        return PinLayout(
            maps_dir=str(self.layout.maps_dir(nf)),
            chain_path=str(self.layout.chain(kind)),
            cursor_path=str(self.layout.cursor(kind)),
            counters_path=str(self.layout.counter_pins(kind).counters),
            slots_path=str(self.layout.counter_pins(kind).slots),
        )

    def _build(
        self, prepared: PreparedNF, pins: PinLayout, prog_pin: Path, test_pin: Path | None = None
    ) -> BuildResult:
        request = build_request(prepared, install=True, pins=pins, prog_pin_path=str(prog_pin))
        request.test_pin_path = str(test_pin) if test_pin else None
        return run_worker([request])[0]

    def _record(self, prepared: PreparedNF, result: BuildResult) -> BuildRecord:
        source = prepared.bundle.main_text if prepared.bundle else ""
        types = declared_types(source)
        hints: dict[str, dict[str, list[str]]] = {}
        for info in result.maps:
            key_type, value_type = types.get(info.name, (None, None))
            hints[info.name] = {
                "key": sorted(network_order_fields(source, info.key_desc, key_type)),
                "value": sorted(network_order_fields(source, info.value_desc, value_type)),
            }
        return BuildRecord(
            nf=prepared.nf.name,
            hook=prepared.nf.spec.attach.hook.value,
            build_hash=prepared.build_hash,
            program_name=result.program.name if result.program else "",
            maps=result.maps,
            network_order=hints,
            compile_seconds=result.compile_seconds + result.load_seconds,
        )

    def _previous_record(self, nf: str, exclude: str) -> BuildRecord | None:
        candidates = [r for r in self.records.all() if r.nf == nf and r.build_hash != exclude]
        live = {p.name for p in self.layout.pinned_progs(nf)}
        pinned = [r for r in candidates if r.build_hash[:32] in live]
        best = pinned or candidates
        return best[-1] if best else None

    def _migrate(self, nf: str, swap: MapSwap, new_record: BuildRecord) -> int:
        old_record = self._previous_record(nf, new_record.build_hash)
        if old_record is None or not swap.final_pin.exists():
            return 0
        try:
            old_key, old_value = old_record.layouts(swap.name)
        except KeyError:
            return 0
        new_key, new_value = new_record.layouts(swap.name)
        copied = 0
        with (
            BpfMap.from_pin(str(swap.final_pin)) as old,
            BpfMap.from_pin(str(swap.staged_pin)) as new,
        ):
            items = old.items()
            swap.copied = dict(items)
            swap.layouts = (old_key, new_key, old_value, new_value)
            if len(items) > new.info.max_entries and new.info.type_name not in (
                "array",
                "percpu_array",
            ):
                raise LayoutError(
                    f"map {swap.name!r} holds {len(items)} entries, the new max_entries is "
                    f"{new.info.max_entries}"
                )
            for raw_key, raw_value in items:
                key = _convert(old_key, new_key, raw_key, 1)
                is_array = new.info.type_name in ("array", "percpu_array")
                if is_array and int.from_bytes(key[:4], "little") >= new.info.max_entries:
                    continue  # an array that shrank: indexes past the end have no slot
                value = _convert_values(old, new, old_value, new_value, raw_value)
                new.update(key, value)
                copied += 1
        return copied

    def _merge_late_writes(self, swap: MapSwap) -> int:
        """Carry over what the old program wrote between the migration copy and the switch
        (rules in entries.merge_written). Per-CPU maps merge slot by slot."""
        if swap.copied is None or swap.layouts is None or not swap.final_pin.exists():
            return 0
        old_key, new_key, old_value, new_value = swap.layouts
        merged = 0
        with (
            BpfMap.from_pin(str(swap.final_pin)) as old,
            BpfMap.from_pin(str(swap.staged_pin)) as new,
        ):
            is_array = new.info.type_name in ("array", "percpu_array")
            now = dict(old.items())
            for raw_key, raw in now.items():
                copied = swap.copied.get(raw_key)
                if copied == raw:
                    continue
                key = _convert(old_key, new_key, raw_key, 1)
                if is_array and int.from_bytes(key[:4], "little") >= new.info.max_entries:
                    continue
                theirs = _convert_values(old, new, old_value, new_value, raw)
                # an element the old program created after the copy merges onto zero
                base = (
                    _convert_values(old, new, old_value, new_value, copied)
                    if copied is not None
                    else bytes(len(theirs))
                )
                _merge_into(new, key, base, theirs, new_value)
                merged += 1
            for raw_key, copied in swap.copied.items():
                if raw_key in now or is_array:
                    continue
                # deleted by the old program after the copy: delete unless the new one rewrote it
                key = _convert(old_key, new_key, raw_key, 1)
                if new.lookup(key) == _convert_values(old, new, old_value, new_value, copied):
                    new.delete(key)
                    merged += 1
        return merged

    def commit(self, loaded: LoadedBuild) -> None:
        """After the new version is live everywhere: merge what the old version wrote since
        the copy, then put the fresh maps in place."""
        if any(swap.copied is not None for swap in loaded.swaps):
            time.sleep(IN_FLIGHT_GRACE_S)
        for swap in loaded.swaps:
            swap.merged_entries = self._merge_late_writes(swap)
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
        for pin in self.layout.pinned_progs(nf):
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
        self._note_interface(ifname, ifindex, hook)
        if not clsact_before:
            self.note_clsact_created(ifname)
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
            linked = hooklinks.linked_prog_id(self.layout, hook, ifindex)[1]
            if linked and self.uses_link(hook):
                # our live link holds the hook, nothing else can be there: no netlink
                hooklinks.attach(self.layout, self.netns, ifindex, hook, program, xdp_mode)
                if ifindex not in self._xdp_link_modes:
                    self._xdp_link_modes[ifindex] = xdp.query(self.ipr, ifindex).mode or xdp_mode
                return self._xdp_link_modes[ifindex]
            # a program attached over netlink (ours from before links, or another tool's
            # taken over) keeps the netlink path: its atomic replace stays hitless
            if self.uses_link(hook) and self.attached_prog_id(ifindex, hook) == 0:
                hooklinks.attach(self.layout, self.netns, ifindex, hook, program, xdp_mode)
                mode = xdp.query(self.ipr, ifindex).mode or xdp_mode
                self._xdp_link_modes[ifindex] = mode
                return mode
            return disp.attach(
                self.ipr, ifindex, hook, program, xdp_mode=xdp_mode, take_over=take_over
            )
        if self.uses_link(hook):
            if hooklinks.attach(self.layout, self.netns, ifindex, hook, program, position=position):
                # a cls_bpf filter of an older nfctl would run our chain a second time
                disp.detach(self.ipr, ifindex, hook, None, tc_settings=self.tc_settings)
            return "tcx"
        return disp.attach(self.ipr, ifindex, hook, program, tc_settings=self.tc_settings)

    def clear_chain(self, ifname: str, hook: Hook) -> None:
        """Detach our dispatcher from (ifname, hook) and forget its chain; another tool's
        program there is left alone."""
        ifindex = netlink.interface_index(self.ipr, ifname)
        table = self.table(hook) if self.has_tables(hook) else None
        tracked = self._iface_state().get(ifname, {}).get("ifindex")
        if isinstance(tracked, int) and tracked and tracked != ifindex:
            hooklinks.detach(self.layout, hook, tracked)  # a link whose interface is gone
        if ifindex is not None:
            hooklinks.detach(self.layout, hook, ifindex)
            self._xdp_link_modes.pop(ifindex, None)
            created = self._created_clsact(ifname)
            disp.detach(
                self.ipr,
                ifindex,
                hook,
                self._dispatchers.get(hook),
                tc_settings=self.tc_settings,
                remove_clsact=created and not self._other_tc_hook_in_use(ifname, hook),
            )
            if table is not None:
                table.remove(ifindex, hook)
            if self.layout.counter_pins(hook_kind(hook)).counters.exists():
                self.counter_table(hook).release(lambda k: k.ifindex == ifindex and k.hook is hook)
        self._forget_interface(ifname, hook)

    def attached_prog_id(self, ifindex: int, hook: Hook) -> int:
        """The program on our attach slot: our TCX link's, the XDP program (any way
        attached), or our cls_bpf filter's; 0 if none."""
        if hook is not Hook.XDP:
            linked = hooklinks.linked_prog_id(self.layout, hook, ifindex)[1]
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

        known = pinned_programs(self.layout)
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
                    self.layout,
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

    # -- interfaces we touched (to leave them as we found them) -----------------------
    def _iface_state_path(self) -> Path:
        return self.state_dir / "datapath" / "interfaces.json"

    def _iface_state(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self._iface_state_path().read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _note_interface(self, ifname: str, ifindex: int, hook: Hook) -> None:
        if (ifname, ifindex, hook) in self._noted:
            return
        state = self._iface_state()
        entry = state.get(ifname)
        if entry and entry.get("ifindex") == ifindex and hook.value in entry.get("hooks", []):
            self._noted.add((ifname, ifindex, hook))
            return  # already recorded: no write on the hot path of a chain update
        entry = state.setdefault(ifname, {"ifindex": ifindex, "hooks": [], "created_clsact": False})
        if entry.get("ifindex") != ifindex:
            entry.update({"ifindex": ifindex, "hooks": [], "created_clsact": False})
        if hook.value not in entry["hooks"]:
            entry["hooks"].append(hook.value)
        write_json_atomic(self._iface_state_path(), state)
        self._noted.add((ifname, ifindex, hook))

    def note_clsact_created(self, ifname: str) -> None:
        state = self._iface_state()
        state.setdefault(ifname, {"ifindex": 0, "hooks": []})["created_clsact"] = True
        write_json_atomic(self._iface_state_path(), state)

    def _created_clsact(self, ifname: str) -> bool:
        return bool(self._iface_state().get(ifname, {}).get("created_clsact"))

    def _other_tc_hook_in_use(self, ifname: str, hook: Hook) -> bool:
        hooks = self._iface_state().get(ifname, {}).get("hooks", [])
        return any(h != hook.value and h != Hook.XDP.value for h in hooks)

    def _forget_interface(self, ifname: str, hook: Hook) -> None:
        self._noted = {n for n in self._noted if n[0] != ifname or n[2] is not hook}
        state = self._iface_state()
        entry = state.get(ifname)
        if entry is None:
            return
        entry["hooks"] = [h for h in entry.get("hooks", []) if h != hook.value]
        if not entry["hooks"]:
            del state[ifname]
        write_json_atomic(self._iface_state_path(), state)

    def tracked_interfaces(self) -> dict[str, dict[str, Any]]:
        return self._iface_state()

    # -- map entries -------------------------------------------------------------
    def sync_entries(
        self,
        loaded: LoadedBuild,
        map_name: str,
        entries: list[tuple[Any, Any]],
    ) -> EntrySyncResult:
        """Make a managed map hold exactly entries: a diff in place, no reload."""
        key_layout, value_layout = loaded.record.layouts(map_name)
        desired = encode_entries(entries, key_layout, value_layout)
        with BpfMap.from_pin(str(loaded.map_pin(self.layout, map_name))) as bmap:
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
        key_layout, value_layout = loaded.record.layouts(map_name)
        desired = encode_entries(entries, key_layout, value_layout)
        with BpfMap.from_pin(str(loaded.map_pin(self.layout, map_name))) as bmap:
            return self._plan(bmap, desired)

    def _plan(self, bmap: BpfMap, desired: dict[bytes, bytes]) -> EntryPlan:
        info = bmap.info
        if info.is_percpu:
            desired = {k: _replicate(v, info.value_size) for k, v in desired.items()}
        current = dict(bmap.items())
        size = bmap.value_buffer_size
        return plan_entries(current, desired, info.type_name, size)

    def map_entries(self, loaded: LoadedBuild, map_name: str) -> Iterator[tuple[Any, Any]]:
        """Decoded (key, value) pairs; per-CPU values are summed when integers."""
        key_layout, value_layout = loaded.record.layouts(map_name)
        with BpfMap.from_pin(str(loaded.map_pin(self.layout, map_name))) as bmap:
            for raw_key, raw_value in bmap.items():
                yield key_layout.decode(raw_key), _decode_value(bmap, value_layout, raw_value)

    # -- removal -------------------------------------------------------------------
    def remove_nf(self, nf: str) -> None:
        """Unpin every program version and map of an NF that is in no chain any more."""
        for record in self.records.all():
            if record.nf == nf:
                self.records.delete(record.build_hash)
        remove_tree(self.layout.nf_dir(nf))
        for hook in (Hook.XDP, Hook.TC_INGRESS):
            if self.layout.counter_pins(hook_kind(hook)).counters.exists():
                self.counter_table(hook).release(lambda k: k.nf == nf)

    def teardown(self) -> None:
        """Remove everything nfctl attached and pinned under this root (lab/test cleanup)."""
        for ifname, entry in self.tracked_interfaces().items():
            for hook_name in list(entry.get("hooks", [])):
                with contextlib.suppress(Exception):
                    self.clear_chain(ifname, Hook(hook_name))
        self.close()
        remove_tree(self.layout.root)
        for record in self.records.all():
            self.records.delete(record.build_hash)
        self._iface_state_path().unlink(missing_ok=True)


def _replicate(value: bytes, value_size: int) -> bytes:
    slot = (value_size + 7) // 8 * 8
    return value.ljust(slot, b"\0") * possible_cpus()


def _convert(old: TypeLayout, new: TypeLayout, raw: bytes, _count: int) -> bytes:
    return convert_value(old, new, raw[: old.size])


def _convert_values(
    old_map: BpfMap, new_map: BpfMap, old: TypeLayout, new: TypeLayout, raw: bytes
) -> bytes:
    if not old_map.info.is_percpu:
        converted = convert_value(old, new, raw[: old.size])
        return (
            _replicate(converted, new_map.info.value_size) if new_map.info.is_percpu else converted
        )
    old_slot = (old_map.info.value_size + 7) // 8 * 8
    slots = [raw[i * old_slot : i * old_slot + old.size] for i in range(possible_cpus())]
    if not new_map.info.is_percpu:
        raise LayoutError("a per-CPU map cannot be migrated into a shared map")
    new_slot = (new_map.info.value_size + 7) // 8 * 8
    return b"".join(convert_value(old, new, s).ljust(new_slot, b"\0") for s in slots)


def _merge_into(new: BpfMap, key: bytes, base: bytes, theirs: bytes, layout: TypeLayout) -> None:
    """Read-modify-write of one element of a live map. The new program may write the same
    element meanwhile; re-read just before writing and redo the merge if it changed, which
    leaves only the microseconds of one update syscall in which a concurrent write is lost."""
    slot = (new.info.value_size + 7) // 8 * 8 if new.info.is_percpu else len(base)
    for _ in range(MERGE_RETRIES):
        ours = new.lookup(key)
        if ours is None:
            try:
                new.update(key, theirs, BPF_NOEXIST)
                return
            except BpfError:
                continue  # the new program created it meanwhile: merge onto its value
        parts = []
        for i in range(0, len(ours), slot):
            b, t, o = (layout.decode(v[i : i + layout.size]) for v in (base, theirs, ours))
            parts.append(layout.encode(merge_written(b, t, o)).ljust(slot, b"\0"))
        merged = b"".join(parts)[: len(ours)]
        if new.lookup(key) == ours:
            new.update(key, merged, BPF_EXIST)
            return
    raise OSError(f"element kept changing while merging into {new.info.name!r}")


def _decode_value(bmap: BpfMap, layout: TypeLayout, raw: bytes) -> Any:
    if not bmap.info.is_percpu:
        return layout.decode(raw[: layout.size])
    slot = (bmap.info.value_size + 7) // 8 * 8
    values = [layout.decode(raw[i * slot : i * slot + layout.size]) for i in range(possible_cpus())]
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
