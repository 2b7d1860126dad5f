"""What the reconciler keeps between passes, typed: the applied NFs (the record persisted in
the state dir and its manifest, validated once) and what this process knows beyond it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nfctl.agent.plan import AttachPoint, Placement
from nfctl.agent.store import AppliedNF
from nfctl.manifest.model import NetworkFunction
from nfctl.wire.status import ErrorInfo


def spec_dump(nf: NetworkFunction) -> dict[str, Any]:
    """The manifest as persisted in applied.json."""
    return nf.model_dump(mode="json", by_alias=True)


def entries_digest(nf: NetworkFunction) -> str:
    """A digest of the managed map entries: what changes when only entries change."""
    data = {
        name: spec.model_dump(mode="json") for name, spec in nf.spec.maps.items() if spec.managed
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Applied:
    """The last good state of one NF on this node: the persisted record and its manifest."""

    record: AppliedNF
    nf: NetworkFunction

    @classmethod
    def from_record(cls, record: AppliedNF) -> Applied:
        return cls(record, NetworkFunction.model_validate(record.spec))

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def build_hash(self) -> str:
        return self.record.build_hash

    @property
    def placement(self) -> Placement:
        return Placement.of(self.nf, self.record.build_hash)


def records(applied: Mapping[str, Applied]) -> dict[str, AppliedNF]:
    return {name: a.record for name, a in applied.items()}


@dataclass
class NFRuntime:
    """What this process knows about an NF beyond the persisted applied state."""

    error: ErrorInfo | None = None
    error_key: str = ""
    attach_errors: dict[AttachPoint, str] = field(default_factory=dict)
    selected: bool = True
    in_git: bool = False
