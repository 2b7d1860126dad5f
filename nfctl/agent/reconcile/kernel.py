"""The real builder and datapath behind BuilderPort and DatapathPort: the Builder compiles,
loads, pins and migrates; the Datapath does kernel operations only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nfctl.agent.plan import AttachPoint, ChainEntry
from nfctl.bpf.syscall import BpfMap
from nfctl.builder.builder import Builder
from nfctl.compiler.client import PreparedNF
from nfctl.datapath.counters import CounterKey, VerdictCounts
from nfctl.datapath.datapath import ChainMember, Datapath, EntrySyncResult, LoadedBuild
from nfctl.datapath.entries import EntryPlan
from nfctl.datapath.observe import AttachPointState
from nfctl.manifest.model import Hook, IncompatibleMapPolicy


class KernelDatapath:
    def __init__(self, datapath: Datapath, builder: Builder | None = None) -> None:
        self.datapath = datapath
        self.builder = builder or Builder(datapath)

    # reads
    def interface_names(self) -> list[str]:
        return [i.name for i in self.datapath.interfaces()]

    def tracked_points(self) -> list[AttachPoint]:
        return [
            AttachPoint(ifname, Hook(h))
            for ifname, entry in self.datapath.tracked_interfaces().items()
            for h in entry.get("hooks", [])
        ]

    def observe(self, desired: dict[tuple[str, Hook], list[str]]) -> list[AttachPointState]:
        return self.datapath.observe(desired)

    def find_loaded(self, nf: str, build_hash: str) -> LoadedBuild | None:
        return self.datapath.find_loaded(nf, build_hash)

    def verdict_counts(self) -> dict[CounterKey, VerdictCounts]:
        return self.datapath.verdict_counts()

    def map_count(self, loaded: LoadedBuild, map_name: str) -> int:
        """Entries in one of the build's maps; -1 when the pin cannot be read."""
        try:
            with BpfMap.from_pin(str(loaded.map_pin(self.datapath.paths, map_name))) as bmap:
                return bmap.count()
        except OSError:
            return -1

    def entries_diff(
        self, loaded: LoadedBuild, map_name: str, entries: list[tuple[Any, Any]]
    ) -> EntryPlan:
        return self.datapath.entries_diff(loaded, map_name, entries)

    # builds
    def prepare_hooks(self, hooks: set[Hook]) -> None:
        for hook in hooks:
            self.builder.ensure_dispatcher(hook)  # the shared chain maps, before parallel builds

    def build(
        self,
        prepared: PreparedNF,
        policies: dict[str, IncompatibleMapPolicy],
        test_pin: Path | None,
    ) -> LoadedBuild:
        return self.builder.build(prepared, policies, test_pin)

    def discard(self, loaded: LoadedBuild) -> None:
        self.datapath.discard(loaded)

    # kernel effects
    def sync_entries(
        self, loaded: LoadedBuild, map_name: str, entries: list[tuple[Any, Any]]
    ) -> EntrySyncResult:
        return self.datapath.sync_entries(loaded, map_name, entries)

    def set_chain(
        self,
        point: AttachPoint,
        entries: list[ChainEntry],
        xdp_mode: str,
        take_over: bool,
        position: str,
    ) -> str | None:
        members = [
            ChainMember(e.nf, e.build_hash, self.datapath.paths.prog_pin(e.nf, e.build_hash))
            for e in entries
        ]
        return self.datapath.set_chain(
            point.ifname,
            point.hook,
            members,
            xdp_mode=xdp_mode,
            take_over=take_over,
            position=position,
        )

    def clear_chain(self, point: AttachPoint) -> None:
        self.datapath.clear_chain(point.ifname, point.hook)

    def reap(self) -> None:
        self.datapath.reap()

    def commit(self, loaded: LoadedBuild) -> None:
        self.builder.commit(loaded)

    def remove_nf(self, nf: str) -> None:
        self.datapath.remove_nf(nf)

    def release_versions(self, nf: str, keep: set[str]) -> None:
        self.datapath.release_versions(nf, keep)
