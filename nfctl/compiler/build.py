"""What to build, how a build is identified, and what a build produced."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from nfctl.bpf.abi import CODEGEN_VERSION
from nfctl.bpf.mapinfo import MapInfo
from nfctl.compiler.codegen import BuildPins
from nfctl.compiler.source_guard import SourceBundle
from nfctl.diagnostics import Diagnostic
from nfctl.manifest.model import Hook
from nfctl.system import bcc_version, kernel_release


def build_hash(
    bundle: SourceBundle, function: str, cflags: list[str], hook: Hook, monitor: bool = False
) -> str:
    """Content hash of everything that changes the compiled program.

    Map entries are not part of it: they are data, applied without a rebuild.
    """
    material = {
        "codegen": CODEGEN_VERSION,
        "main": [bundle.main_rel, bundle.main_text],
        "includes": sorted(bundle.local_files.items()),
        "function": function,
        "cflags": cflags,
        "hook": hook.value,
        "monitor": monitor,
        "bcc": bcc_version(),
        "kernel": kernel_release(),
    }
    blob = json.dumps(material, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


@dataclass
class BuildRequest:
    nf: str
    hook: str
    function: str
    cflags: list[str]
    source_rel: str
    source_text: str
    quote_dir: str  # folder of the NF source: -iquote for its local headers
    build_hash: str
    repo_root: str | None = None  # where the snapshot below is placed in the compiler's view
    # repository-relative path -> text: every local header the source guard accepted
    local_files: dict[str, str] = field(default_factory=dict)
    install: bool = False  # False: compile + verifier check only, nothing pinned
    pins: BuildPins = field(default_factory=BuildPins)
    prog_pin_path: str | None = None
    # the test gate: pin here a private copy of the program (fresh maps, never the live ones)
    test_pin_path: str | None = None
    monitor: bool = False  # spec.mode: monitor (the wrapper passes every verdict on)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BuildRequest:
        pins = data.pop("pins")
        pins["staged_maps"] = tuple(tuple(x) for x in pins.get("staged_maps", ()))
        pins["all_map_names"] = tuple(pins.get("all_map_names", ()))
        return cls(pins=BuildPins(**pins), **data)


@dataclass
class MapMismatch:
    name: str
    pin_path: str
    declared: dict[str, int]
    pinned: dict[str, int]

    def describe(self) -> str:
        diffs = [
            f"{k} {self.pinned.get(k)} -> {v}"
            for k, v in self.declared.items()
            if self.pinned.get(k) != v
        ]
        return f"map {self.name!r} changed ({', '.join(diffs)})"


@dataclass
class ProgramInfo:
    name: str
    prog_id: int
    tag: str
    pin_path: str | None = None


@dataclass
class BuildResult:
    nf: str
    build_hash: str
    ok: bool
    diagnostics: list[Diagnostic] = field(default_factory=list)
    program: ProgramInfo | None = None
    maps: list[MapInfo] = field(default_factory=list)
    mismatches: list[MapMismatch] = field(default_factory=list)
    compile_seconds: float = 0.0
    load_seconds: float = 0.0
    check_seconds: float = 0.0  # loading the author's function alone and checking references
    bcc_version: str = ""
    test_pin_path: str | None = None  # the private copy was pinned there
    test_copy_error: str = ""  # why it was not (the gate then makes a test build)
    test_copy_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["diagnostics"] = [d.to_dict() for d in self.diagnostics]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BuildResult:
        return cls(
            nf=data["nf"],
            build_hash=data["build_hash"],
            ok=data["ok"],
            diagnostics=[Diagnostic.from_dict(d) for d in data["diagnostics"]],
            program=ProgramInfo(**data["program"]) if data.get("program") else None,
            maps=[MapInfo(**m) for m in data.get("maps", [])],
            mismatches=[MapMismatch(**m) for m in data.get("mismatches", [])],
            compile_seconds=data.get("compile_seconds", 0.0),
            load_seconds=data.get("load_seconds", 0.0),
            check_seconds=data.get("check_seconds", 0.0),
            bcc_version=data.get("bcc_version", ""),
            test_pin_path=data.get("test_pin_path"),
            test_copy_error=data.get("test_copy_error", ""),
            test_copy_seconds=data.get("test_copy_seconds", 0.0),
        )
