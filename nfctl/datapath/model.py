"""The values the datapath hands its callers: a pinned NF version (LoadedBuild) with the
maps staged for it (MapSwap), a chain member, an entry sync's outcome, and its error."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nfctl.bpf.codec import TypeCodec
from nfctl.datapath.pins import BpffsPaths
from nfctl.datapath.records import BuildRecord
from nfctl.diagnostics import Diagnostic
from nfctl.manifest.model import Hook


class DatapathError(RuntimeError):
    def __init__(self, message: str, diagnostics: list[Diagnostic] | None = None) -> None:
        super().__init__(message)
        self.diagnostics = diagnostics or []


@dataclass
class MapSwap:
    """A map created fresh for a new version, put in place when that version goes live."""

    name: str
    staged_pin: Path
    final_pin: Path
    migrated_entries: int = 0
    merged_entries: int = 0  # elements the old program wrote after the copy, merged at commit
    # what migration copied (raw old elements) and the (old key, new key, old value, new value)
    # codecs, so commit can merge what the old program wrote in between; in memory only
    copied: dict[bytes, bytes] | None = field(default=None, repr=False)
    codecs: tuple[TypeCodec, TypeCodec, TypeCodec, TypeCodec] | None = field(
        default=None, repr=False
    )


@dataclass
class LoadedBuild:
    """An NF version pinned and ready to attach (built by nfctl.builder, or adopted from its
    pin); swaps are its staged maps until commit puts them in place."""

    record: BuildRecord
    prog_pin: Path
    prog_id: int
    tag: str
    compiled: bool  # False when adopted from an existing pin
    swaps: list[MapSwap] = field(default_factory=list)
    compile_seconds: float = 0.0
    test_pin: Path | None = None  # the test gate's private copy (nfctl.bpf.progcopy)
    test_copy_error: str = ""
    test_copy_seconds: float = 0.0

    @property
    def nf(self) -> str:
        return self.record.nf

    @property
    def hook(self) -> Hook:
        return Hook(self.record.hook)

    @property
    def build_hash(self) -> str:
        return self.record.build_hash

    def map_pin(self, paths: BpffsPaths, name: str) -> Path:
        for swap in self.swaps:
            if swap.name == name:
                return swap.staged_pin
        return paths.map_pin(self.nf, name)


@dataclass
class ChainMember:
    nf: str
    build_hash: str
    prog_pin: Path


@dataclass
class EntrySyncResult:
    map_name: str
    added: int
    updated: int
    deleted: int
    total: int
