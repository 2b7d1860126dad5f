"""In-process stand-ins for Git, the builder and the datapath behind the reconciler's Protocols
(nfctl.agent.reconcile.ports), for testing its phases without a kernel.

FakeGit serves revisions that are folders the test writes; FakeKernel keeps chains, pins
and map contents in dicts, "compiles" by reading BPF_HASH/BPF_ARRAY declarations from the
C source and refuses a source with `#error`, at its file and line. Tests change its state
behind the reconciler's back to play drift."""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nfctl.agent.plan import AttachPoint, ChainEntry
from nfctl.agent.source import Revision, SourceError, UntrustedRevisionError
from nfctl.compiler.build import MapInfo
from nfctl.compiler.client import PreparedNF
from nfctl.datapath.counters import CounterKey, VerdictCounts
from nfctl.datapath.datapath import DatapathError, EntrySyncResult, LoadedBuild, MapSwap
from nfctl.datapath.entries import EntryPlan, encode_entries, plan_entries
from nfctl.datapath.observe import AttachPointState, ProgramRef
from nfctl.datapath.records import BuildRecord
from nfctl.diagnostics import Diagnostic
from nfctl.manifest.model import Hook, IncompatibleMapPolicy

_C_TYPES = {"u8": "unsigned char", "u16": "unsigned short", "u32": "unsigned int"}
_C_TYPES["u64"] = "unsigned long long"
_DECL = re.compile(r"BPF_(HASH|ARRAY)\((\w+),\s*(\w+)(?:,\s*(\w+))?(?:,\s*(\d+))?\)")


class FakeGit:
    """A followed ref whose commits are folders under root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.commits: dict[str, Revision] = {}
        self.tip: str | None = None
        self.fetched: str | None = None
        self.down: str | None = None  # fetch fails with this message
        self.untrusted: set[str] = set()
        self._n = itertools.count(1)

    def commit(self, files: dict[str, str], message: str = "change") -> Revision:
        n = next(self._n)
        sha = hashlib.sha1(f"{n}{sorted(files.items())}".encode()).hexdigest()
        snapshot = self.root / sha
        for rel, text in files.items():
            (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / rel).write_text(text)
        snapshot.mkdir(parents=True, exist_ok=True)
        revision = Revision(
            sha, "main", "Ada", "ada@example.org", 1_700_000_000.0 + n, message, snapshot
        )
        self.commits[sha] = revision
        self.tip = sha
        return revision

    def fetch(self) -> str:
        if self.down is not None:
            raise SourceError(self.down)
        if self.tip is None:
            raise SourceError("empty repository")
        self.fetched = self.tip
        return self.tip

    def fetched_sha(self) -> str | None:
        return self.fetched

    def verify(self, sha: str) -> str:
        if sha in self.untrusted:
            raise UntrustedRevisionError(f"{sha[:12]} is not signed by a trusted key")
        return "ada"

    def revision(self, sha: str) -> Revision:
        return self.commits[sha]

    def commit_info(self, sha: str) -> Revision:
        return self.commits[sha]


@dataclass
class FakeKernel:
    interfaces: list[str] = field(default_factory=lambda: ["lo", "eth0", "eth1"])
    chains: dict[AttachPoint, list[ChainEntry]] = field(default_factory=dict)
    foreign: set[AttachPoint] = field(default_factory=set)  # another tool holds the hook
    tracked: set[AttachPoint] = field(default_factory=set)
    builds: dict[tuple[str, str], LoadedBuild] = field(default_factory=dict)  # pinned
    maps: dict[tuple[str, str], dict[bytes, bytes]] = field(default_factory=dict)
    failing: set[AttachPoint] = field(default_factory=set)  # set_chain fails there
    swap_next: set[str] = field(default_factory=set)  # next build of these NFs swaps maps
    compiled: list[str] = field(default_factory=list)
    discarded: list[str] = field(default_factory=list)
    committed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    set_calls: list[AttachPoint] = field(default_factory=list)
    # ("observe", points asked about) and ("set", point), in call order
    calls: list[tuple[str, frozenset[AttachPoint]]] = field(default_factory=list)
    _ids: Any = field(default_factory=lambda: itertools.count(100))

    # reads
    def interface_names(self) -> list[str]:
        return list(self.interfaces)

    def tracked_points(self) -> list[AttachPoint]:
        return sorted(self.tracked)

    def observe(self, desired: dict[tuple[str, Hook], list[str]]) -> list[AttachPointState]:
        self.calls.append(("observe", frozenset(AttachPoint(i, h) for i, h in desired)))
        out = []
        for (ifname, hook), names in sorted(desired.items(), key=lambda kv: str(kv[0])):
            point = AttachPoint(ifname, hook)
            state = AttachPointState(ifname, 1, hook, None, ours=False)
            if ifname not in self.interfaces:
                state.drift.append(f"interface {ifname} is gone")
            elif point in self.foreign:
                state.hook_prog = ProgramRef(999, "other_tool", "beef")
                state.drift.append("a foreign program (id 999) is attached")
            elif point in self.chains:
                state.ours, state.hook_prog = True, ProgramRef(1, "nfctl_dispatch", "d")
                state.chain = [
                    ProgramRef(7, e.nf, "t", e.nf, e.build_hash[:32]) for e in self.chains[point]
                ]
                actual = [e.nf for e in self.chains[point]]
                if actual != names:
                    state.drift.append(f"chain is {actual or 'empty'}, expected {names}")
            elif names:
                state.drift.append(f"nothing attached at {hook.value} (our program was removed)")
            out.append(state)
        return out

    def find_loaded(self, nf: str, build_hash: str) -> LoadedBuild | None:
        build = self.builds.get((nf, build_hash))
        return replace(build, compiled=False, swaps=[]) if build else None

    def verdict_counts(self) -> dict[CounterKey, VerdictCounts]:
        return {}

    def map_count(self, loaded: LoadedBuild, map_name: str) -> int:
        return len(self.maps.get((loaded.nf, map_name), {}))

    def entries_diff(
        self, loaded: LoadedBuild, map_name: str, entries: list[tuple[Any, Any]]
    ) -> EntryPlan:
        return self._plan(loaded, map_name, entries)

    # builds
    def prepare_hooks(self, hooks: set[Hook]) -> None:
        pass

    def build(
        self,
        prepared: PreparedNF,
        policies: dict[str, IncompatibleMapPolicy],
        test_pin: Path | None,
    ) -> LoadedBuild:
        nf = prepared.nf
        self.compiled.append(nf.name)
        assert prepared.bundle is not None
        text = prepared.bundle.main_text
        for number, line in enumerate(text.splitlines(), 1):
            if line.startswith("#error"):
                where = Diagnostic(prepared.bundle.main_rel, line[6:].strip(), line=number)
                raise DatapathError("compile failed", [where])
        maps = []
        for kind, name, a, b, size in _DECL.findall(text):
            key, value = ("u32", a) if kind == "ARRAY" else (a, b)
            width = {"u8": 1, "u16": 2, "u32": 4, "u64": 8}
            maps.append(
                MapInfo(
                    name,
                    kind.lower(),
                    1,
                    width[key],
                    width[value],
                    int(size or 1024),
                    0,
                    _C_TYPES[key],
                    _C_TYPES[value],
                )
            )
            self.maps.setdefault((nf.name, name), {})
        record = BuildRecord(nf.name, nf.spec.attach.hook.value, prepared.build_hash, "p", maps)
        swaps = []
        if nf.name in self.swap_next:
            self.swap_next.discard(nf.name)
            swaps = [MapSwap(maps[0].name, Path("/staged"), Path("/final"), migrated_entries=3)]
        loaded = LoadedBuild(record, Path("/fake") / nf.name, next(self._ids), "tag", True, swaps)
        self.builds[(nf.name, prepared.build_hash)] = loaded
        return loaded

    def discard(self, loaded: LoadedBuild) -> None:
        self.builds.pop((loaded.nf, loaded.build_hash), None)
        self.discarded.append(loaded.nf)

    # kernel effects
    def _plan(
        self, loaded: LoadedBuild, map_name: str, entries: list[tuple[Any, Any]]
    ) -> EntryPlan:
        key_codec, value_codec = loaded.record.codecs(map_name)
        info = loaded.record.map(map_name)
        desired = encode_entries(entries, key_codec, value_codec)
        current = self.maps[(loaded.nf, map_name)]
        return plan_entries(current, desired, info.map_type, info.value_size)

    def sync_entries(
        self, loaded: LoadedBuild, map_name: str, entries: list[tuple[Any, Any]]
    ) -> EntrySyncResult:
        plan = self._plan(loaded, map_name, entries)
        current = self.maps[(loaded.nf, map_name)]
        current.update(plan.upserts)
        for key in plan.deletes:
            del current[key]
        return EntrySyncResult(map_name, plan.added, plan.updated, len(plan.deletes), len(entries))

    def set_chain(
        self,
        point: AttachPoint,
        entries: list[ChainEntry],
        xdp_mode: str,
        take_over: bool,
        position: str,
    ) -> str | None:
        self.set_calls.append(point)
        self.calls.append(("set", frozenset([point])))
        if point in self.failing or point.ifname not in self.interfaces:
            raise DatapathError(f"cannot attach at {point}")
        if point in self.foreign and not take_over:
            raise DatapathError(f"{point} is held by another program")
        for e in entries:
            if (e.nf, e.build_hash) not in self.builds:
                raise DatapathError(f"{e.nf} build {e.build_hash[:12]} is not pinned")
        self.foreign.discard(point)
        self.chains[point] = list(entries)
        self.tracked.add(point)
        return "native" if point.hook is Hook.XDP else "tcx"

    def clear_chain(self, point: AttachPoint) -> None:
        self.chains.pop(point, None)
        self.tracked.discard(point)

    def reap(self) -> None:
        pass

    def commit(self, loaded: LoadedBuild) -> None:
        self.committed.append(loaded.nf)

    def remove_nf(self, nf: str) -> None:
        self.removed.append(nf)
        self.builds = {k: v for k, v in self.builds.items() if k[0] != nf}
        self.maps = {k: v for k, v in self.maps.items() if k[0] != nf}

    def release_versions(self, nf: str, keep: set[str]) -> None:
        self.builds = {
            (n, h): b for (n, h), b in self.builds.items() if n != nf or h in keep or h[:32] in keep
        }

    # what a user would check
    def chain(self, ifname: str, hook: Hook = Hook.XDP) -> list[str]:
        return [e.nf for e in self.chains.get(AttachPoint(ifname, hook), [])]

    def entries(self, nf: str, map_name: str) -> dict[int, int]:
        return {
            int.from_bytes(k, "little"): int.from_bytes(v, "little")
            for k, v in self.maps[(nf, map_name)].items()
        }


def manifest(
    name: str,
    *,
    hook: str = "xdp",
    priority: int = 100,
    interfaces: tuple[str, ...] = ("eth*",),
    entries: dict[int, int] | None = None,
    selector: dict[str, str] | None = None,
    suspend: bool = False,
    version: str = "1.0.0",
) -> str:
    lines = [
        "apiVersion: nfctl.io/v1alpha1",
        "kind: NetworkFunction",
        f"metadata: {{name: {name}}}",
        "spec:",
        f"  version: {version}",
        f"  suspend: {str(suspend).lower()}",
        "  program: {source: prog.c, function: run}",
        f"  attach: {{hook: {hook}, interfaces: [{', '.join(interfaces)}], priority: {priority}}}",
    ]
    if selector:
        lines.append(f"  nodeSelector: {{{', '.join(f'{k}: {v}' for k, v in selector.items())}}}")
    if entries is not None:
        rows = ", ".join(f"{{key: {k}, value: {v}}}" for k, v in entries.items())
        lines += ["  maps:", f"    rules: {{managed: true, entries: [{rows}]}}"]
    return "\n".join(lines) + "\n"


def program(body: str = "return XDP_PASS;", extra: str = "") -> str:
    return f"BPF_HASH(rules, u32, u32, 64);\n{extra}int run(struct xdp_md *ctx) {{ {body} }}\n"


def nf_files(name: str, source: str | None = None, **kwargs: Any) -> dict[str, str]:
    return {
        f"nfs/{name}/nf.yaml": manifest(name, **kwargs),
        f"nfs/{name}/prog.c": source or program(),
    }
