"""The builder: from a prepared NF to a program pinned and ready to attach.

Compile, verify, load and pin run in the compile worker (nfctl.compiler); what is pinned
and where comes from the datapath's bpffs paths; maps whose declaration changed are staged
and migrated (nfctl.builder.migrate). Nothing attached changes here: attaching is the
datapath's job, as Cilium keeps compiling apart from attaching."""

from __future__ import annotations

import time
from pathlib import Path

from nfctl.bpf.codec import CodecError, declared_types, network_order_fields
from nfctl.builder.dispatcher import compile_dispatcher
from nfctl.builder.migrate import IN_FLIGHT_GRACE_S, copy_into_staged, merge_late_writes
from nfctl.compiler.build import BuildResult
from nfctl.compiler.client import PreparedNF, build_request, run_worker
from nfctl.compiler.codegen import BuildPins
from nfctl.datapath.datapath import Datapath, DatapathError, LoadedBuild, MapSwap
from nfctl.datapath.pins import hook_kind, remove_tree
from nfctl.datapath.records import BuildRecord
from nfctl.diagnostics import Diagnostic
from nfctl.manifest.model import Hook, IncompatibleMapPolicy


class BuildError(DatapathError):
    """A build that cannot go live (compile, verifier, map policy or migration); the running
    version stays. A DatapathError, so callers that handle the datapath's refusals handle it."""


class Builder:
    """Builds NF versions for one datapath: compile (in the worker), verify, load, pin, and
    migrate maps; adopts a version already pinned instead of compiling it again.

    build() returns a LoadedBuild that nothing runs yet; the caller attaches it with
    Datapath.set_chain and, once it is live everywhere, calls commit() to put migrated maps
    in place, or Datapath.discard() to drop it."""

    def __init__(self, datapath: Datapath) -> None:
        self.datapath = datapath

    def ensure_dispatcher(self, hook: Hook) -> None:
        """Compile and pin hook's dispatcher (and so the chain maps) if it is not pinned yet."""
        pin = self.datapath.dispatcher_pin(hook)
        if not pin.exists():
            compile_dispatcher(self.datapath.paths, hook, pin)
        self.datapath.dispatcher(hook)

    def build(
        self,
        prepared: PreparedNF,
        policy: dict[str, IncompatibleMapPolicy] | None = None,
        test_pin: Path | None = None,
    ) -> LoadedBuild:
        """Compile, verify, load and pin a build, or adopt it if already pinned.

        Nothing attached changes here. Incompatible pinned maps follow the NF's policy:
        fail (error), recreate (fresh map) or migrate (fresh map filled from the old)."""
        nf = prepared.nf.name
        adopted = self.datapath.find_loaded(nf, prepared.build_hash)
        if adopted is not None:
            return adopted
        hook = prepared.nf.spec.attach.hook
        self.ensure_dispatcher(hook)  # chain maps must exist before NFs reference them
        # and the counter maps, created as the wrapper declares them
        self.datapath.counter_table(hook)
        prog_pin = self.datapath.paths.prog_pin(nf, prepared.build_hash)
        base_pins = self._nf_pins(nf, hook)
        result = self._compile(prepared, base_pins, prog_pin, test_pin)
        swaps: list[MapSwap] = []
        if result.mismatches:
            policy = policy or {}
            refuse = [
                m
                for m in result.mismatches
                if policy.get(m.name, IncompatibleMapPolicy.MIGRATE) is IncompatibleMapPolicy.FAIL
            ]
            if refuse:
                raise BuildError(
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
            staging = self.datapath.paths.staging_dir(nf, tag)
            remove_tree(staging)
            staged_pins = BuildPins(
                maps_dir=base_pins.maps_dir,
                chain_path=base_pins.chain_path,
                cursor_path=base_pins.cursor_path,
                counters_path=base_pins.counters_path,
                slots_path=base_pins.slots_path,
                staged_maps=tuple((m.name, str(staging)) for m in result.mismatches),
                all_map_names=tuple(m.name for m in result.maps),
            )
            result = self._compile(prepared, staged_pins, prog_pin, test_pin)
            if not result.ok:
                remove_tree(staging)
                raise BuildError("build failed", result.diagnostics)
            swaps = [
                MapSwap(name, staging / name, self.datapath.paths.map_pin(nf, name))
                for name, _ in staged_pins.staged_maps
            ]
        elif not result.ok:
            raise BuildError("build failed", result.diagnostics)
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
            previous = self._previous_record(nf, record.build_hash) if swaps else None
            for swap in swaps:
                if policy and policy.get(swap.name) is IncompatibleMapPolicy.RECREATE:
                    continue
                if previous is not None:
                    swap.migrated_entries = copy_into_staged(swap, previous, record)
        except (CodecError, OSError) as exc:
            self.datapath.discard(loaded)
            raise BuildError(
                f"migrating map data failed, the running version is kept: {exc}",
                [Diagnostic(file=record.nf, message=f"map migration failed: {exc}")],
            ) from exc
        self.datapath.records.save(record)
        return loaded

    def _nf_pins(self, nf: str, hook: Hook) -> BuildPins:
        kind = hook_kind(hook)
        return BuildPins(
            maps_dir=str(self.datapath.paths.maps_dir(nf)),
            chain_path=str(self.datapath.paths.chain(kind)),
            cursor_path=str(self.datapath.paths.cursor(kind)),
            counters_path=str(self.datapath.paths.counter_pins(kind).counters),
            slots_path=str(self.datapath.paths.counter_pins(kind).slots),
        )

    def _compile(
        self, prepared: PreparedNF, pins: BuildPins, prog_pin: Path, test_pin: Path | None = None
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
        candidates = [
            r for r in self.datapath.records.all() if r.nf == nf and r.build_hash != exclude
        ]
        live = {p.name for p in self.datapath.paths.pinned_progs(nf)}
        pinned = [r for r in candidates if r.build_hash[:32] in live]
        best = pinned or candidates
        return best[-1] if best else None

    def commit(self, loaded: LoadedBuild) -> None:
        """After the new version is live everywhere: merge what the old version wrote since
        the copy, then put the fresh maps in place."""
        if any(swap.copied is not None for swap in loaded.swaps):
            time.sleep(IN_FLIGHT_GRACE_S)
        for swap in loaded.swaps:
            swap.merged_entries = merge_late_writes(swap)
        self.datapath.put_staged_maps(loaded)
