"""The `nfctl.io/v1alpha1` NetworkFunction schema (see docs/manifest.md)."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

API_VERSION = "nfctl.io/v1alpha1"
KIND = "NetworkFunction"

NF_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,46}[a-z0-9])?\Z")
C_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
VERSION_RE = re.compile(r"^\d+\.\d+\.\d+(?:[-+][0-9A-Za-z.-]+)?\Z")
LABEL_KEY_RE = re.compile(r"^([a-z0-9.-]{1,253}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?\Z")
LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?\Z")
METRIC_RE = re.compile(r"^nfctl_nf_[a-z][a-z0-9_]{0,60}\Z")
# Interface names are at most 15 bytes and never contain '/', ':' or whitespace.
IFACE_GLOB_CHARS_RE = re.compile(r"^[A-Za-z0-9_.@*?\[\]!^-]{1,64}\Z")
CFLAG_DEFINE_RE = re.compile(r"^-D[A-Za-z_][A-Za-z0-9_]*(=[A-Za-z0-9_.+\-*/()<>|&~^:,\"]*)?\Z")
CFLAG_UNDEF_RE = re.compile(r"^-U[A-Za-z_][A-Za-z0-9_]*\Z")
CFLAG_WARNING_RE = re.compile(r"^-Wno-[a-z0-9-]+\Z")
# A -D value expanding to inline assembly would bypass the source check (.incbin reads files)
CFLAG_ASM_RE = re.compile(r"\b(asm|__asm|__asm__|asm_[A-Za-z0-9_]+)\b")

MAX_CHAIN_PRIORITY = 65535


class Hook(StrEnum):
    XDP = "xdp"
    TC_INGRESS = "tc-ingress"
    TC_EGRESS = "tc-egress"

    @property
    def is_tc(self) -> bool:
        return self is not Hook.XDP


class InterfaceRemoval(StrEnum):
    DEGRADE = "degrade"  # the NF is Degraded there until the interface returns
    FORGET = "forget"  # an event, then the NF follows the interfaces that exist (pod veths)


class XdpMode(StrEnum):
    AUTO = "auto"  # native when the driver supports it, else generic
    NATIVE = "native"
    GENERIC = "generic"


class Mode(StrEnum):
    ENFORCE = "enforce"  # the NF's verdict is applied
    MONITOR = "monitor"  # the verdict is only counted; every packet goes on as if passed


class IncompatibleMapPolicy(StrEnum):
    MIGRATE = "migrate"  # copy and convert entries into a new map, then swap
    RECREATE = "recreate"  # start the new version with an empty map
    FAIL = "fail"  # refuse the new version; the old one stays attached


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, populate_by_name=True)


def validate_interface_glob(pattern: str) -> str:
    if not IFACE_GLOB_CHARS_RE.match(pattern):
        raise ValueError(
            f"invalid interface glob {pattern!r}: use letters, digits and _ . @ - with * ? [..]"
        )
    depth = 0
    for ch in pattern:
        if ch == "[":
            if depth:
                raise ValueError(f"invalid interface glob {pattern!r}: nested '['")
            depth = 1
        elif ch == "]" and depth:
            depth = 0
    if depth:
        raise ValueError(f"invalid interface glob {pattern!r}: unclosed '['")
    return pattern


# Validated one by one so that an error names the item: spec.attach.interfaces.1
InterfaceGlob = Annotated[str, AfterValidator(validate_interface_glob)]


class Metadata(_Strict):
    name: str
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NF_NAME_RE.match(v):
            raise ValueError(
                f"invalid name {v!r}: lowercase letters, digits and '-', "
                "start and end alphanumeric, at most 48 characters"
            )
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        return _check_labels(v)


def _check_labels(labels: dict[str, str]) -> dict[str, str]:
    for key, value in labels.items():
        if not LABEL_KEY_RE.match(key):
            raise ValueError(f"invalid label key {key!r}")
        if not LABEL_VALUE_RE.match(value):
            raise ValueError(f"invalid label value {value!r} for {key!r}")
    return labels


def validate_cflag(flag: str) -> str:
    if not (
        CFLAG_DEFINE_RE.match(flag) or CFLAG_UNDEF_RE.match(flag) or CFLAG_WARNING_RE.match(flag)
    ):
        raise ValueError(
            f"cflag {flag!r} is not allowed: only -DNAME[=VALUE], -UNAME and -Wno-* "
            "(include paths and other compiler options are set by nfctl)"
        )
    if flag.startswith(("-DNFCTL_", "-UNFCTL_")):
        raise ValueError(f"cflag {flag!r} touches a macro reserved for nfctl")
    if CFLAG_ASM_RE.search(flag.partition("=")[2]):
        raise ValueError(f"cflag {flag!r}: inline assembly is not allowed")
    return flag


# Validated one by one so that an error names the item: spec.program.cflags.2
CFlag = Annotated[str, AfterValidator(validate_cflag)]


class Program(_Strict):
    source: str = Field(min_length=1, description="C file, relative to the manifest")
    function: str = Field(description="the NF's entry function in the C source")
    cflags: list[CFlag] = Field(default_factory=list, max_length=64)

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if v.startswith("/"):
            raise ValueError("must be a path relative to the manifest, not absolute")
        if "\x00" in v or "\\" in v:
            raise ValueError("must be a plain relative path")
        if not v.endswith(".c"):
            raise ValueError("must name a C source file ending in .c")
        return v

    @field_validator("function")
    @classmethod
    def _function(cls, v: str) -> str:
        if not C_IDENT_RE.match(v):
            raise ValueError(f"{v!r} is not a C identifier")
        if v.startswith("nfctl_") or v.startswith("nf_"):
            raise ValueError("names starting with 'nf_' or 'nfctl_' are reserved for nfctl")
        return v


class Attach(_Strict):
    hook: Hook
    interfaces: list[InterfaceGlob] = Field(min_length=1, max_length=64)
    exclude_interfaces: list[InterfaceGlob] = Field(
        default_factory=list, alias="excludeInterfaces", max_length=64
    )
    priority: int = Field(default=1000, ge=0, le=MAX_CHAIN_PRIORITY)
    xdp_mode: XdpMode = Field(default=XdpMode.AUTO, alias="xdpMode")
    on_interface_removed: InterfaceRemoval = Field(
        default=InterfaceRemoval.DEGRADE, alias="onInterfaceRemoved"
    )
    # Where our TCX link goes among other tools' TCX programs (a CNI's, bpfman's).
    position: str | None = Field(
        default=None, pattern=r"^(first|last|(before|after):[A-Za-z0-9_]{1,15})$"
    )

    @model_validator(mode="after")
    def _xdp_mode_only_for_xdp(self) -> Attach:
        if self.hook is not Hook.XDP and self.xdp_mode is not XdpMode.AUTO:
            raise ValueError("xdpMode applies only to hook: xdp")
        if self.hook is Hook.XDP and self.position is not None:
            raise ValueError("position applies only to tc hooks (XDP runs one program)")
        return self


class MapEntry(_Strict):
    key: Any
    value: Any

    @field_validator("key", "value")
    @classmethod
    def _shape(cls, v: Any) -> Any:
        _check_entry_shape(v, depth=0)
        return v


def _check_entry_shape(v: Any, depth: int) -> None:
    if depth > 8:
        raise ValueError("nested too deeply (at most 8 levels)")
    if v is None:
        raise ValueError("must not be empty (null)")
    if isinstance(v, bool | int | str):
        return
    if isinstance(v, float):
        raise ValueError(f"{v!r}: floating point numbers cannot be stored in BPF maps")
    if isinstance(v, list):
        for item in v:
            _check_entry_shape(item, depth + 1)
        return
    if isinstance(v, dict):
        for k, item in v.items():
            if not isinstance(k, str) or not C_IDENT_RE.match(k):
                raise ValueError(f"field name {k!r} is not a C identifier")
            _check_entry_shape(item, depth + 1)
        return
    raise ValueError(f"unsupported value {v!r} (use integers, strings, lists or mappings)")


class MetricExport(_Strict):
    metric: str = Field(description="Prometheus metric name, must start with nfctl_nf_")
    field: str | None = Field(default=None, description="struct field of the value to export")
    help: str = ""
    type: Literal["counter", "gauge"] = "counter"

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if not METRIC_RE.match(v):
            raise ValueError(f"metric {v!r} must match nfctl_nf_[a-z0-9_]+")
        return v


class MapSpec(_Strict):
    managed: bool = False
    entries: list[MapEntry] = Field(default_factory=list, max_length=100_000)
    on_incompatible: IncompatibleMapPolicy = Field(
        default=IncompatibleMapPolicy.MIGRATE, alias="onIncompatible"
    )
    export: list[MetricExport] = Field(default_factory=list, max_length=16)

    @model_validator(mode="after")
    def _entries_need_managed(self) -> MapSpec:
        if self.entries and not self.managed:
            raise ValueError("entries are only applied to managed maps: set managed: true")
        return self


class Spec(_Strict):
    version: str
    description: str | None = None
    suspend: bool = False
    mode: Mode = Mode.ENFORCE
    program: Program
    attach: Attach
    node_selector: dict[str, str] = Field(default_factory=dict, alias="nodeSelector")
    maps: dict[str, MapSpec] = Field(default_factory=dict)

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not VERSION_RE.match(v):
            raise ValueError(f"version {v!r} is not a semantic version like 1.4.0")
        return v

    @field_validator("node_selector")
    @classmethod
    def _selector(cls, v: dict[str, str]) -> dict[str, str]:
        return _check_labels(v)

    @field_validator("maps")
    @classmethod
    def _map_names(cls, v: dict[str, MapSpec]) -> dict[str, MapSpec]:
        for name in v:
            if not C_IDENT_RE.match(name):
                raise ValueError(f"map name {name!r} is not a C identifier")
        return v


class NetworkFunction(_Strict):
    """One nf.yaml, validated: the NF's name, program, attach point, maps and mode."""

    api_version: Literal["nfctl.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["NetworkFunction"]
    metadata: Metadata
    spec: Spec

    @property
    def name(self) -> str:
        return self.metadata.name
