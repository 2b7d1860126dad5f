"""Run one tests.yaml case against NFs loaded for tests (BPF_PROG_TEST_RUN, private maps).

Chains: an NF that lets a packet go on (pass) hands the same, possibly rewritten, packet to
the next NF in priority order; the first other verdict ends the chain. That is what the
chaining wrapper does with tail calls on a node, so a chain case runs each NF's test build
in turn with the previous one's output packet (the wrapper cannot tail-call here: each test
build has its own empty prog array).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nfctl import progress
from nfctl.bpf.codec import CodecError
from nfctl.compiler.client import PreparedNF
from nfctl.manifest.model import Hook
from nfctl.nftest import kernel
from nfctl.nftest.build import TestBuilds, TestProgram
from nfctl.nftest.load import LoadedTests
from nfctl.nftest.maps import TestMap, matches_increase, subtract_values, zero_like
from nfctl.nftest.model import Case, MapCheck, Step
from nfctl.nftest.packet import PacketError, build_packet, packet_fields, same_value
from nfctl.nftest.results import CaseResult, Failure, TestReport

XDP_VERDICTS = {0: "aborted", 1: "drop", 2: "pass", 3: "tx", 4: "redirect"}
# The wrapper turns TC_ACT_OK into TC_ACT_UNSPEC (-1) at the end of a chain: both go on.
TC_VERDICTS = {-1: "pass", 0: "pass", 2: "drop", 7: "redirect", 1: "reclassify", 3: "pipe"}


def verdict_name(hook: Hook, retval: int) -> str:
    names = XDP_VERDICTS if hook is Hook.XDP else TC_VERDICTS
    return names.get(retval, str(retval))


@dataclass
class Suite:
    """One NF's tests file and the NFs its cases need."""

    prepared: PreparedNF
    tests: LoadedTests


def case_path(index: int) -> str:
    return f"cases.{index}"


def _step_path(case: Case, case_index: int, step_index: int) -> str:
    base = case_path(case_index)
    return f"{base}.sequence.{step_index}" if case.sequence else base


_Check = tuple[MapCheck, TestMap, bytes]
Packets = dict[int, bytes | PacketError]  # id(Packet spec) -> its bytes


def build_packets(suites: list[Suite], repo_root: Path) -> Packets:
    """Every test packet, built before the runs (the agent overlaps this with compiling)."""
    packets: Packets = {}
    root = repo_root.resolve()
    for suite in suites:
        assert suite.tests.tests is not None
        for case in suite.tests.tests.cases:
            for step in case.steps():
                try:
                    packets[id(step.packet)] = build_packet(
                        step.packet, suite.tests.path.parent, root
                    )
                except PacketError as exc:
                    packets[id(step.packet)] = exc
    return packets


class _CaseRun:
    def __init__(
        self,
        suite: Suite,
        case: Case,
        index: int,
        programs: list[TestProgram],
        packets: Packets,
    ) -> None:
        self.suite, self.case, self.index = suite, case, index
        self.programs = programs  # the chain, in priority order
        self.own = suite.prepared.nf.name
        self.packets = packets
        self.result = CaseResult(
            nf=self.own,
            name=case.name,
            file=suite.tests.rel_path,
            line=suite.tests.line_of(case_path(index)),
            chain=[p.name for p in programs] if case.chain else [],
        )

    def line(self, path: str) -> int | None:
        return self.suite.tests.line_of(path)

    def fail(self, kind: str, message: str, path: str, **extra: Any) -> None:
        self.result.failures.append(Failure(kind, message, line=self.line(path), **extra))

    def map_ref(self, ref: str, path: str) -> TestMap | None:
        nf, _, name = ref.rpartition("/")
        nf = nf or self.own
        program = next((p for p in self.programs if p.name == nf), None)
        if program is None:
            self.fail("error", f"map {ref!r}: NF {nf!r} is not in this case's chain", path)
            return None
        test_map = program.maps.get(name)
        if test_map is None:
            known = ", ".join(sorted(program.maps)) or "none"
            self.fail("error", f"map {name!r} is not declared by {nf} (declared: {known})", path)
        return test_map

    def run(self) -> CaseResult:
        started = time.monotonic()
        try:
            self._prepare_maps()
            if self.result.ok:
                for step_index, step in enumerate(self.case.steps()):
                    if not self._run_step(step, step_index):
                        break
        except OSError as exc:  # e.g. the kernel refuses a packet shorter than Ethernet
            self.fail("error", f"kernel: {exc}", case_path(self.index))
        finally:
            self.result.seconds = time.monotonic() - started
        return self.result

    def _prepare_maps(self) -> None:
        for program in self.programs:
            for private in program.maps.values():
                private.clear()
            try:
                program.load_manifest_entries()
            except CodecError as exc:
                message = f"{program.name}: an entry of nf.yaml does not fit its map: {exc}"
                self.fail("error", message, case_path(self.index))
        for ref, entries in self.case.maps.items():
            base = f"{case_path(self.index)}.maps.{ref}"
            test_map = self.map_ref(ref, base)
            if test_map is None:
                continue
            for entry_index, entry in enumerate(entries):
                try:
                    test_map.write(entry.key, entry.value)
                except CodecError as exc:
                    self.fail("error", f"{ref}: {exc}", f"{base}.{entry_index}")
                except OSError as exc:
                    self.fail("error", f"{ref}: cannot write entry: {exc}", f"{base}.{entry_index}")

    def _run_step(self, step: Step, step_index: int) -> bool:
        path = _step_path(self.case, self.index, step_index)
        shown_step = step_index + 1 if self.case.sequence else None
        packet = self.packets[id(step.packet)]
        if isinstance(packet, PacketError):
            self.fail("error", str(packet), f"{path}.packet", step=shown_step)
            return False
        checks = self._resolve_checks(step, path)
        if checks is None:
            return False
        before = {id(c): self._read(m, key) for c, m, key in checks if c.increase is not None}
        expect = step.expect
        out = packet
        for run in range(1, step.repeat + 1):
            verdict, retval, out = self._run_chain(packet)
            self.result.runs += 1
            if expect.verdict is not None and not _verdict_matches(expect.verdict, verdict, retval):
                self.fail(
                    "verdict",
                    f"expected verdict {expect.verdict}, got {verdict}",
                    f"{path}.expect.verdict",
                    step=shown_step,
                    run=run if step.repeat > 1 else None,
                )
                return False
        ok = True
        if expect.packet:
            ok = self._check_packet(expect.packet, packet, out, path, shown_step) and ok
        for check, test_map, key in checks:
            ok = (
                self._check_map(check, test_map, key, before.get(id(check)), path, shown_step)
                and ok
            )
        return ok

    def _run_chain(self, packet: bytes) -> tuple[str, int, bytes]:
        verdict, retval = "pass", 0
        for program in self.programs:
            result = kernel.test_run(program.fd, packet)
            retval = result.retval
            verdict = verdict_name(program.hook, retval)
            packet = result.packet
            if verdict != "pass":
                break
        return verdict, retval, packet

    def _resolve_checks(
        self, step: Step, path: str
    ) -> list[tuple[MapCheck, TestMap, bytes]] | None:
        resolved = []
        ok = True
        for ref, checks in step.expect.maps.items():
            base = f"{path}.expect.maps.{ref}"
            found = self.map_ref(ref, base)
            if found is None:
                ok = False
                continue
            test_map = found
            for check_index, check in enumerate(checks):
                try:
                    key = test_map.key_codec.encode(check.key)
                    if check.value is not None:
                        test_map.value_codec.encode(check.value)
                except CodecError as exc:
                    self.fail("error", f"{ref}: {exc}", f"{base}.{check_index}")
                    ok = False
                    continue
                resolved.append((check, test_map, key))
        return resolved if ok else None

    @staticmethod
    def _read(test_map: TestMap, key: bytes) -> Any:
        raw = test_map.read_raw(key)
        return None if raw is None else test_map.decode(raw)

    def _check_packet(
        self, expected: dict[str, Any], before: bytes, after: bytes, path: str, step: int | None
    ) -> bool:
        fields_before = packet_fields(before)
        fields_after = packet_fields(after)
        wrong = [
            name
            for name, want in expected.items()
            if name not in fields_after or not same_value(want, fields_after[name])
        ]
        if not wrong:
            return True
        diff = []
        for name in wrong:
            got = fields_after.get(name, "(missing)")
            was = fields_before.get(name, "(missing)")
            change = f"unchanged from {was}" if was == got else f"was {was}"
            diff.append(f"{name}: expected {expected[name]!r}, got {got!r} ({change})")
        changed = [
            f"{name}: {fields_before.get(name)!r} -> {value!r}"
            for name, value in fields_after.items()
            if fields_before.get(name) != value and name not in wrong
        ]
        if changed:
            diff.append("other changes: " + "; ".join(changed))
        self.fail(
            "packet",
            f"{len(wrong)} packet field(s) differ: {', '.join(wrong)}",
            f"{path}.expect.packet.{wrong[0]}",
            step=step,
            diff=diff,
        )
        return False

    def _check_map(
        self,
        check: MapCheck,
        test_map: TestMap,
        key: bytes,
        before: Any,
        path: str,
        step: int | None,
    ) -> bool:
        raw = test_map.read_raw(key)
        got = None if raw is None else test_map.decode(raw)
        name = test_map.info.name
        shown_key = check.key
        where = f"{path}.expect.maps"
        if check.present is not None:
            if (raw is not None) == check.present:
                return True
            state = "present" if raw is not None else "absent"
            want = "present" if check.present else "absent"
            self.fail(
                "map",
                f"{name}[{shown_key}]: expected {want}, got {state}"
                + (f" (value {got!r})" if raw is not None else ""),
                where,
                step=step,
            )
            return False
        if check.value is not None:
            want_raw = test_map.value_codec.encode(check.value)
            if raw == want_raw:
                return True
            self.fail(
                "map",
                f"{name}[{shown_key}]: expected {check.value!r}, got "
                + ("absent" if raw is None else repr(got)),
                where,
                step=step,
            )
            return False
        after = got if got is not None else None
        if after is None:
            self.fail(
                "map", f"{name}[{shown_key}]: expected an increase, entry absent", where, step=step
            )
            return False
        base = before if before is not None else zero_like(after)
        delta = subtract_values(after, base)
        if matches_increase(check.increase, delta):
            return True
        self.fail(
            "map",
            f"{name}[{shown_key}]: expected increase {check.increase!r}, got {delta!r}"
            f" ({base!r} -> {after!r})",
            where,
            step=step,
        )
        return False


def _verdict_matches(expected: str | int, name: str, retval: int) -> bool:
    if isinstance(expected, int):
        return expected == retval
    return expected == name


def run_suites(
    suites: list[Suite], builds: TestBuilds, packets: Packets, report: TestReport
) -> None:
    started = time.monotonic()
    for suite in suites:
        assert suite.tests.tests is not None
        own = suite.prepared.nf.name
        if own not in builds.programs:
            continue
        progress.note(f"{own}: running {len(suite.tests.tests.cases)} case(s)")
        for index, case in enumerate(suite.tests.tests.cases):
            members = {own, *case.chain}
            programs = sorted(
                (builds.programs[m] for m in members if m in builds.programs),
                key=lambda p: (p.priority, p.name),
            )
            if len(programs) != len(members):
                continue  # a member failed to build: reported as a build error
            report.cases.append(_CaseRun(suite, case, index, programs, packets).run())
    report.run_seconds += time.monotonic() - started
