"""Keep every path a manifest names inside the repository."""

from __future__ import annotations

import os
from pathlib import Path


class PathEscapeError(ValueError):
    pass


def resolve_inside(path: Path, root: Path) -> Path:
    """Resolve symlinks and '..'; refuse anything that ends up outside root."""
    root = root.resolve()
    shown = os.path.relpath(os.path.abspath(path), root)
    resolved = Path(os.path.realpath(path))
    if resolved != root and root not in resolved.parents:
        if os.path.islink(path) or any(os.path.islink(p) for p in _ancestors(path, root)):
            raise PathEscapeError(f"{shown!r} is a symlink leading outside the repository")
        raise PathEscapeError(f"{shown!r} points outside the repository")
    return resolved


def _ancestors(path: Path, root: Path) -> list[Path]:
    out = []
    current = Path(os.path.abspath(path)).parent
    while current != current.parent and current != root:
        out.append(current)
        current = current.parent
    return out
