"""Pure logic around the verdict counters and monitor mode: decoding per-CPU counter
values, summing per NF for the status, the generated verdict classes, spec.mode in
manifests and in the build identity."""

from __future__ import annotations

import struct
from pathlib import Path

from nfctl.agent.reconcile.node_status import verdict_totals
from nfctl.bpf.abi import COUNTER_FIELDS
from nfctl.compiler.build import build_hash
from nfctl.compiler.codegen import (
    BuildPins,
    ChainNames,
    nf_program,
)
from nfctl.compiler.source_guard import SourceBundle
from nfctl.datapath.counters import CounterKey, decode
from nfctl.manifest.model import Hook, Mode
from nfctl.wire.convert import status_to_proto
from nfctl.wire.status import NFState, NFStatus, NodeStatus
from tests.test_manifest_unit import base, errors, load, only_error


def entry(values: list[int]) -> bytes:
    return struct.pack(f"<{COUNTER_FIELDS}Q", *values)


def test_per_cpu_values_are_summed_by_mode_and_verdict() -> None:
    cpu0 = entry([5, 1, 0, 0, 0, 2, 0, 0, 3])  # enforce pass/drop, monitor drop, errors
    cpu1 = entry([7, 0, 4, 1, 0, 0, 0, 9, 0])
    counts = decode(cpu0 + cpu1, 2)
    assert counts.enforce == {"pass": 12, "drop": 1, "redirect": 4, "other": 1}
    assert counts.monitor == {"pass": 0, "drop": 2, "redirect": 0, "other": 9}
    assert counts.errors == 3 and counts.packets == 12 + 1 + 4 + 1 + 2 + 9


def test_status_totals_sum_an_nf_over_its_attach_points() -> None:
    one = decode(entry([3, 1, 0, 0, 0, 0, 0, 0, 1]), 1)
    two = decode(entry([4, 2, 0, 0, 0, 5, 0, 0, 0]), 1)
    other = decode(entry([9, 0, 0, 0, 0, 0, 0, 0, 0]), 1)
    totals = verdict_totals(
        {
            CounterKey("fw", 2, Hook.XDP): one,
            CounterKey("fw", 3, Hook.XDP): two,
            CounterKey("mark", 2, Hook.TC_EGRESS): other,
        }
    )
    fw = totals["fw"].dump()
    assert fw["enforce"] == {"passed": 7, "dropped": 3, "redirected": 0, "other": 0}
    assert fw["monitor"]["dropped"] == 5 and fw["chainErrors"] == 1
    assert totals["mark"].enforce.passed == 9


def generated(
    hook: Hook,
    monitor: bool,
    counters: bool = True,
    fixed_slot: int | None = None,
    fixed_counter_id: int | None = None,
) -> str:
    text = nf_program(
        source_rel="nf.c",
        source_text="int f(void *ctx) { return 1; }\n",
        function="f",
        hook=hook,
        build_hash="a" * 64,
        pins=BuildPins(),
        names=ChainNames.fresh(),
        monitor=monitor,
        counters=counters,
        fixed_slot=fixed_slot,
        fixed_counter_id=fixed_counter_id,
    )
    return text.split('#line 1 "<nfctl-generated>"')[1]


def test_verdict_classes_per_hook() -> None:
    xdp = generated(Hook.XDP, monitor=False)
    assert "if (verdict == 2) k = 0;" in xdp  # XDP_PASS
    assert "if (verdict == 1 || verdict == 0) k = 1;" in xdp  # DROP, ABORTED
    assert "if (verdict == 4 || verdict == 3) k = 2;" in xdp  # REDIRECT, TX
    assert "c->v[0 + k] += 1;" in xdp  # enforce fields
    tc = generated(Hook.TC_INGRESS, monitor=False)
    assert "if (verdict == 0 || verdict == -1) k = 0;" in tc  # OK, UNSPEC
    assert "if (verdict == 2) k = 1;" in tc and "if (verdict == 7) k = 2;" in tc


def test_monitor_mode_counts_in_its_own_fields_and_always_goes_on() -> None:
    text = generated(Hook.XDP, monitor=True)
    assert "c->v[4 + k] += 1;" in text
    assert "if (1) {" in text
    assert "c->v[" not in generated(Hook.XDP, monitor=False, counters=False)


def test_a_fixed_slot_replaces_the_cursor_only_in_the_design_probe() -> None:
    agent = generated(Hook.XDP, monitor=False)
    assert "unsigned int slot = *pos;" in agent and "*pos = next;" in agent
    probe = generated(Hook.XDP, monitor=False, fixed_slot=3)
    assert "unsigned int slot = 3;" in probe
    assert "*pos" not in probe and "unsigned int next = slot + 1;" in probe
    assert ".lookup(&slot)" in agent and ".lookup(&slot)" in probe  # the slot's counter label


def test_a_fixed_counter_id_replaces_the_slot_label_only_in_the_design_probe() -> None:
    probe = generated(Hook.XDP, monitor=False, fixed_slot=3, fixed_counter_id=7)
    assert "unsigned int id_value = 7, *id = &id_value;" in probe
    assert ".lookup(&slot)" not in probe and ".lookup(id)" in probe


def test_mode_is_part_of_the_build_identity() -> None:
    bundle = SourceBundle(main_rel="nf.c", main_text="x")
    enforce = build_hash(bundle, "f", [], Hook.XDP)
    assert build_hash(bundle, "f", [], Hook.XDP, monitor=True) != enforce
    assert build_hash(bundle, "f", [], Hook.XDP, monitor=False) == enforce


def test_spec_mode_defaults_to_enforce_and_rejects_unknown_values(tmp_path: Path) -> None:
    loaded = load(tmp_path, base())
    assert not errors(loaded) and loaded.nf.spec.mode is Mode.ENFORCE
    monitor = load(tmp_path, base().replace("  program:", "  mode: monitor\n  program:"))
    assert not errors(monitor) and monitor.nf.spec.mode is Mode.MONITOR
    bad = load(tmp_path, base().replace("  program:", "  mode: audit\n  program:"))
    field, line, message = only_error(bad)
    assert (field, line) == ("spec.mode", 7) and "'enforce' or 'monitor'" in message


def test_the_controller_gets_the_totals_and_mode() -> None:
    totals = verdict_totals(
        {CounterKey("fw", 2, Hook.XDP): decode(entry([3, 1] + [0] * 5 + [2, 1]), 1)}
    )
    status = NodeStatus(
        node="n1",
        functions=[
            NFStatus(name="fw", state=NFState.APPLIED, mode="monitor", verdicts=totals["fw"]),
            NFStatus(name="new", state=NFState.PENDING),
        ],
    )
    fw, new = status_to_proto(status).functions
    assert fw.mode == "monitor"
    assert (fw.verdicts.enforce.passed, fw.verdicts.enforce.dropped) == (3, 1)
    assert fw.verdicts.monitor.other == 2 and fw.verdicts.chain_errors == 1
    assert not new.HasField("verdicts")
