"""The agent's test gate runs on a private copy of the live build (no second compile):
the copy's maps are fresh, so the live pinned maps keep their ids and contents, and a
failing case still refuses the version."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

from nfctl.bpf import syscall
from nfctl.builder.builder import Builder
from nfctl.compiler.client import PreparedNF
from nfctl.datapath.datapath import Datapath, LoadedBuild
from nfctl.nftest.build import remove_scratch, scratch_pin
from nfctl.nftest.gate import gate_problems
from nfctl.nftest.maps import _cpus
from tests.helpers import REPO_ROOT, prepare_nf

pytestmark = pytest.mark.kernel

ON_COPY = "ran on the live build's private copy"


def blocklist_repo(root: Path, version: str, broken: bool = False) -> PreparedNF:
    """The library blocklist with its tests.yaml (its cases write blocked_v4 and count
    drops), a new version each call so each is a new build."""
    folder = root / "blocklist"
    shutil.copytree(REPO_ROOT / "bpf" / "blocklist", folder, dirs_exist_ok=True)
    source = (REPO_ROOT / "bpf" / "blocklist" / "blocklist.c").read_text()
    if broken:  # compiles and verifies, but no longer drops listed IPv4 sources
        source = source.replace("return count_drop(0);", "return XDP_PASS;")
    (folder / "blocklist.c").write_text(f"{source}\n// version {version}\n")
    manifest = (REPO_ROOT / "bpf" / "blocklist" / "nf.yaml").read_text()
    (folder / "nf.yaml").write_text(manifest.replace("version: 1.0.0", f"version: {version}"))
    return prepare_nf(root, "blocklist")


def live_state(datapath: Datapath) -> dict[str, tuple[int, list[tuple[bytes, bytes]]]]:
    """Every pinned map of the blocklist: its id and its entries."""
    state = {}
    for pin in datapath.paths.pinned_maps("blocklist"):
        with syscall.BpfMap.from_pin(str(pin)) as live:
            state[pin.name] = (live.info.map_id, sorted(live.items()))
    return state


def running_blocklist(datapath: Datapath, root: Path) -> LoadedBuild:
    """Version 1 with live data a test would destroy: a rule of its own, 77 drops counted."""
    v1 = Builder(datapath).build(blocklist_repo(root, "1.0.0"))
    datapath.sync_entries(v1, "blocked_v4", [("192.0.2.55", 1), ("203.0.113.7", 1)])
    with syscall.BpfMap.from_pin(str(datapath.paths.map_pin("blocklist", "drops"))) as drops:
        drops.update((0).to_bytes(4, "little"), (77).to_bytes(8, "little") * _cpus())
    return v1


def program_map_ids(pin: Path) -> set[int]:
    fd = syscall.obj_get(str(pin))
    try:
        return set(syscall.prog_info(fd).map_ids)
    finally:
        os.close(fd)


def test_gate_runs_on_a_private_copy_and_never_touches_live_maps(
    datapath: Datapath, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    running_blocklist(datapath, tmp_path)
    before = live_state(datapath)
    assert before["drops"][1] and before["blocked_v4"][1]

    prepared = blocklist_repo(tmp_path, "1.1.0")
    v2 = Builder(datapath).build(prepared, test_pin=scratch_pin("blocklist"))
    assert v2.compiled and v2.test_copy_error == ""
    assert v2.test_pin is not None and v2.test_pin.exists()
    live_ids = {map_id for map_id, _ in before.values()}
    assert live_ids <= program_map_ids(v2.prog_pin)  # the new live build uses the live maps
    assert not live_ids & program_map_ids(v2.test_pin)  # its copy none of them

    caplog.set_level(logging.INFO, logger="nfctl.nftest.gate")
    problems = gate_problems(prepared, tmp_path, tmp_path, v2.test_pin, v2.record.maps)
    assert problems == []
    assert f"tests of blocklist {ON_COPY}: 6 case(s), 0 failed" in caplog.text
    # the cases cleared the maps, wrote a rule and counted drops, all on the copy
    assert live_state(datapath) == before
    assert not v2.test_pin.parent.exists()  # the scratch pin went with the gate


def test_gate_on_the_private_copy_refuses_a_version_whose_tests_fail(
    datapath: Datapath, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    running_blocklist(datapath, tmp_path)
    before = live_state(datapath)

    prepared = blocklist_repo(tmp_path, "1.1.0", broken=True)
    v2 = Builder(datapath).build(prepared, test_pin=scratch_pin("blocklist"))
    assert v2.test_pin is not None and v2.test_copy_error == ""

    caplog.set_level(logging.INFO, logger="nfctl.nftest.gate")
    problems = gate_problems(prepared, tmp_path, tmp_path, v2.test_pin, v2.record.maps)
    # both IPv4 drop cases fail: the listed source and the case's own added rule
    assert f"tests of blocklist {ON_COPY}: 6 case(s), 2 failed" in caplog.text
    lines = (tmp_path / "blocklist" / "tests.yaml").read_text().splitlines()
    drop_lines = [i + 1 for i, line in enumerate(lines) if "verdict: drop" in line]
    assert [(p.file, p.line) for p in problems] == [
        ("blocklist/tests.yaml", drop_lines[0]),
        ("blocklist/tests.yaml", drop_lines[2]),
    ]
    assert problems[0].message.startswith(
        "test 'drops a listed IPv4 source' failed: expected verdict drop, got pass"
    )
    assert live_state(datapath) == before


def test_gate_falls_back_to_a_test_build_for_chain_cases(
    datapath: Datapath, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A case with a chain needs the other members, which have no private copy: the gate
    compiles test builds of its own, and still decides."""
    shutil.copytree(REPO_ROOT / "bpf" / "ratelimit", tmp_path / "ratelimit")
    prepared = blocklist_repo(tmp_path, "1.0.0")
    tests_path = tmp_path / "blocklist" / "tests.yaml"
    chain_case = """
  - name: a listed source is dropped before the rate limiter
    chain: [ratelimit]
    packet:
      ipv4: {src: 203.0.113.7}
      udp: {}
    expect:
      verdict: drop
"""
    tests_path.write_text(tests_path.read_text() + chain_case)
    loaded = Builder(datapath).build(prepared, test_pin=scratch_pin("blocklist"))
    assert loaded.test_pin is not None

    caplog.set_level(logging.INFO, logger="nfctl.nftest.gate")
    problems = gate_problems(prepared, tmp_path, tmp_path, loaded.test_pin, loaded.record.maps)
    assert problems == []
    assert "tests of blocklist ran on a test build of their own: 7 case(s), 0 failed" in (
        caplog.text
    )
    remove_scratch(loaded.test_pin.parent)  # what the agent does after the gate
