"""Validation patterns end at the end of the string: Python's `$` also matches before a
trailing newline, so "fw\\n" passed as a valid name (and then reached file names, C
identifiers, labels and metric names). Checked through the manifest model, as a user's
nf.yaml would reach it, plus the other validating patterns in nfctl/."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from nfctl.agent.source import SHA_RE
from nfctl.bpf.codec import _MAC_RE
from nfctl.controller.enroll import NODE_NAME_RE
from nfctl.manifest.model import NetworkFunction, validate_cflag, validate_interface_glob

NFCTL = Path(__file__).resolve().parents[1] / "nfctl"

VALID: dict[str, Any] = {
    "apiVersion": "nfctl.io/v1alpha1",
    "kind": "NetworkFunction",
    "metadata": {"name": "fw", "labels": {"team": "net"}},
    "spec": {
        "version": "1.0.0",
        "program": {"source": "prog.c", "function": "xdp_prog"},
        "attach": {"hook": "xdp", "interfaces": ["eth*"]},
    },
}


def with_value(path: list[str | int], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(VALID)
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


def test_valid_manifest_is_accepted() -> None:
    NetworkFunction.model_validate(VALID)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (["metadata", "name"], "fw\n"),
        (["spec", "version"], "1.0.0\n"),
        (["spec", "program", "function"], "xdp_prog\n"),
        (["metadata", "labels"], {"team\n": "net"}),
        (["metadata", "labels"], {"team": "net\n"}),
        (["spec", "attach", "interfaces"], ["eth*\n"]),
    ],
)
def test_trailing_newline_is_refused(path: list[str | int], value: Any) -> None:
    with pytest.raises(ValidationError):
        NetworkFunction.model_validate(with_value(path, value))


def test_cflags_and_globs_refuse_trailing_newline() -> None:
    for flag in ("-DX=1\n", "-UX\n", "-Wno-unused\n"):
        with pytest.raises(ValueError):
            validate_cflag(flag)
    with pytest.raises(ValueError):
        validate_interface_glob("eth0\n")


def test_other_validating_patterns() -> None:
    for pattern, good in (
        (SHA_RE, "a" * 40),
        (_MAC_RE, "02:00:00:00:00:01"),
        (NODE_NAME_RE, "node-a.example"),
    ):
        assert pattern.match(good)
        assert not pattern.match(good + "\n"), pattern.pattern


# Where names and values from manifests, Git, agents and operators are checked. (The
# compiler's patterns parse C lines and compiler output already split at newlines.)
VALIDATING_PACKAGES = ("manifest", "agent", "controller", "datapath", "cli", "lab")


def test_no_anchored_pattern_ends_in_dollar() -> None:
    offenders = []
    for path in (p for pkg in VALIDATING_PACKAGES for p in (NFCTL / pkg).rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"""re\.compile\(r?["']\^.*\$["']\)""", line):
                offenders.append(f"{path.relative_to(NFCTL.parent)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
