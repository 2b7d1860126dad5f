"""Load one manifest file: bytes -> YAML (with line marks) -> validated NetworkFunction.

Every failure becomes a Diagnostic naming the file, the field path and the line.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from nfctl.diagnostics import Diagnostic
from nfctl.manifest.model import NetworkFunction
from nfctl.manifest.paths import PathEscapeError, resolve_inside

# libyaml parses ~10x faster than PyYAML's pure-Python parser; agents load every manifest
# on every pass. Both report the same marks (lines) for errors.
YAML_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

MAX_MANIFEST_BYTES = 1 << 20
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 250_000


@dataclass
class LoadedManifest:
    path: Path  # absolute path of the manifest file
    rel_path: str  # path relative to the repository root, as shown to users
    nf: NetworkFunction | None
    source_path: Path | None = None  # resolved, inside the repo
    diagnostics: list[Diagnostic] = field(default_factory=list)
    lines: dict[str, int] = field(default_factory=dict)  # field path -> line

    @property
    def ok(self) -> bool:
        return self.nf is not None and not self.diagnostics

    def diagnostic(self, field_path: str, message: str) -> Diagnostic:
        """An error about one field of this manifest, located at its line."""
        return Diagnostic(
            file=self.rel_path, line=self.line_of(field_path), field=field_path, message=message
        )

    def line_of(self, field_path: str) -> int | None:
        while field_path:
            if field_path in self.lines:
                return self.lines[field_path]
            field_path = field_path.rpartition(".")[0]
        return None


def load_manifest(path: Path, repo_root: Path) -> LoadedManifest:
    repo_root = repo_root.resolve()
    rel = _relative(path, repo_root)
    result = LoadedManifest(path=path, rel_path=rel, nf=None)

    def fail(message: str, line: int | None = None, field_path: str | None = None) -> None:
        result.diagnostics.append(
            Diagnostic(file=rel, message=message, line=line, field=field_path)
        )

    try:
        real = resolve_inside(path, repo_root)
    except PathEscapeError as exc:
        fail(str(exc))
        return result
    try:
        info = real.stat()
        if not stat.S_ISREG(info.st_mode):
            fail("manifest is not a regular file")
            return result
        size = info.st_size
        if size > MAX_MANIFEST_BYTES:
            fail(f"manifest is {size} bytes; the limit is {MAX_MANIFEST_BYTES} bytes")
            return result
        raw = real.read_bytes()
    except OSError as exc:
        fail(f"cannot read manifest: {exc.strerror}")
        return result

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        fail(f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})", line=line)
        return result

    try:
        shape_problem = _check_yaml_shape(text)
        if shape_problem is not None:
            fail(shape_problem[0], line=shape_problem[1])
            return result
        nodes = list(yaml.compose_all(text, Loader=YAML_LOADER))
    except yaml.YAMLError as exc:
        problem, yaml_line = _yaml_problem(exc)
        fail(f"YAML syntax error: {problem}", line=yaml_line)
        return result
    nodes = [n for n in nodes if n is not None]
    if not nodes:
        fail("manifest is empty")
        return result
    if len(nodes) > 1:
        fail(
            "a manifest file holds exactly one NetworkFunction (found several YAML documents)",
            line=nodes[1].start_mark.line + 1,
        )
        return result
    root = nodes[0]
    duplicates = _find_duplicate_keys(root, "")
    for dup_path, line in duplicates:
        fail(f"duplicate key {dup_path.rpartition('.')[2]!r}", line=line, field_path=dup_path)
    if duplicates:
        return result
    _collect_lines(root, "", result.lines)

    try:
        data = YAML_LOADER("").construct_document(root)
    except yaml.YAMLError as exc:  # compose succeeded; construction fails on unknown tags
        problem, yaml_line = _yaml_problem(exc)
        fail(f"YAML error: {problem}", line=yaml_line)
        return result
    if not isinstance(data, dict):
        fail("a manifest must be a YAML mapping with apiVersion, kind, metadata and spec", line=1)
        return result
    if data.get("kind") == "RolloutPolicy":
        fail(
            "a RolloutPolicy goes in rollout.yaml at the root of the folder the fleet "
            "follows, not in an NF manifest (docs/rollouts.md)",
            line=result.line_of("kind"),
            field_path="kind",
        )
        return result

    try:
        nf = NetworkFunction.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = _loc_to_path(err["loc"], data)
            result.diagnostics.append(
                Diagnostic(
                    file=rel,
                    message=_message(err),
                    line=result.line_of(loc) if loc else None,
                    field=loc or None,
                )
            )
        return result

    source_rel = nf.spec.program.source
    try:
        source_path = resolve_inside(real.parent / source_rel, repo_root)
    except PathEscapeError as exc:
        fail(str(exc), line=result.line_of("spec.program.source"), field_path="spec.program.source")
        return result
    if not source_path.is_file():
        fail(
            f"program source {source_rel!r} not found next to the manifest",
            line=result.line_of("spec.program.source"),
            field_path="spec.program.source",
        )
        return result
    result.nf = nf
    result.source_path = source_path
    return result


def _yaml_problem(exc: yaml.YAMLError) -> tuple[str, int | None]:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line: int | None = mark.line + 1 if mark is not None else None
    problem = getattr(exc, "problem", None) or str(exc)
    return str(problem), line


def _check_yaml_shape(text: str) -> tuple[str, int | None] | None:
    """Refuse, in one linear pass over the parser's events, YAML whose tree is too deep
    (the composer recurses) or whose aliases expand it beyond MAX_YAML_NODES (an alias
    bomb, or a recursive alias that would make every later walk loop forever).

    Returns (message, line) for the first problem, None when the shape is fine."""
    expanded_size: dict[str, int] = {}  # anchor -> node count with aliases expanded
    open_collections: list[list[Any]] = []  # [anchor, node count so far] per open level
    total = 0

    def add(count: int) -> None:
        nonlocal total
        total += count
        if open_collections:
            open_collections[-1][1] += count

    for event in yaml.parse(text, Loader=YAML_LOADER):
        line = event.start_mark.line + 1 if event.start_mark is not None else None
        if isinstance(event, yaml.CollectionStartEvent):
            if len(open_collections) >= MAX_YAML_DEPTH:
                return f"YAML nested deeper than {MAX_YAML_DEPTH} levels", line
            total += 1
            open_collections.append([event.anchor, 1])
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, count = open_collections.pop()
            if anchor is not None:
                expanded_size[anchor] = count
            if open_collections:
                open_collections[-1][1] += count
        elif isinstance(event, yaml.ScalarEvent):
            if event.anchor is not None:
                expanded_size[event.anchor] = 1
            add(1)
        elif isinstance(event, yaml.AliasEvent):
            size = expanded_size.get(event.anchor or "")
            if size is None:
                return f"YAML alias *{event.anchor} refers to itself or to no anchor", line
            add(size)
        if total > MAX_YAML_NODES:
            return (
                f"YAML expands to more than {MAX_YAML_NODES} nodes (aliases used as a bomb?)",
                line,
            )
    return None


def _relative(path: Path, root: Path) -> str:
    try:
        return os.path.relpath(os.path.abspath(path), root)
    except ValueError:
        return str(path)


def _message(err: Any) -> str:
    msg = str(err.get("msg", "invalid"))
    if err.get("type") == "extra_forbidden":
        return "unknown field (check the spelling; see docs/manifest.md)"
    if err.get("type") == "missing":
        return "required field is missing"
    if err.get("type") == "literal_error":
        return msg.replace("Input should be", "must be")
    return msg.removeprefix("Value error, ").replace("Input should be", "must be")


_ALIASES = {
    "api_version": "apiVersion",
    "exclude_interfaces": "excludeInterfaces",
    "xdp_mode": "xdpMode",
    "on_interface_removed": "onInterfaceRemoved",
    "node_selector": "nodeSelector",
    "on_incompatible": "onIncompatible",
}


def _loc_to_path(loc: tuple[Any, ...], data: Any) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(str(item))
        else:
            parts.append(_ALIASES.get(str(item), str(item)))
    return ".".join(parts)


def _collect_lines(node: yaml.Node, prefix: str, out: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = str(key_node.value)
            path = f"{prefix}.{key}" if prefix else key
            out[path] = key_node.start_mark.line + 1
            _collect_lines(value_node, path, out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            path = f"{prefix}.{index}" if prefix else str(index)
            out[path] = item.start_mark.line + 1
            _collect_lines(item, path, out)


def _find_duplicate_keys(node: yaml.Node, prefix: str) -> list[tuple[str, int]]:
    found: list[tuple[str, int]] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            path = f"{prefix}.{key}" if prefix else key
            if key in seen:
                found.append((path, key_node.start_mark.line + 1))
            seen.add(key)
            found.extend(_find_duplicate_keys(value_node, path))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            found.extend(_find_duplicate_keys(item, f"{prefix}.{index}" if prefix else str(index)))
    return found
