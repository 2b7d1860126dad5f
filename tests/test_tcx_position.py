"""attach.position in the manifest and its parsing (pure, no kernel)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from nfctl.datapath.hooklinks import Position
from nfctl.manifest.model import Attach


@pytest.mark.parametrize("text", ["first", "last", "before:cil_from_netd", "after:cni_a"])
def test_tc_positions_are_accepted(text: str) -> None:
    attach = Attach.model_validate({"hook": "tc-ingress", "interfaces": ["eth0"], "position": text})
    assert str(Position.parse(attach.position or "first")) == text


@pytest.mark.parametrize("text", ["middle", "before:", "after:name-with-dash", "before:x" * 3])
def test_bad_positions_are_refused(text: str) -> None:
    with pytest.raises(ValidationError):
        Attach.model_validate({"hook": "tc-egress", "interfaces": ["eth0"], "position": text})
    with pytest.raises(ValueError):
        Position.parse(text)


def test_position_is_refused_for_xdp() -> None:
    with pytest.raises(ValidationError, match="only to tc hooks"):
        Attach.model_validate({"hook": "xdp", "interfaces": ["eth0"], "position": "first"})
