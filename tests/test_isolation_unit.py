"""Pure logic of NF isolation: reading helper calls from xlated instructions, judging what
a loaded NF references, and the shape of the generated code after the author's source."""

from __future__ import annotations

import re
import struct

from nfctl.compiler.codegen import WRAPPER_FILE, BuildPins, ChainNames, nf_program
from nfctl.compiler.isolation import (
    BPF_FUNC_TAIL_CALL,
    ProgramRefs,
    TableRef,
    check_isolation,
    helper_calls,
)
from nfctl.manifest.model import Hook


def insn(code: int, regs: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, regs, off, imm)


def test_helper_calls_reads_only_helper_calls() -> None:
    program = (
        insn(0xB7, 0x01, 0, 12)  # r1 = 12: not a call
        + insn(0x85, 0x00, 0, BPF_FUNC_TAIL_CALL)  # tail call as the kernel dumps it
        + insn(0x85, 0x10, 0, 7)  # bpf-to-bpf call (src_reg 1): not a helper
        + insn(0x85, 0x00, 0, -123456)  # another helper, as an address offset
        + insn(0x95)  # exit
    )
    assert helper_calls(program) == frozenset({BPF_FUNC_TAIL_CALL, -123456})
    assert helper_calls(insn(0x85, 0x10, 0, BPF_FUNC_TAIL_CALL)) == frozenset()


OWN = TableRef("blocked", 10, 1, "/bpf/nfs/a/maps/blocked", 10)
CHAIN = [
    TableRef("nfctl_chain_x", 1, 3, "/bpf/xdp/chain", 1),
    TableRef("nfctl_cursor_x", 2, 6, "/bpf/xdp/cursor", 2),
]
CLEAN_PROBE = ProgramRefs(frozenset({10}), frozenset({-5}))
CLEAN_WRAPPED = ProgramRefs(frozenset({1, 2, 10}), frozenset({-5, BPF_FUNC_TAIL_CALL}))


def test_a_confined_nf_passes() -> None:
    assert check_isolation([OWN], CHAIN, CLEAN_PROBE, CLEAN_WRAPPED) == []


def test_probe_reaching_the_chain_is_refused() -> None:
    probe = ProgramRefs(frozenset({10, 2}), frozenset())
    [problem] = check_isolation([OWN], CHAIN, probe, CLEAN_WRAPPED)
    assert "chain's internal state" in problem


def test_a_map_not_at_its_own_pin_is_refused() -> None:
    foreign = TableRef("blocked_v4", 20, 1, "/bpf/nfs/a/maps/blocked_v4", None)
    probe = ProgramRefs(frozenset({10, 20}), frozenset())
    wrapped = ProgramRefs(CLEAN_WRAPPED.map_ids | {20}, CLEAN_WRAPPED.helper_calls)
    problems = check_isolation([OWN, foreign], CHAIN, probe, wrapped)
    assert any("not the map nfctl pinned at /bpf/nfs/a/maps/blocked_v4" in p for p in problems)
    assert any("'blocked_v4' (id 20), which is not one of its own maps" in p for p in problems)


def test_maps_holding_program_or_map_references_are_refused() -> None:
    prog_array = TableRef("jump", 11, 3, "/bpf/nfs/a/maps/jump", 11)
    [problem] = check_isolation([OWN, prog_array], CHAIN, CLEAN_PROBE, CLEAN_WRAPPED)
    assert "'jump' is a prog_array" in problem


def test_a_tail_call_in_the_nf_is_refused() -> None:
    probe = ProgramRefs(frozenset({10}), frozenset({BPF_FUNC_TAIL_CALL}))
    [problem] = check_isolation([OWN], CHAIN, probe, CLEAN_WRAPPED)
    assert "bpf_tail_call" in problem


def test_altered_chaining_code_is_refused() -> None:
    no_tail_call = ProgramRefs(frozenset({1, 2, 10}), frozenset())
    no_cursor = ProgramRefs(frozenset({1, 10}), frozenset({BPF_FUNC_TAIL_CALL}))
    moved_chain = [TableRef("nfctl_chain_x", 3, 3, "/bpf/xdp/chain", 1), CHAIN[1]]
    for wrapped, chain in ((no_tail_call, CHAIN), (no_cursor, CHAIN)):
        [problem] = check_isolation([OWN], chain, CLEAN_PROBE, wrapped)
        assert "chaining code was altered" in problem
    moved = ProgramRefs(frozenset({3, 2, 10}), frozenset({BPF_FUNC_TAIL_CALL}))
    assert any(
        "generated chain table" in p
        for p in check_isolation([OWN], moved_chain, CLEAN_PROBE, moved)
    )


def test_verify_only_builds_skip_the_pin_comparison() -> None:
    unpinned = TableRef("blocked", 10, 1)
    chain = [TableRef(t.name, t.map_id, t.map_type) for t in CHAIN]
    assert check_isolation([unpinned], chain, CLEAN_PROBE, CLEAN_WRAPPED) == []


AUTHOR = "int f(struct xdp_md *ctx) { return XDP_PASS; }\n#define if(c) if (0)\n"


def generated(names: ChainNames) -> tuple[str, str]:
    text = nf_program(
        source_rel="f/f.c",
        source_text=AUTHOR,
        function="f",
        hook=Hook.XDP,
        build_hash="ab" * 32,
        pins=BuildPins(),
        names=names,
    )
    before, _, after = text.partition(AUTHOR)
    return before, after


def test_chain_internals_follow_the_author_source_under_fresh_names() -> None:
    names = ChainNames.fresh()
    assert names != ChainNames.fresh()
    before, after = generated(names)
    for name in (names.chain, names.cursor, names.probe):
        assert name not in before
        assert name in after
    assert "nfctl_chain" not in before and "nfctl_cursor" not in before


def test_every_identifier_of_the_generated_code_is_undefined_first() -> None:
    _, after = generated(ChainNames.fresh())
    undefs, _, code = after.partition(f'#line 1 "{WRAPPER_FILE}"\n')
    undefined = set(re.findall(r"^#undef (\w+)$", undefs, re.M))
    used = set(re.findall(r"[A-Za-z_]\w*", re.sub(r'"[^"]*"', "", code)))
    assert {"if", "int", "unsigned", "call", "lookup", "ctx"} <= used
    assert used <= undefined
