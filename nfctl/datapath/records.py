"""Build records: what a pinned program is (NF, hook, map types), kept in the state dir
so a restarted agent can adopt pinned programs without recompiling them."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nfctl.bpf.codec import TypeCodec
from nfctl.bpf.mapinfo import MapInfo


@dataclass
class BuildRecord:
    nf: str
    hook: str
    build_hash: str
    program_name: str
    maps: list[MapInfo]
    network_order: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    compile_seconds: float = 0.0

    def codecs(self, map_name: str) -> tuple[TypeCodec, TypeCodec]:
        info = self.map(map_name)
        hints = self.network_order.get(map_name, {})
        return (
            TypeCodec(info.key_desc, frozenset(hints.get("key", []))),
            TypeCodec(info.value_desc, frozenset(hints.get("value", []))),
        )

    def map(self, name: str) -> MapInfo:
        for info in self.maps:
            if info.name == name:
                return info
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BuildRecord:
        data = dict(data)
        data["maps"] = [MapInfo(**m) for m in data["maps"]]
        return cls(**data)


def write_json_atomic(path: Path, data: Any, durable: bool = True) -> None:
    """Replace path with data's JSON: readers see the old file or the new one, never a
    part. durable=False skips the fsync, for files rewritten often whose loss in a power
    cut costs nothing (the next write replaces them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1, default=str)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RecordStore:
    def __init__(self, state_dir: Path) -> None:
        self.folder = state_dir / "builds"

    def path(self, build_hash: str) -> Path:
        return self.folder / f"{build_hash}.json"

    def save(self, record: BuildRecord) -> None:
        write_json_atomic(self.path(record.build_hash), record.to_json())

    def load(self, build_hash: str) -> BuildRecord | None:
        try:
            return BuildRecord.from_json(json.loads(self.path(build_hash).read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def delete(self, build_hash: str) -> None:
        self.path(build_hash).unlink(missing_ok=True)

    def all(self) -> list[BuildRecord]:
        if not self.folder.is_dir():
            return []
        out = []
        for file in sorted(self.folder.glob("*.json")):
            record = self.load(file.stem)
            if record is not None:
                out.append(record)
        return out
