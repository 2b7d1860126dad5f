"""The one-NF version swap fast path (nfctl.datapath.chains): on a live chain of five NFs
plus a sentinel, a swap writes the new version into its slot in place, under a ping flood
that must lose nothing and bypass nothing; any other change still builds a fresh range.
A detach by another tool (once observed, as every reconcile pass observes first), a
restart and a second writer all fall back to the full path."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from benchmarks.common import Flood
from benchmarks.update_loss import ChainBuilds, _counted, load_chain
from nfctl.bpf.syscall import prog_fd_by_id
from nfctl.datapath.chains import LiveChain, swap_offset
from nfctl.datapath.counters import CounterKey
from nfctl.datapath.datapath import ChainMember, Datapath
from nfctl.datapath.model import LoadedBuild
from nfctl.manifest.model import Hook
from nfctl.netns import VethPair
from tests.foreign import detach_links

HOOK = Hook.TC_INGRESS


def _members(builds: list[LoadedBuild]) -> list[ChainMember]:
    return [ChainMember(b.nf, b.build_hash, b.prog_pin) for b in builds]


def _chain(chain: ChainBuilds, versions: list[int]) -> list[LoadedBuild]:
    """The five NFs at the given versions (1 or 2), then the sentinel."""
    pairs, _extra, sentinel = chain
    return [pair[v - 1] for pair, v in zip(pairs, versions, strict=True)] + [sentinel]


def _head(dp: Datapath, veth: VethPair) -> int | None:
    return dp.table(HOOK).head(dp.ifindex(veth.a_if), HOOK)


def _ids(dp: Datapath, veth: VethPair) -> list[int] | None:
    return dp.chain_prog_ids(veth.a_if, HOOK)


# -- pure: which changes are a one-NF swap ----------------------------------------------
def test_swap_offset_only_for_one_changed_version() -> None:
    a1, a2, b1, b2, c1 = (Path(p) for p in ("a/1", "a/2", "b/1", "b/2", "c/1"))
    live = LiveChain(7, 0, (("a", a1), ("b", b1)), "tcx")
    assert swap_offset(live, [("a", a1), ("b", b2)]) == 1
    assert swap_offset(live, [("a", a2), ("b", b1)]) == 0
    assert swap_offset(live, [("a", a2), ("b", b2)]) is None  # two NFs
    assert swap_offset(live, [("a", a1), ("b", b1)]) is None  # same chain: drift repair
    assert swap_offset(live, [("b", b1), ("a", a1)]) is None  # reorder
    assert swap_offset(live, [("a", a1)]) is None  # remove
    assert swap_offset(live, [("a", a1), ("b", b1), ("c", c1)]) is None  # add
    assert swap_offset(live, [("a", a1), ("c", c1)]) is None  # another NF in the slot
    assert swap_offset(None, [("a", a1)]) is None  # nothing known (restart)


# -- real kernel and packets ----------------------------------------------------------------
@pytest.mark.kernel
def test_one_nf_swap_patches_only_its_slot_under_traffic(
    datapath: Datapath, veth: VethPair, tmp_path: Path
) -> None:
    chain = load_chain(datapath, tmp_path / "repo", HOOK)
    pairs, _extra, sentinel = chain
    start = _chain(chain, [1, 1, 1, 1, 1])
    datapath.set_chain(veth.a_if, HOOK, _members(start))
    base = _head(datapath, veth)
    ids = _ids(datapath, veth)
    assert ids == [b.prog_id for b in start]
    ifindex = datapath.ifindex(veth.a_if)
    middle = CounterKey("c2", ifindex, HOOK)
    counted_before = _counted(datapath, sentinel, HOOK)
    flood = Flood(veth.ns_b, veth.a_ip, preload=64)
    try:
        for step in range(1, 41):
            version = 2 if step % 2 else 1
            datapath.set_chain(veth.a_if, HOOK, _members(_chain(chain, [1, 1, version, 1, 1])))
            # the same range stays live; only the middle slot's program changed
            assert _head(datapath, veth) == base
            assert _ids(datapath, veth) == [*ids[:2], pairs[2][version - 1].prog_id, *ids[3:]]
            datapath.reap()
    finally:
        sent, received = flood.stop()
    counted = _counted(datapath, sentinel, HOOK) - counted_before
    assert sent > 100
    assert (sent - received, received - counted) == (0, 0), (sent, received, counted)
    # the middle NF's verdict counters went on across versions (same slot label)
    assert datapath.verdict_counts()[middle].packets >= counted

    # two NFs at once: a fresh range behind the head switch, never two in-place writes
    two = _chain(chain, [2, 1, 1, 2, 1])
    datapath.set_chain(veth.a_if, HOOK, _members(two))
    assert _head(datapath, veth) != base
    assert _ids(datapath, veth) == [b.prog_id for b in two]


@pytest.mark.kernel
def test_swap_after_an_observed_foreign_detach_attaches_again(
    datapath: Datapath, veth: VethPair, bpffs_root: Path, tmp_path: Path
) -> None:
    chain = load_chain(datapath, tmp_path / "repo", HOOK)
    datapath.set_chain(veth.a_if, HOOK, _members(_chain(chain, [1, 1, 1, 1, 1])))
    ifindex = datapath.ifindex(veth.a_if)
    ours = datapath.dispatcher(HOOK).info.prog_id
    assert datapath.attached_prog_id(ifindex, HOOK) == ours
    assert detach_links(bpffs_root, HOOK.value) == 1  # as `bpftool link detach` would
    assert datapath.attached_prog_id(ifindex, HOOK) == 0
    # the observation every reconcile pass makes before changing anything sees it, and
    # the swap that follows takes the full path: a fresh range and our dispatcher again
    (state,) = [s for s in datapath.observe() if (s.ifname, s.hook) == (veth.a_if, HOOK)]
    assert not state.ours
    swapped = _chain(chain, [1, 2, 1, 1, 1])
    assert datapath.set_chain(veth.a_if, HOOK, _members(swapped)) == "tcx"
    assert datapath.attached_prog_id(ifindex, HOOK) == ours
    assert _ids(datapath, veth) == [b.prog_id for b in swapped]
    sentinel = chain[2]
    before = _counted(datapath, sentinel, HOOK)
    flood = Flood(veth.ns_b, veth.a_ip)
    sent, received = flood.stop()
    assert received == sent > 0  # our chain runs again: every ping passed and was counted
    assert _counted(datapath, sentinel, HOOK) - before == received


@pytest.mark.kernel
def test_restart_and_second_writer_take_the_full_path(
    datapath: Datapath, veth: VethPair, bpffs_root: Path, tmp_path: Path
) -> None:
    chain = load_chain(datapath, tmp_path / "repo", HOOK)
    datapath.set_chain(veth.a_if, HOOK, _members(_chain(chain, [1, 1, 1, 1, 1])))
    first = _head(datapath, veth)
    # another process on the same pins (an agent after a restart) knows no live chain:
    # its first swap builds a fresh range, the next one patches that range in place
    other = Datapath(bpffs_root, tmp_path / "state", netns=veth.ns_a)
    try:
        other.set_chain(veth.a_if, HOOK, _members(_chain(chain, [1, 1, 1, 1, 2])))
        second = _head(other, veth)
        assert second != first
        other.set_chain(veth.a_if, HOOK, _members(_chain(chain, [1, 1, 1, 1, 1])))
        assert _head(other, veth) == second
    finally:
        other.close()
    # the first writer's picture is stale (its range is not the head): no in-place write
    # into a range packets no longer use, a fresh range with exactly the wanted chain
    wanted = _chain(chain, [2, 1, 1, 1, 1])
    datapath.set_chain(veth.a_if, HOOK, _members(wanted))
    assert _head(datapath, veth) not in (first, second)
    assert _ids(datapath, veth) == [b.prog_id for b in wanted]


def _in_kernel(prog_id: int) -> bool:
    try:
        os.close(prog_fd_by_id(prog_id))
    except OSError as exc:
        assert exc.errno == errno.ENOENT, exc
        return False
    return True


@pytest.mark.kernel
def test_swapped_out_version_is_freed_once_released(
    datapath: Datapath, veth: VethPair, tmp_path: Path
) -> None:
    """The swap keeps program fds open for a swap back (a rollback); releasing a version
    must still let the kernel free it: no fd of ours outlives its pin."""
    chain = load_chain(datapath, tmp_path / "repo", HOOK)
    pairs, _extra, _sentinel = chain
    for versions in ([1, 1, 1, 1, 1], [1, 1, 2, 1, 1], [1, 1, 1, 1, 1], [1, 1, 2, 1, 1]):
        datapath.set_chain(veth.a_if, HOOK, _members(_chain(chain, versions)))
    old, new = pairs[2]
    assert _ids(datapath, veth) == [b.prog_id for b in _chain(chain, [1, 1, 2, 1, 1])]
    datapath.reap(force=True)
    assert _in_kernel(old.prog_id)  # pinned, and the fd kept for a swap back
    assert datapath.release_versions("c2", keep={new.build_hash}) == [old.build_hash[:32]]
    deadline = time.monotonic() + 10
    while _in_kernel(old.prog_id) and time.monotonic() < deadline:
        time.sleep(0.1)  # the kernel frees a program after an RCU grace period
    assert not _in_kernel(old.prog_id)
    assert _in_kernel(new.prog_id)
    # the chain still runs the kept version, and a swap to it again is a slot write
    assert _ids(datapath, veth) == [b.prog_id for b in _chain(chain, [1, 1, 2, 1, 1])]
