"""The kernel objects nfctl keeps per hook: the pinned dispatcher (compiled first when
missing, through the compiler it is given), the chain table and the verdict counter maps,
opened once and held until close."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from nfctl.bpf.syscall import BpfProgram
from nfctl.datapath import dispatcher as disp
from nfctl.datapath.chain import ChainTable
from nfctl.datapath.counters import CounterKey, CounterTable, VerdictCounts, read_pinned
from nfctl.datapath.model import DatapathError
from nfctl.datapath.pins import BpffsPaths, hook_kind
from nfctl.manifest.model import Hook

# Compiles hook's dispatcher and pins it at the path (nfctl.builder.dispatcher).
DispatcherCompiler = Callable[[BpffsPaths, Hook, Path], None]


class HookObjects:
    """Dispatchers per hook; chain tables and counter tables per hook type (xdp, tc)."""

    def __init__(self, paths: BpffsPaths, compiler: DispatcherCompiler | None) -> None:
        self.paths = paths
        self.compiler = compiler
        self._tables: dict[str, ChainTable] = {}
        self._counters: dict[str, CounterTable] = {}
        self._dispatchers: dict[Hook, BpfProgram] = {}

    def close(self) -> None:
        for table in self._tables.values():
            table.close()
        for counters in self._counters.values():
            counters.close()
        for prog in self._dispatchers.values():
            prog.close()
        self._tables.clear()
        self._counters.clear()
        self._dispatchers.clear()

    def dispatcher_pin(self, hook: Hook) -> Path:
        """Where this nfctl's dispatcher for hook is pinned (its build is in the name)."""
        return self.paths.dispatcher(hook, disp.dispatcher_build(hook))

    def dispatcher(self, hook: Hook) -> BpfProgram:
        """The pinned dispatcher for hook, compiled first if it is not pinned yet."""
        if hook not in self._dispatchers:
            pin = self.dispatcher_pin(hook)
            if not pin.exists():
                if self.compiler is None:
                    raise DatapathError(f"no {hook.value} dispatcher is pinned at {pin}")
                self.compiler(self.paths, hook, pin)
            self._dispatchers[hook] = BpfProgram.from_pin(str(pin))
        return self._dispatchers[hook]

    def opened_dispatcher(self, hook: Hook) -> BpfProgram | None:
        """The dispatcher if this process opened it already (no compile, no open)."""
        return self._dispatchers.get(hook)

    def table(self, hook: Hook) -> ChainTable:
        kind = hook_kind(hook)
        if kind not in self._tables:
            if not self.has_tables(hook):
                self.dispatcher(hook)  # its compile creates and pins the chain maps
            self._tables[kind] = ChainTable.open(
                self.paths.chain(kind), self.paths.heads(kind), self.paths.heads_index(kind)
            )
        return self._tables[kind]

    def opened_tables(self) -> list[ChainTable]:
        return list(self._tables.values())

    def counter_table(self, hook: Hook) -> CounterTable:
        kind = hook_kind(hook)
        if kind not in self._counters:
            self._counters[kind] = CounterTable(self.paths.counter_pins(kind))
        return self._counters[kind]

    def has_tables(self, hook: Hook) -> bool:
        kind = hook_kind(hook)
        return self.paths.chain(kind).exists() and self.paths.heads(kind).exists()

    def verdict_counts(self) -> dict[CounterKey, VerdictCounts]:
        """Every NF's verdict counters per attach point, for hook types in use."""
        out: dict[CounterKey, VerdictCounts] = {}
        for kind in ("xdp", "tc"):
            out.update(read_pinned(self.paths.counter_pins(kind)))
        return out
