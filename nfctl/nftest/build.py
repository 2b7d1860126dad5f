"""Compile NFs for tests and hold them loaded, unattached, with private maps.

The build goes through the same confined compile worker as `nfctl validate`, with no map
pins (fresh maps, never the live pinned ones). The worker pins only the program, in a
scratch folder of bpffs, so it outlives the worker; this process opens the pin and removes
it at once: the program and its maps live exactly as long as our file descriptor.

In a test build the wrapper's chain (prog array) is empty, so its tail call to the next
slot fails and the wrapper returns the NF's own verdict (TC: TC_ACT_UNSPEC for 'go on').
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from nfctl.bpf import syscall
from nfctl.bpf.codec import CodecError
from nfctl.bpf.mapinfo import MapInfo, map_codecs
from nfctl.compiler.client import PreparedNF, build_request, run_parallel
from nfctl.compiler.codegen import BuildPins
from nfctl.diagnostics import Diagnostic
from nfctl.doctor import BPFFS
from nfctl.manifest.model import Hook
from nfctl.nftest.maps import TestMap

BPF_OBJ_NAME_LEN = 16


@dataclass
class TestProgram:
    prepared: PreparedNF
    fd: int
    maps: dict[str, TestMap] = field(default_factory=dict)
    compile_seconds: float = 0.0
    _manifest_entries: list[tuple[TestMap, bytes, bytes]] | None = None

    @property
    def name(self) -> str:
        return self.prepared.nf.name

    @property
    def hook(self) -> Hook:
        return self.prepared.nf.spec.attach.hook

    @property
    def priority(self) -> int:
        return self.prepared.nf.spec.attach.priority

    def load_manifest_entries(self) -> None:
        """The managed entries from nf.yaml, as the agent would write them (encoded once:
        every case starts from them)."""
        if self._manifest_entries is None:
            self._manifest_entries = []
            for map_name, spec in self.prepared.nf.spec.maps.items():
                test_map = self.maps.get(map_name)
                if test_map is None or not spec.managed:
                    continue
                for entry in spec.entries:
                    key, value = test_map.encode(entry.key, entry.value)
                    self._manifest_entries.append((test_map, key, value))
        for test_map, key, value in self._manifest_entries:
            test_map.write_raw(key, value)

    def close(self) -> None:
        for test_map in self.maps.values():
            test_map.map.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class TestBuilds:
    programs: dict[str, TestProgram] = field(default_factory=dict)
    errors: dict[str, list[Diagnostic]] = field(default_factory=dict)

    def close(self) -> None:
        for program in self.programs.values():
            program.close()


def load_for_tests(prepared: list[PreparedNF]) -> TestBuilds:
    builds = TestBuilds()
    scratch = BPFFS / f"nfctl-nftest-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    # Tests judge what the NF decides: in monitor mode the chain would let it pass anyway.
    requests = [
        replace(
            build_request(p, install=True, pins=BuildPins(), prog_pin_path=str(scratch / f"p{i}")),
            monitor=False,
        )
        for i, p in enumerate(prepared)
    ]
    try:
        results = run_parallel(requests)
        for one, request, result in zip(prepared, requests, results, strict=True):
            name = one.nf.name
            if not result.ok or request.prog_pin_path is None:
                builds.errors[name] = result.diagnostics or [
                    Diagnostic(file=one.source_name, message="build failed")
                ]
                continue
            fd = syscall.obj_get(request.prog_pin_path)
            program = TestProgram(
                prepared=one, fd=fd, compile_seconds=result.compile_seconds + result.load_seconds
            )
            builds.programs[name] = program
            try:
                _open_maps(program, result.maps)
            except (OSError, CodecError) as exc:
                builds.errors[name] = [
                    Diagnostic(file=one.source_name, message=f"cannot open the test maps: {exc}")
                ]
                builds.programs.pop(name).close()
    finally:
        remove_scratch(scratch)
    return builds


SCRATCH_NAME = re.compile(r"^nfctl-nftest-(\d+)-[0-9a-f]{8}$")
# a scratch folder lives for one test run (seconds); older ones whose process is gone were
# left by a crash or a kill, and hold pinned programs the kernel keeps until unpinned
STALE_SCRATCH_SECONDS = 600.0


def reap_stale_scratch(root: Path = BPFFS, now: float | None = None) -> list[Path]:
    """Remove test scratch folders left by processes that died (kill -9 during a build).
    Only folders older than STALE_SCRATCH_SECONDS: a process in another PID namespace (a
    `nfctl test` on the host, seen from a containerised agent) looks dead from here."""
    now = time.time() if now is None else now
    removed = []
    with contextlib.suppress(OSError):
        for folder in root.iterdir():
            match = SCRATCH_NAME.match(folder.name)
            if match is None or not folder.is_dir():
                continue
            try:
                if now - folder.stat().st_mtime < STALE_SCRATCH_SECONDS:
                    continue
            except OSError:
                continue
            if _alive(int(match.group(1))):
                continue
            remove_scratch(folder)
            if not folder.exists():
                removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def scratch_pin(name: str) -> Path:
    """Where a compile worker may pin a program for tests: a fresh folder of bpffs."""
    return BPFFS / f"nfctl-nftest-{os.getpid()}-{uuid.uuid4().hex[:8]}" / name


def load_private_copy(prepared: PreparedNF, pin: Path, infos: list[MapInfo]) -> TestBuilds:
    """Take the live build's private copy that the worker pinned at pin (see
    nfctl.bpf.progcopy): no compile. The pin and its folder are removed at once."""
    builds = TestBuilds()
    try:
        program = TestProgram(prepared=prepared, fd=syscall.obj_get(str(pin)))
    finally:
        remove_scratch(pin.parent)
    builds.programs[program.name] = program
    try:
        _open_maps(program, infos)
    except (OSError, CodecError) as exc:
        builds.errors[program.name] = [
            Diagnostic(file=prepared.source_name, message=f"cannot open the test maps: {exc}")
        ]
        builds.programs.pop(program.name).close()
    return builds


def _open_maps(program: TestProgram, infos: list[MapInfo]) -> None:
    """The program's maps by the names the C source gives them (the kernel keeps 15
    characters of a map name; BCC names each map after its table)."""
    by_kernel_name: dict[str, list[syscall.BpfMap]] = {}
    for map_id in syscall.prog_info(program.fd).map_ids:
        opened = syscall.BpfMap.from_id(map_id)
        by_kernel_name.setdefault(opened.info.name, []).append(opened)
    source = program.prepared.bundle.main_text if program.prepared.bundle else ""
    try:
        for info in infos:
            candidates = [
                m
                for m in by_kernel_name.get(info.name[: BPF_OBJ_NAME_LEN - 1], [])
                if m.info.key_size == info.key_size and m.info.value_size == info.value_size
            ]
            if len(candidates) != 1:
                raise OSError(f"map {info.name!r} not found once among the program's maps")
            key_codec, value_codec = map_codecs(info, source)
            program.maps[info.name] = TestMap(candidates[0], info, key_codec, value_codec)
    finally:
        kept = {id(m.map) for m in program.maps.values()}
        for group in by_kernel_name.values():
            for opened in group:
                if id(opened) not in kept:
                    opened.close()


def remove_scratch(scratch: Path) -> None:
    if not scratch.is_dir():
        return
    for pin in scratch.iterdir():
        with contextlib.suppress(OSError):
            pin.unlink()
    with contextlib.suppress(OSError):
        scratch.rmdir()
