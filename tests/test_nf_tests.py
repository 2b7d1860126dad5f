"""nfctl test: tests.yaml cases run in the kernel (BPF_PROG_TEST_RUN) on private maps.

One small repository holds two NFs on XDP and a tests file with, for each expectation
kind, a case that must pass and one that must fail; the report must say which, why and
at which line."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import yaml
from junitparser import Failure as JUnitFailure
from junitparser import JUnitXml

from nfctl.bpf import syscall
from nfctl.bpf.abi import entry_name
from nfctl.nftest.results import CaseResult, TestReport
from nfctl.nftest.runner import run_tests
from tests.agent_harness import nfctl
from tests.helpers import prepare_nf, write_nf

# Counts packets per IPv4 source in `seen`, total packets in `hits[0]`; drops sources in
# `blocked` and the third and later packets of any source; sets the TTL of what it passes
# to 7. No kernel headers: compiles in a fraction of a second.
PROBE = r"""
BPF_HASH(blocked, __be32, u8, 64);
BPF_HASH(seen, __be32, u64, 64);
BPF_ARRAY(hits, u64, 2);

int xdp_probe(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    u8 *p = data;
    if (data + 34 > data_end || p[12] != 0x08 || p[13] != 0x00)
        return XDP_PASS;
    __be32 saddr;
    __builtin_memcpy(&saddr, p + 26, 4);
    u32 zero = 0;
    u64 *total = hits.lookup(&zero);
    if (total)
        *total += 1;
    u64 one = 1;
    u64 *n = seen.lookup(&saddr);
    if (n)
        *n += 1;
    else
        seen.update(&saddr, &one);
    if (blocked.lookup(&saddr))
        return XDP_DROP;
    if (n && *n >= 3)
        return XDP_DROP;
    p[22] = 7;
    return XDP_PASS;
}
"""

# Drops IPv4 packets whose TTL is 7: behind the probe (which sets TTL 7) in a chain it drops
# everything the probe passes; alone it passes ordinary packets.
TTL_GUARD = r"""
int xdp_ttl_guard(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    u8 *p = data;
    if (data + 34 > data_end || p[12] != 0x08 || p[13] != 0x00)
        return XDP_PASS;
    return p[22] == 7 ? XDP_DROP : XDP_PASS;
}
"""

PKT = {"ipv4": {"src": "192.0.2.1", "dst": "198.51.100.1"}, "udp": {"dport": 53}}
BLOCKED_PKT = {"ipv4": {"src": "203.0.113.7"}, "udp": {}}

CASES: list[dict[str, object]] = [
    {"name": "verdict ok", "packet": BLOCKED_PKT, "expect": {"verdict": "drop"}},
    {"name": "verdict wrong", "packet": BLOCKED_PKT, "expect": {"verdict": "pass"}},
    {"name": "field ok", "packet": PKT, "expect": {"packet": {"ipv4.ttl": 7}}},
    {
        "name": "field wrong",
        "packet": PKT,
        "expect": {"packet": {"ipv4.ttl": 64, "ipv4.dst": "198.51.100.1"}},
    },
    {
        "name": "map entry ok",
        "packet": PKT,
        "expect": {
            "maps": {
                "seen": [
                    {"key": "192.0.2.1", "value": 1},
                    {"key": "192.0.2.2", "present": False},
                ]
            }
        },
    },
    {
        "name": "map entry wrong",
        "packet": PKT,
        "expect": {"maps": {"seen": [{"key": "192.0.2.2", "present": True}]}},
    },
    {
        "name": "map state before is used",
        "maps": {"seen": [{"key": "192.0.2.1", "value": 10}]},
        "packet": PKT,
        "expect": {"verdict": "drop", "maps": {"seen": [{"key": "192.0.2.1", "value": 11}]}},
    },
    {
        "name": "counter ok",
        "packet": PKT,
        "repeat": 2,
        "expect": {"maps": {"hits": [{"key": 0, "increase": 2}]}},
    },
    {
        "name": "counter wrong",
        "packet": PKT,
        "expect": {"maps": {"hits": [{"key": 0, "increase": 5}]}},
    },
    {
        "name": "sequence ok",
        "sequence": [
            {"packet": PKT, "repeat": 2, "expect": {"verdict": "pass"}},
            {"packet": PKT, "expect": {"verdict": "drop"}},
        ],
    },
    {
        "name": "sequence wrong",
        "sequence": [{"packet": PKT, "repeat": 3, "expect": {"verdict": "pass"}}],
    },
    {
        "name": "chain ok",
        "chain": ["ttl-guard"],
        "packet": PKT,
        "expect": {"verdict": "drop"},
    },
    {
        "name": "chain wrong",
        "chain": ["ttl-guard"],
        "packet": PKT,
        "expect": {"verdict": "pass"},
    },
    {
        "name": "chain stops at the first drop",
        "chain": ["ttl-guard"],
        "packet": BLOCKED_PKT,
        "expect": {"verdict": "drop", "maps": {"seen": [{"key": "203.0.113.7", "value": 1}]}},
    },
    {"name": "shorter than Ethernet", "packet": {"hex": "0102"}, "expect": {"verdict": "pass"}},
]


def _tests_yaml(cases: list[dict[str, object]]) -> str:
    return yaml.safe_dump(
        {"apiVersion": "nfctl.io/v1alpha1", "kind": "NetworkFunctionTests", "cases": cases},
        sort_keys=False,
    )


def _repo(root: Path, cases: list[dict[str, object]]) -> Path:
    write_nf(
        root,
        "probe",
        PROBE,
        "xdp_probe",
        priority=10,
        maps={"blocked": {"managed": True, "entries": [{"key": "203.0.113.7", "value": 1}]}},
    )
    write_nf(root, "ttl-guard", TTL_GUARD, "xdp_ttl_guard", priority=20)
    (root / "probe" / "tests.yaml").write_text(_tests_yaml(cases))
    return root


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> TestReport:
    from tests.conftest import require_kernel

    require_kernel()
    root = _repo(tmp_path_factory.mktemp("nftests"), CASES)
    return run_tests(root, repo_root=root)


def _case(report: TestReport, name: str) -> CaseResult:
    return next(c for c in report.cases if c.name == name)


def _line_of(name: str) -> int:
    lines = _tests_yaml(CASES).splitlines()
    return next(i + 1 for i, line in enumerate(lines) if line.strip() == f"- name: {name}")


@pytest.mark.kernel
def test_every_case_ran_with_no_build_errors(report: TestReport) -> None:
    assert report.errors == []
    assert [c.name for c in report.cases] == [c["name"] for c in CASES]
    for case in report.cases:
        assert case.file == "probe/tests.yaml"
        assert case.line == _line_of(case.name)


@pytest.mark.kernel
@pytest.mark.parametrize(
    "name",
    [
        "verdict ok",
        "field ok",
        "map entry ok",
        "map state before is used",
        "counter ok",
        "sequence ok",
        "chain ok",
        "chain stops at the first drop",
    ],
)
def test_cases_that_must_pass(report: TestReport, name: str) -> None:
    case = _case(report, name)
    assert case.ok, case.failures


@pytest.mark.kernel
def test_wrong_verdict_is_reported(report: TestReport) -> None:
    (failure,) = _case(report, "verdict wrong").failures
    assert failure.kind == "verdict"
    assert failure.message == "expected verdict pass, got drop"


@pytest.mark.kernel
def test_wrong_packet_field_shows_a_diff(report: TestReport) -> None:
    (failure,) = _case(report, "field wrong").failures
    assert failure.kind == "packet"
    assert "ipv4.ttl" in failure.message and "ipv4.dst" not in failure.message
    assert failure.diff[0] == "ipv4.ttl: expected 64, got 7 (was 64)"


@pytest.mark.kernel
def test_missing_map_entry_is_reported(report: TestReport) -> None:
    (failure,) = _case(report, "map entry wrong").failures
    assert failure.kind == "map"
    assert failure.message == "seen[192.0.2.2]: expected present, got absent"


@pytest.mark.kernel
def test_wrong_counter_increase_is_reported(report: TestReport) -> None:
    (failure,) = _case(report, "counter wrong").failures
    assert failure.kind == "map"
    assert failure.message.startswith("hits[0]: expected increase 5, got 1")


@pytest.mark.kernel
def test_sequence_failure_names_the_run(report: TestReport) -> None:
    (failure,) = _case(report, "sequence wrong").failures
    assert failure.kind == "verdict"
    assert (failure.step, failure.run) == (1, 3)
    assert failure.message == "expected verdict pass, got drop"


@pytest.mark.kernel
def test_chain_runs_in_priority_order(report: TestReport) -> None:
    wrong = _case(report, "chain wrong")
    assert wrong.chain == ["probe", "ttl-guard"]
    (failure,) = wrong.failures
    assert failure.message == "expected verdict pass, got drop"


@pytest.mark.kernel
def test_a_packet_the_kernel_refuses_is_a_case_error_not_a_crash(report: TestReport) -> None:
    (failure,) = _case(report, "shorter than Ethernet").failures
    assert failure.kind == "error"
    assert failure.message == "kernel: [Errno 22] BPF_PROG_TEST_RUN: Invalid argument"
    assert failure.line == _line_of("shorter than Ethernet")


@pytest.mark.kernel
def test_cli_json_junit_and_exit_code(tmp_path: Path) -> None:
    root = _repo(tmp_path / "repo", [CASES[0], CASES[1]])
    junit_file = tmp_path / "junit.xml"
    proc = nfctl("test", str(root), "-o", "json", "--junit", str(junit_file), timeout=300)
    assert proc.returncode == 1, proc.stderr
    data = json.loads(proc.stdout)
    assert (data["passed"], data["failed"]) == (1, 1)
    xml = JUnitXml.fromfile(str(junit_file))
    suites = list(xml)
    assert [s.name for s in suites] == ["probe"]
    cases = list(suites[0])
    assert [c.name for c in cases] == ["verdict ok", "verdict wrong"]
    assert cases[0].is_passed
    (failure,) = cases[1].result
    assert isinstance(failure, JUnitFailure)
    assert failure.message == "expected verdict pass, got drop"
    written = _tests_yaml([CASES[0], CASES[1]]).splitlines()
    line = next(i + 1 for i, text in enumerate(written) if text.strip() == "verdict: pass")
    assert failure.text == f"probe/tests.yaml:{line}: verdict: expected verdict pass, got drop"

    (root / "probe" / "tests.yaml").write_text(_tests_yaml([CASES[0]]))
    proc = nfctl("test", str(root), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "✓ probe: verdict ok probe/tests.yaml:4" in proc.stdout


MALFORMED = textwrap.dedent(
    """\
    apiVersion: nfctl.io/v1alpha1
    kind: NetworkFunctionTests
    cases:
      - name: fine
        packet: {ipv4: {src: 192.0.2.1}, udp: {}}
        expect: {verdict: pass}
      - name: typo
        packet: {ipv4: {src: 192.0.2.1}, udp: {}}
        expect:
          verdikt: drop
    """
)


@pytest.mark.kernel
def test_malformed_tests_file_refused_with_file_and_line(tmp_path: Path) -> None:
    root = _repo(tmp_path, [])
    (root / "probe" / "tests.yaml").write_text(MALFORMED)
    for args in (["validate", "--no-compile"], ["test"]):
        proc = nfctl(*args, str(root), "-o", "json", timeout=300)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        data = json.loads(proc.stdout)
        if args == ["test"]:
            errors = data["errors"]
        else:
            errors = [e for nf in data["functions"] for e in nf["errors"]]
        assert {
            "file": "probe/tests.yaml",
            "line": 10,
            "field": "cases.1.expect.verdikt",
            "severity": "error",
            "message": "unknown field (check the spelling; see docs/nf-tests.md)",
        } in errors


@pytest.mark.kernel
def test_tests_never_touch_pinned_maps(tmp_path: Path) -> None:
    """The test build's maps are fresh and unpinned, and the test build is gone (no program
    with its name in the kernel) when the run is over; nothing is left in bpffs."""
    root = _repo(tmp_path, [CASES[0]])
    names = {entry_name(prepare_nf(root, nf).build_hash) for nf in ("probe", "ttl-guard")}
    result = run_tests(root, repo_root=root)
    assert result.ok, result.to_dict()
    alive = []
    for prog_id in syscall.prog_ids():
        try:
            with syscall.BpfProgram.from_id(prog_id) as prog:
                alive.append(prog.info.name)
        except OSError:
            continue  # freed meanwhile
    assert names.isdisjoint(alive)
    assert not list(Path("/sys/fs/bpf").glob(f"nfctl-nftest-{os.getpid()}-*"))


@pytest.mark.kernel
def test_library_is_green() -> None:
    proc = nfctl("test", "bpf/", "-o", "json", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    assert data["untested"] == []
    nfs = {c["nf"] for c in data["cases"]}
    assert nfs == {"blocklist", "counter", "dscp", "ratelimit"}
    assert data["failed"] == 0 and data["passed"] >= 16
