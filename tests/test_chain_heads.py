"""Where the dispatcher finds an attach point's chain: the heads array for small
ifindexes, the hash beyond it, and the array repaired from the hash when they disagree."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest

from nfctl.bpf import syscall
from nfctl.bpf.abi import CHAIN_SLOTS, HEADS_INDEXED_IFINDEXES, HEADS_MAX, head_index
from nfctl.datapath.chain import ChainTable, head_key
from nfctl.datapath.datapath import Datapath
from nfctl.manifest.model import Hook
from nfctl.netns import VethPair
from tests.test_datapath import HOOKS, load_counting, member, seen, set_flag

pytestmark = pytest.mark.kernel

MAP_TYPE_HASH = 1
MAP_TYPE_PROG_ARRAY = 3


@pytest.mark.parametrize("hook", HOOKS, ids=lambda h: h.value)
def test_an_interface_beyond_the_heads_array_is_filtered_through_the_hash(
    bpffs_root: Path, tmp_path: Path, hook: Hook
) -> None:
    index = HEADS_INDEXED_IFINDEXES + random.randrange(1000, 30000)
    with VethPair.create(a_index=index) as pair:
        dp = Datapath(bpffs_root, tmp_path / "state", netns=pair.ns_a)
        try:
            assert dp.ifindex(pair.a_if) == index
            nf = load_counting(dp, tmp_path, "nf", hook)
            dp.set_chain(pair.a_if, hook, [member(nf)])
            assert pair.ping_a_from_b(3) == 3
            assert seen(dp, nf, hook) == 3
            set_flag(dp, nf, True)  # the NF drops: the chain runs on this interface
            assert pair.ping_a_from_b(3, timeout_s=0.3) == 0
            assert seen(dp, nf, hook) == 6
            dp.clear_chain(pair.a_if, hook)
            assert pair.ping_a_from_b(2) == 2
        finally:
            dp.teardown()


def _pinned(path: Path, map_type: int, key_size: int, value_size: int, entries: int) -> None:
    fd = syscall.map_create(map_type, key_size, value_size, entries)
    try:
        syscall.obj_pin(fd, str(path))
    finally:
        os.close(fd)


def _array(table: ChainTable) -> dict[int, int]:
    values = memoryview(table.heads_index.array_values()).cast("I")
    return {index: value for index, value in enumerate(values) if value}


def test_the_heads_array_is_created_and_repaired_from_the_hash(bpffs_root: Path) -> None:
    """A root pinned before the array existed (or changed by an agent without it) gets an
    array that says what the hash says, stale entries cleared."""
    bpffs_root.mkdir(parents=True)
    chain, heads, index_pin = bpffs_root / "chain", bpffs_root / "heads", bpffs_root / "index"
    _pinned(chain, MAP_TYPE_PROG_ARRAY, 4, 4, CHAIN_SLOTS)
    _pinned(heads, MAP_TYPE_HASH, 8, 4, HEADS_MAX)
    beyond = HEADS_INDEXED_IFINDEXES + 7
    with syscall.BpfMap.from_pin(str(heads)) as raw_heads:
        for ifindex, hook, base in (
            (5, Hook.XDP, 0),
            (7, Hook.TC_INGRESS, 64),
            (beyond, Hook.TC_EGRESS, 96),
        ):
            raw_heads.update(head_key(ifindex, hook), struct.pack("<I", base))

    table = ChainTable.open(chain, heads, index_pin)
    try:
        assert index_pin.exists()
        # base + 1: 0 means no chain; the ifindex beyond the array is only in the hash
        assert _array(table) == {head_index(5, Hook.XDP): 1, head_index(7, Hook.TC_INGRESS): 65}
        # what an older agent leaves: a head removed from the hash only, one moved
        stale = head_index(9, Hook.XDP)
        assert stale is not None
        table.heads_index.update(struct.pack("<I", stale), struct.pack("<I", 33))
        table.heads.update(head_key(5, Hook.XDP), struct.pack("<I", 32))
    finally:
        table.close()

    table = ChainTable.open(chain, heads, index_pin)
    try:
        assert _array(table) == {head_index(5, Hook.XDP): 33, head_index(7, Hook.TC_INGRESS): 65}
        table.remove(7, Hook.TC_INGRESS)
        assert _array(table) == {head_index(5, Hook.XDP): 33}
        assert table.head(7, Hook.TC_INGRESS) is None
        assert table.repair_index() == 0
    finally:
        table.close()
