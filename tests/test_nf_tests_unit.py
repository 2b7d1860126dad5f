"""Pure logic of NF tests (no kernel): tests.yaml loading, packets, values, reports."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from junitparser import Error as JUnitError
from junitparser import JUnitXml

from nfctl.bpf.progcopy import CopyError, map_fd_slots, rewrite_map_fds
from nfctl.bpf.syscall import struct_pack_insns
from nfctl.diagnostics import Diagnostic
from nfctl.nftest.load import load_tests
from nfctl.nftest.maps import add_values, matches_increase, subtract_values
from nfctl.nftest.model import Packet
from nfctl.nftest.packet import build_packet, packet_fields, same_value
from nfctl.nftest.results import CaseResult, Failure, TestReport, junit_xml

HEAD = "apiVersion: nfctl.io/v1alpha1\nkind: NetworkFunctionTests\ncases:\n"


def _load(tmp_path: Path, body: str) -> list[tuple[int | None, str]]:
    (tmp_path / "tests.yaml").write_text(HEAD + textwrap.dedent(body))
    loaded = load_tests(tmp_path / "tests.yaml", tmp_path)
    return [(d.line, d.message) for d in loaded.diagnostics]


def test_problems_are_located_at_their_line(tmp_path: Path) -> None:
    body = """\
      - name: a
        packet: {ipv4: {src: 192.0.2.1, tos: 4, dscp: 1}, udp: {}}
        expect: {verdict: pass}
      - name: b
        packet: {udp: {}}
        expect: {verdict: pass}
      - name: c
        sequence:
          - packet: {hex: "zz"}
            expect: {verdict: pass}
      - name: d
        packet: {payload: 10}
        expect: {}
    """
    assert _load(tmp_path, body) == [
        (5, "set either tos or dscp/ecn, not both"),
        (8, "tcp/udp/icmp need an ipv4 or ipv6 layer"),
        (12, "hex must be pairs of hex digits (spaces or ':' allowed)"),
        (16, "expect nothing? give verdict, packet or maps"),
    ]


def test_duplicate_keys_and_case_names_are_refused(tmp_path: Path) -> None:
    dup_key = """\
      - name: a
        name: b
        packet: {payload: 1}
        expect: {verdict: pass}
    """
    assert _load(tmp_path, dup_key) == [(5, "duplicate key 'name'")]
    dup_case = """\
      - name: a
        packet: {payload: 1}
        expect: {verdict: pass}
      - name: a
        packet: {payload: 1}
        expect: {verdict: drop}
    """
    assert _load(tmp_path, dup_case) == [(7, "duplicate case name 'a'")]


def test_yaml_syntax_error_has_a_line(tmp_path: Path) -> None:
    ((line, message),) = _load(tmp_path, "  - name: [unclosed\n")
    assert line == 5 and message.startswith("YAML syntax error: ")


def test_packet_fields_round_trip(tmp_path: Path) -> None:
    spec = Packet.model_validate(
        {"ipv4": {"src": "203.0.113.7", "dscp": 46, "ecn": 1}, "tcp": {"dport": 443, "flags": "SA"}}
    )
    fields = packet_fields(build_packet(spec, tmp_path, tmp_path))
    assert fields["ipv4.src"] == "203.0.113.7"
    assert (fields["ipv4.dscp"], fields["ipv4.ecn"], fields["ipv4.tos"]) == (46, 1, 185)
    assert fields["ipv4.chksumValid"] is True
    assert same_value("AS", fields["tcp.flags"]) and not same_value("S", fields["tcp.flags"])
    assert same_value("2001:DB8::1", "2001:db8::1")
    assert not same_value(True, 1)


def test_pcap_must_stay_inside_the_repository(tmp_path: Path) -> None:
    import pytest

    from nfctl.nftest.packet import PacketError

    spec = Packet.model_validate({"pcap": "../../etc/passwd"})
    with pytest.raises(PacketError, match="outside the repository"):
        build_packet(spec, tmp_path, tmp_path)


def test_counter_arithmetic() -> None:
    assert add_values({"packets": 1, "bytes": 60}, {"packets": 2, "bytes": 40}) == {
        "packets": 3,
        "bytes": 100,
    }
    delta = subtract_values({"packets": 3, "bytes": 100}, {"packets": 1, "bytes": 60})
    assert matches_increase({"packets": 2}, delta)
    assert not matches_increase({"packets": 1}, delta)
    assert matches_increase(5, 5) and not matches_increase(5, 4)


def test_junit_has_failures_and_errors_a_reader_understands(tmp_path: Path) -> None:
    report = TestReport(
        path="nfs",
        cases=[
            CaseResult(nf="fw", name="ok", file="nfs/fw/tests.yaml", line=4),
            CaseResult(
                nf="fw",
                name="bad",
                file="nfs/fw/tests.yaml",
                line=9,
                failures=[Failure("verdict", "expected verdict drop, got pass", line=12)],
            ),
        ],
        errors=[Diagnostic(file="nfs/x/tests.yaml", line=3, message="unknown field")],
    )
    path = tmp_path / "junit.xml"
    path.write_text(junit_xml(report))
    suites = {s.name: list(s) for s in JUnitXml.fromfile(str(path))}
    assert [c.name for c in suites["fw"]] == ["ok", "bad"]
    (failure,) = suites["fw"][1].result
    assert failure.text == "nfs/fw/tests.yaml:12: verdict: expected verdict drop, got pass"
    (error,) = suites["nfctl"][0].result
    assert isinstance(error, JUnitError) and error.message == "unknown field"


def test_pcap_packet_by_index(tmp_path: Path) -> None:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.utils import wrpcap

    frames = [Ether() / IP(src=f"192.0.2.{i}") / UDP(dport=53) for i in (1, 2)]
    wrpcap(str(tmp_path / "capture.pcap"), frames)
    spec = Packet.model_validate({"pcap": "capture.pcap", "index": 1})
    assert build_packet(spec, tmp_path, tmp_path) == bytes(frames[1])
    assert packet_fields(build_packet(spec, tmp_path, tmp_path))["ipv4.src"] == "192.0.2.2"


def _insns(*insns: tuple[int, int, int, int, int]) -> bytes:
    return bytes(struct_pack_insns(list(insns)).raw)


def test_the_private_copy_rewrites_every_map_reference_and_nothing_else() -> None:
    code = _insns(
        (0x18, 1, 1, 0, 7),  # r1 = map fd 7 (BPF_PSEUDO_MAP_FD)
        (0x00, 0, 0, 0, 0),  # its second slot
        (0x18, 2, 0, 0, 7),  # r2 = the plain 64-bit constant 7: not a map
        (0x00, 0, 0, 0, 0),
        (0x18, 3, 2, 0, 9),  # r3 = &map fd 9 value + 16 (BPF_PSEUDO_MAP_VALUE)
        (0x00, 0, 0, 0, 16),
        (0xB7, 0, 0, 0, 7),  # r0 = 7
        (0x95, 0, 0, 0, 0),
    )
    assert list(map_fd_slots(code)) == [(0, 7), (4, 9)]
    rewritten = rewrite_map_fds(code, {7: 40, 9: 41})
    assert rewritten == _insns(
        (0x18, 1, 1, 0, 40),
        (0x00, 0, 0, 0, 0),
        (0x18, 2, 0, 0, 7),
        (0x00, 0, 0, 0, 0),
        (0x18, 3, 2, 0, 41),
        (0x00, 0, 0, 0, 16),
        (0xB7, 0, 0, 0, 7),
        (0x95, 0, 0, 0, 0),
    )


def test_the_private_copy_refuses_a_map_it_has_no_copy_of() -> None:
    code = _insns((0x18, 1, 1, 0, 7), (0x00, 0, 0, 0, 0), (0x95, 0, 0, 0, 0))
    with pytest.raises(CopyError, match="instruction 0 references map fd 7"):
        rewrite_map_fds(code, {8: 40})
    with pytest.raises(CopyError, match="not whole instructions"):
        list(map_fd_slots(code[:-1]))


def test_stale_test_scratch_of_a_dead_process_is_reaped(tmp_path: Path) -> None:
    """A kill -9 during a build leaves the test gate's scratch folder (and the program pinned
    in it, which the kernel keeps until unpinned): the next agent start removes it, but never
    a recent folder, nor one of a process that is alive."""
    import os

    from nfctl.nftest.build import STALE_SCRATCH_SECONDS, reap_stale_scratch

    gone_pid = 2**22 + 1  # above the largest pid_max Linux allows: no such process
    old = tmp_path / f"nfctl-nftest-{gone_pid}-0123abcd"
    recent = tmp_path / f"nfctl-nftest-{gone_pid}-89abcdef"
    mine = tmp_path / f"nfctl-nftest-{os.getpid()}-deadbeef"
    other = tmp_path / "nfctl-nftest-not-ours"
    for folder in (old, recent, mine, other):
        folder.mkdir()
        (folder / "pin").write_text("")
    now = old.stat().st_mtime + STALE_SCRATCH_SECONDS + 1
    os.utime(recent, (now, now))
    removed = reap_stale_scratch(tmp_path, now=now)
    assert removed == [old] and not old.exists()
    assert recent.exists() and mine.exists() and other.exists()
