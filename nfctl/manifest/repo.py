"""Find and load every NetworkFunction manifest under a folder of a repository."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from nfctl.diagnostics import Diagnostic
from nfctl.manifest.loader import LoadedManifest, load_manifest

MANIFEST_NAMES = ("nf.yaml", "nf.yml")
MAX_MANIFESTS = 4096
SKIP_DIRS = {".git", "node_modules", "__pycache__", ".venv"}


@dataclass
class RepoScan:
    root: Path
    manifests: list[LoadedManifest] = field(default_factory=list)
    diagnostics: list[Diagnostic] = field(default_factory=list)  # not tied to one manifest

    @property
    def valid(self) -> list[LoadedManifest]:
        return [m for m in self.manifests if m.ok]


def find_repo_root(path: Path) -> Path:
    """The enclosing Git work tree, or the folder itself when it is not in one."""
    current = path.resolve()
    if current.is_file():
        current = current.parent
    for candidate in [current, *current.parents]:
        if (candidate / ".git").exists():
            return candidate
    return current


def scan_repo(path: Path, repo_root: Path | None = None) -> RepoScan:
    root = (repo_root or find_repo_root(path)).resolve()
    scan = RepoScan(root=root)
    target = path.resolve() if not path.is_symlink() else path
    if not path.exists():
        scan.diagnostics.append(Diagnostic(file=str(path), message="no such file or folder"))
        return scan
    files = [path] if path.is_file() else _manifest_files(path)
    if len(files) > MAX_MANIFESTS:
        scan.diagnostics.append(
            Diagnostic(file=str(path), message=f"more than {MAX_MANIFESTS} manifests; refusing")
        )
        return scan
    if not files:
        scan.diagnostics.append(
            Diagnostic(
                file=os.path.relpath(target, root) if root in target.parents else str(path),
                message="no NetworkFunction manifests (nf.yaml) found",
                severity="warning",
            )
        )
    for file in files:
        scan.manifests.append(load_manifest(file, root))
    _flag_duplicate_names(scan)
    return scan


def _manifest_files(folder: Path) -> list[Path]:
    found: list[Path] = []
    # followlinks=False: a symlinked folder is never walked into (it may lead out of the repo)
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            if name in MANIFEST_NAMES:
                found.append(Path(dirpath) / name)
    return found


def _flag_duplicate_names(scan: RepoScan) -> None:
    by_name: dict[str, list[LoadedManifest]] = {}
    for m in scan.manifests:
        if m.nf is not None:
            by_name.setdefault(m.nf.name, []).append(m)
    for name, group in by_name.items():
        if len(group) < 2:
            continue
        others = ", ".join(g.rel_path for g in group)
        for m in group:
            m.diagnostics.append(
                Diagnostic(
                    file=m.rel_path,
                    message=f"duplicate NetworkFunction name {name!r} (also in: {others})",
                    line=m.line_of("metadata.name"),
                    field="metadata.name",
                )
            )
