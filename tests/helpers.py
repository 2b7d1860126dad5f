"""Helpers for tests: load NFs from the library or from inline sources."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import yaml

from nfctl.compiler.client import PreparedNF, prepare
from nfctl.manifest.repo import scan_repo

REPO_ROOT = Path(__file__).resolve().parents[1]


def prepare_library_nf(name: str) -> PreparedNF:
    scan = scan_repo(REPO_ROOT / "bpf" / name, repo_root=REPO_ROOT)
    assert len(scan.manifests) == 1, scan.manifests
    manifest = scan.manifests[0]
    assert manifest.ok, manifest.diagnostics
    prepared = prepare(manifest, scan.root)
    assert prepared.ok, prepared.diagnostics
    return prepared


def write_nf(
    folder: Path,
    name: str,
    source: str,
    function: str,
    hook: str = "xdp",
    priority: int = 100,
    maps: dict[str, Any] | None = None,
    version: str = "1.0.0",
    cflags: list[str] | None = None,
) -> Path:
    """Write an NF (manifest + C file) into folder/name and return the manifest path."""
    nf_dir = folder / name
    nf_dir.mkdir(parents=True, exist_ok=True)
    (nf_dir / f"{name}.c").write_text(textwrap.dedent(source))
    manifest = {
        "apiVersion": "nfctl.io/v1alpha1",
        "kind": "NetworkFunction",
        "metadata": {"name": name},
        "spec": {
            "version": version,
            "program": {"source": f"{name}.c", "function": function, "cflags": cflags or []},
            "attach": {"hook": hook, "interfaces": ["veth*"], "priority": priority},
            "maps": maps or {},
        },
    }
    path = nf_dir / "nf.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


def prepare_nf(folder: Path, name: str) -> PreparedNF:
    scan = scan_repo(folder / name, repo_root=folder)
    manifest = scan.manifests[0]
    assert manifest.ok, manifest.diagnostics
    prepared = prepare(manifest, folder)
    assert prepared.ok, prepared.diagnostics
    return prepared
