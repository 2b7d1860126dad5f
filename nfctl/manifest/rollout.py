"""The `nfctl.io/v1alpha1` RolloutPolicy (see docs/rollouts.md): how the controller rolls
a new revision of the NF repository out to the fleet, wave by wave, and the health gates
that judge each wave. One file, `rollout.yaml` at the root of the repository folder the
fleet follows. Parsed from text (the controller reads it with `git show REV:path`, the
agent and `nfctl validate` from a checkout); every problem is a Diagnostic with file:line."""

from __future__ import annotations

import math
import os
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from nfctl.diagnostics import Diagnostic
from nfctl.manifest.loader import (
    MAX_MANIFEST_BYTES,
    YAML_LOADER,
    _check_yaml_shape,
    _collect_lines,
    _find_duplicate_keys,
    _message,
    _yaml_problem,
)
from nfctl.manifest.model import API_VERSION, NF_NAME_RE, _check_labels

KIND = "RolloutPolicy"
POLICY_NAMES = ("rollout.yaml", "rollout.yml")
MAX_WAVES = 64
MAX_GATES = 32
# Below 100 packets one dropped packet moves a drop ratio by more than one percentage point
# (maxIncrease 0.01, the usual limit): the gate would judge one packet, not the change.
DEFAULT_MIN_PACKETS = 100
MAX_MIN_PACKETS = 1_000_000_000
DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?\Z")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as "30s", "2m", "500ms"."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '30s' or '2m'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := DURATION_RE.match(value.strip())):
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise ValueError(f"invalid duration {value!r}: use seconds or a string like '30s', '2m'")
    if not math.isfinite(seconds) or seconds < 0 or seconds > 7 * 86400:
        raise ValueError(f"duration {value!r} must be between 0 and 7 days")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


def _parse_share(value: Any) -> int | str:
    """A count (2) or a percentage ("25%") of nodes."""
    if isinstance(value, bool):
        raise ValueError("must be a node count or a percentage like '25%'")
    if isinstance(value, int):
        if value < 1:
            raise ValueError("a node count must be at least 1")
        return value
    if isinstance(value, str) and re.fullmatch(r"\d{1,3}%", value):
        if not 0 < int(value[:-1]) <= 100:
            raise ValueError("a percentage must be between 1% and 100%")
        return value
    raise ValueError(f"{value!r}: must be a node count or a percentage like '25%'")


Share = Annotated[int | str, BeforeValidator(_parse_share)]


def share_of(share: int | str, total: int) -> int:
    """Nodes a count or percentage stands for out of `total` (a percentage rounds up, so
    a non-empty fleet always gets at least one node)."""
    if isinstance(share, int):
        return share
    return math.ceil(total * int(share[:-1]) / 100)


class OnFailure(StrEnum):
    ROLLBACK = "rollback"  # nodes given the revision in this rollout go back to the previous
    PAUSE = "pause"  # the rollout halts; nodes stay; an operator resumes, promotes or aborts


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class ReadyGate(_Strict):
    name: str = "ready"
    kind: Literal["ready"]


class VerdictGate(_Strict):
    """The drop ratio of NF `nf` on the wave's nodes must not exceed the baseline's (nodes
    not yet updated over the same window, else the wave nodes before their update) by
    more than `maxIncrease` (a ratio: 0.01 is one percentage point), judged once the wave
    and the baseline have seen `minPackets` packets of the NF."""

    name: str = ""
    kind: Literal["verdict"]
    nf: str
    max_increase: float = Field(alias="maxIncrease", ge=0.0, le=1.0)
    # packets the wave (and the baseline) must have seen before the ratio is judged
    min_packets: int = Field(
        default=DEFAULT_MIN_PACKETS, alias="minPackets", ge=0, le=MAX_MIN_PACKETS, strict=True
    )

    @field_validator("nf")
    @classmethod
    def _nf(cls, v: str) -> str:
        if not NF_NAME_RE.match(v):
            raise ValueError(f"nf {v!r} is not a valid NetworkFunction name")
        return v


class PromQLGate(_Strict):
    """An instant PromQL query; every sample must be within [min, max]."""

    name: str = ""
    kind: Literal["promql"]
    query: str = Field(min_length=1, max_length=4096)
    max: float | None = None
    min: float | None = None
    url: str | None = Field(default=None, description="Prometheus base URL (else the controller's)")

    @model_validator(mode="after")
    def _checks(self) -> PromQLGate:
        if self.max is None and self.min is None:
            raise ValueError("a promql gate needs max, min or both")
        if self.url is not None and not re.match(r"^https?://[^\s]+\Z", self.url):
            raise ValueError(f"url {self.url!r} must be an http:// or https:// URL")
        return self


def gate_name(gate: ReadyGate | VerdictGate | PromQLGate) -> str:
    if gate.name:
        return gate.name
    if isinstance(gate, VerdictGate):
        return f"verdict-{gate.nf}"
    return gate.kind


Gate = Annotated[ReadyGate | VerdictGate | PromQLGate, Field(discriminator="kind")]


class Wave(_Strict):
    """Nodes by label selector, or a count / percentage of the fleet, taken from the nodes
    no earlier wave took; neither: every node left."""

    name: str = ""
    selector: dict[str, str] = Field(default_factory=dict)
    count: Share | None = None
    bake: Duration = 0.0
    gates: list[Gate] = Field(default_factory=list, max_length=MAX_GATES)

    @model_validator(mode="after")
    def _checks(self) -> Wave:
        _check_labels(self.selector)
        return self


class PolicySpec(_Strict):
    waves: list[Wave] = Field(min_length=1, max_length=MAX_WAVES)
    gates: list[Gate] = Field(default_factory=list, max_length=MAX_GATES)
    max_unavailable: Share = Field(default="100%", alias="maxUnavailable")
    progress_deadline: Duration = Field(default=300.0, alias="progressDeadline")
    on_failure: OnFailure = Field(default=OnFailure.ROLLBACK, alias="onFailure")
    interval: Duration = Field(default=5.0, description="how often gates are evaluated")

    @model_validator(mode="after")
    def _checks(self) -> PolicySpec:
        if self.interval <= 0:
            raise ValueError("interval must be positive")
        if self.progress_deadline <= 0:
            raise ValueError("progressDeadline must be positive")
        return self


class Metadata(_Strict):
    name: str

    @model_validator(mode="after")
    def _checks(self) -> Metadata:
        if not NF_NAME_RE.match(self.name):
            raise ValueError(f"name {self.name!r}: lowercase letters, digits and '-'")
        return self


class RolloutPolicy(_Strict):
    api_version: Literal["nfctl.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["RolloutPolicy"]
    metadata: Metadata
    spec: PolicySpec

    def wave_name(self, index: int) -> str:
        return self.spec.waves[index].name or f"wave-{index + 1}"

    def gates_of(self, index: int) -> list[ReadyGate | VerdictGate | PromQLGate]:
        """The gates judging wave `index`: the policy's, then the wave's own; a ready gate
        always (a wave is never judged on nodes that did not take the revision)."""
        gates = [*self.spec.gates, *self.spec.waves[index].gates]
        if not any(isinstance(g, ReadyGate) for g in gates):
            gates.insert(0, ReadyGate(kind="ready"))
        return gates


_ALIASES = {
    "api_version": "apiVersion",
    "max_increase": "maxIncrease",
    "min_packets": "minPackets",
    "max_unavailable": "maxUnavailable",
    "progress_deadline": "progressDeadline",
    "on_failure": "onFailure",
}


def _loc_path(loc: tuple[Any, ...]) -> str:
    # a discriminated union adds the tag ('verdict') to the location: not a field
    parts = [str(p) for p in loc if p not in ("ready", "verdict", "promql")]
    return ".".join(_ALIASES.get(p, p) for p in parts)


def _line_of(lines: dict[str, int], path: str) -> int | None:
    while path:
        if path in lines:
            return lines[path]
        path = path.rpartition(".")[0]
    return None


def is_policy_text(text: str) -> bool:
    """Whether a YAML document declares kind RolloutPolicy (cheap, for discovery)."""
    return bool(re.search(r"^kind:\s*['\"]?RolloutPolicy['\"]?\s*(#.*)?$", text, re.M))


def parse_policy(text: str | bytes, rel_path: str) -> tuple[RolloutPolicy | None, list[Diagnostic]]:
    """The policy in `text`, or None and what is wrong with it (file:line)."""
    problems: list[Diagnostic] = []

    def fail(message: str, line: int | None = None, field: str | None = None) -> None:
        problems.append(Diagnostic(file=rel_path, message=message, line=line, field=field))

    if isinstance(text, bytes):
        raw = text
        if len(raw) > MAX_MANIFEST_BYTES:
            fail(f"policy is {len(raw)} bytes; the limit is {MAX_MANIFEST_BYTES} bytes")
            return None, problems
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            fail("not valid UTF-8", line=raw[: exc.start].count(b"\n") + 1)
            return None, problems
    try:
        shape = _check_yaml_shape(text)
        if shape is not None:
            fail(shape[0], line=shape[1])
            return None, problems
        nodes = [n for n in yaml.compose_all(text, Loader=YAML_LOADER) if n is not None]
    except yaml.YAMLError as exc:
        problem, line = _yaml_problem(exc)
        fail(f"YAML syntax error: {problem}", line=line)
        return None, problems
    if len(nodes) != 1:
        fail("a policy file holds exactly one RolloutPolicy document", line=1)
        return None, problems
    duplicates = _find_duplicate_keys(nodes[0], "")
    for path, line in duplicates:
        fail(f"duplicate key {path.rpartition('.')[2]!r}", line=line, field=path)
    if duplicates:
        return None, problems
    lines: dict[str, int] = {}
    _collect_lines(nodes[0], "", lines)
    try:
        data = YAML_LOADER("").construct_document(nodes[0])
    except yaml.YAMLError as exc:
        problem, line = _yaml_problem(exc)
        fail(f"YAML error: {problem}", line=line)
        return None, problems
    if not isinstance(data, dict):
        fail("a policy is a YAML mapping with apiVersion, kind, metadata and spec", line=1)
        return None, problems
    try:
        policy = RolloutPolicy.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            path = _loc_path(err["loc"])
            message = _message(err)
            if err.get("type") == "union_tag_invalid":
                message = "kind must be ready, verdict or promql"
            fail(message, line=_line_of(lines, path), field=path or None)
        return None, problems
    for index, wave in enumerate(policy.spec.waves):
        path = f"spec.waves.{index}"
        if wave.selector and wave.count is not None:
            fail("a wave takes a selector or a count, not both", _line_of(lines, path), path)
    if problems:
        return None, problems
    return policy, problems


def find_policy_file(folder: Path) -> Path | None:
    """The policy file at the root of a checked-out repository folder, if any."""
    for name in POLICY_NAMES:
        candidate = folder / name
        if candidate.is_file() or candidate.is_symlink():
            return candidate
    return None


def load_policy_file(path: Path, repo_root: Path) -> tuple[RolloutPolicy | None, list[Diagnostic]]:
    """`nfctl validate`: the policy file, confined to the repository."""
    from nfctl.manifest.paths import PathEscapeError, resolve_inside

    absolute = Path(os.path.abspath(path))
    rel = str(absolute.relative_to(repo_root)) if absolute.is_relative_to(repo_root) else str(path)
    try:
        real = resolve_inside(path, repo_root)
        if real.stat().st_size > MAX_MANIFEST_BYTES:
            return None, [Diagnostic(file=rel, message="policy file too large")]
        return parse_policy(real.read_bytes(), rel)
    except (PathEscapeError, OSError) as exc:
        return None, [Diagnostic(file=rel, message=str(exc))]


def policy_problems(path: Path, repo_root: Path) -> list[Diagnostic]:
    """`nfctl validate PATH`: what is wrong with the RolloutPolicy at the root of the
    folder PATH (nothing when it has none)."""
    found = find_policy_file(path) if path.is_dir() else None
    if found is None:
        return []
    return load_policy_file(found, repo_root.resolve())[1]


__all__ = [
    "API_VERSION",
    "KIND",
    "POLICY_NAMES",
    "OnFailure",
    "PromQLGate",
    "ReadyGate",
    "RolloutPolicy",
    "VerdictGate",
    "Wave",
    "find_policy_file",
    "gate_name",
    "is_policy_text",
    "load_policy_file",
    "parse_policy",
    "share_of",
]
